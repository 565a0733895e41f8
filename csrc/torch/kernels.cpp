// CPU kernels of csrc/torch/kernels.h and the one place their inputs are checked. CUDA tensors go to
// the mirror functions in csrc/cuda/kernels.cu (built when setup.py defines FASTAR_WITH_CUDA).
#include "kernels.h"

#include <ATen/OpMathType.h>

#include <atomic>
#include <cstring>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>

#include "core/dtype.h"
#include "core/reduce.h"
#include "torch/dtype_map.h"

#ifdef FASTAR_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.cuh"
#endif

namespace fastar {
namespace {

#ifdef FASTAR_WITH_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

// ---- test-only fault injection (kernels.h): off unless a test calls fastar._C._set_fault
std::atomic<int> g_fault{0};
constexpr const char* kFaultNames[] = {"", "pack_offset", "default_stream", "skip_wait"};

// Fault::PackOffset: every tensor one element early (offset - 1 stays inside flat).
const std::vector<int64_t>& fault_offsets(const std::vector<int64_t>& offsets, std::vector<int64_t>& storage) {
  if (!fault_active(Fault::PackOffset)) return offsets;
  storage = offsets;
  for (auto& o : storage)
    if (o > 0) --o;
  return storage;
}

#ifdef FASTAR_WITH_CUDA
// Fault::DefaultStream: while alive, the current stream of t's device is that device's default stream.
struct FaultStream {
  std::optional<c10::cuda::CUDAStreamGuard> guard;
  explicit FaultStream(const at::Tensor& t) {
    if (fault_active(Fault::DefaultStream)) guard.emplace(c10::cuda::getDefaultCUDAStream(t.device().index()));
  }
};
#endif

bool is_reduced_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Every tensor a kernel touches is either on the CPU or on CUDA, and CUDA only if we were built for it.
void check_backend(const char* fn, const std::string& what, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), "fastar ", fn, ": ", what, " is an undefined tensor (None?); pass a real tensor");
  if (t.is_cuda()) {
    TORCH_CHECK(kCudaBuilt, "fastar was built without CUDA, so fastar ", fn, " cannot take the CUDA tensor ", what,
                " (on ", t.device(), "); rebuild fastar with a CUDA toolkit (set CUDA_HOME, FASTAR_CUDA=1 "
                "pip install --no-build-isolation -e .) or move the tensors to the CPU");
  } else {
    TORCH_CHECK(t.device().is_cpu(), "fastar ", fn, ": ", what, " is on ", t.device(),
                ", but fastar's kernels take CPU or CUDA tensors only; move it to one of those");
  }
}

void check_contiguous(const char* fn, const std::string& what, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), "fastar ", fn, ": ", what, " is not contiguous (sizes ", t.sizes(), ", strides ",
              t.strides(), "); pass ", what, ".contiguous() instead");
}

void check_same_device(const char* fn, const std::string& what, const at::Tensor& t, const std::string& ref_what,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "fastar ", fn, ": ", what, " is on ", t.device(), " but ", ref_what,
              " is on ", ref.device(), "; move them to the same device");
}

// flat: defined, on a supported device, 1-D, contiguous, of a dtype fastar reduces.
void check_flat(const char* fn, const at::Tensor& flat) {
  check_backend(fn, "flat", flat);
  TORCH_CHECK(flat.dim() == 1, "fastar ", fn, ": flat must be 1-D, got sizes ", flat.sizes(),
              "; pass flat.view(-1)");
  check_contiguous(fn, "flat", flat);
  TORCH_CHECK(is_reduced_float(flat.scalar_type()), "fastar ", fn, ": flat has dtype ", flat.scalar_type(),
              ", but only float32, float64, float16 and bfloat16 are supported");
}

// The tensors of a pack against flat: one offset each, same device and dtype, contiguous, and
// every slice [offset, offset + numel) inside flat.
void check_segments(const char* fn, const char* name, const std::vector<at::Tensor>& tensors,
                    const at::Tensor& flat, const std::vector<int64_t>& offsets) {
  check_flat(fn, flat);
  TORCH_CHECK(tensors.size() == offsets.size(), "fastar ", fn, ": got ", tensors.size(), " tensors in ", name,
              " but ", offsets.size(), " offsets; pass exactly one offset per tensor");
  const int64_t total = flat.numel();
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const std::string what = std::string(name) + "[" + std::to_string(i) + "]";
    check_backend(fn, what, t);
    check_same_device(fn, what, t, "flat", flat);
    TORCH_CHECK(t.scalar_type() == flat.scalar_type(), "fastar ", fn, ": ", what, " has dtype ", t.scalar_type(),
                " but flat has dtype ", flat.scalar_type(), "; every tensor must have flat's dtype (cast it first)");
    check_contiguous(fn, what, t);
    const int64_t off = offsets[i];
    const int64_t n = t.numel();
    TORCH_CHECK(off >= 0 && off <= total && n <= total - off, "fastar ", fn, ": ", what, " (", n,
                " elements) at offset ", off, " does not fit in flat (", total,
                " elements); offsets must satisfy 0 <= offset and offset + numel <= flat.numel()");
  }
}

// dst[0:n] = src[0:n] * scale, in opmath (float for the half types) and rounded once; a memcpy when
// scale is 1 so that plain copies keep every bit.
template <typename T>
void copy_scaled(T* dst, const T* src, int64_t n, double scale) {
  if (n == 0) return;
  if (scale == 1.0) {
    std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
    return;
  }
  using Op = at::opmath_type<T>;
  const Op s = static_cast<Op>(scale);
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<Op>(src[i]) * s);
}

template <typename T>
void pack_cpu(const std::vector<at::Tensor>& srcs, at::Tensor& flat, const std::vector<int64_t>& offsets,
              double scale) {
  T* base = static_cast<T*>(flat.data_ptr());
  for (size_t i = 0; i < srcs.size(); ++i) {
    copy_scaled(base + offsets[i], static_cast<const T*>(srcs[i].data_ptr()), srcs[i].numel(), scale);
  }
}

#define FASTAR_DISPATCH_REDUCED_FLOAT(type, ...)                        \
  switch (type) {                                                      \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__; break; }   \
    case at::kDouble: { using scalar_t = double; __VA_ARGS__; break; } \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__; break; } \
    default: { using scalar_t = at::BFloat16; __VA_ARGS__; break; }    \
  }

}  // namespace

bool fault_active(Fault f) { return g_fault.load(std::memory_order_relaxed) == static_cast<int>(f); }

void pack(const std::vector<at::Tensor>& srcs, at::Tensor& flat, const std::vector<int64_t>& given_offsets,
          double scale) {
  check_segments("pack", "srcs", srcs, flat, given_offsets);
  std::vector<int64_t> storage;
  const std::vector<int64_t>& offsets = fault_offsets(given_offsets, storage);
#ifdef FASTAR_WITH_CUDA
  if (flat.is_cuda()) {
    const FaultStream fault_stream(flat);
    return pack_cuda(srcs, flat, offsets, scale);
  }
#endif
  FASTAR_DISPATCH_REDUCED_FLOAT(flat.scalar_type(), pack_cpu<scalar_t>(srcs, flat, offsets, scale));
}

at::Tensor compress(const at::Tensor& flat, at::ScalarType wire) {
  TORCH_CHECK(wire == at::kHalf || wire == at::kBFloat16, "fastar compress: wire dtype must be float16 or bfloat16, got ",
              wire);
  at::Tensor out = at::empty(flat.sizes(), flat.options().dtype(wire));
  compress_into(flat, out);
  return out;
}

void compress_into(const at::Tensor& flat, at::Tensor& out) {
  check_backend("compress", "flat", flat);
  TORCH_CHECK(flat.scalar_type() == at::kFloat, "fastar compress: flat has dtype ", flat.scalar_type(),
              ", but compress takes a float32 bucket; pass a float32 tensor");
  check_contiguous("compress", "flat", flat);
  check_contiguous("compress", "out", out);
  check_same_device("compress", "flat", flat, "out", out);
  TORCH_CHECK(out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16,
              "fastar compress: wire dtype must be float16 or bfloat16, got ", out.scalar_type());
  TORCH_CHECK(out.numel() == flat.numel(), "fastar compress: out has ", out.numel(), " elements but flat has ",
              flat.numel());
  TORCH_CHECK(flat.is_cuda(), "fastar compress: runs on CUDA tensors (on the CPU the codec casts with ATen's copy_)");
#ifdef FASTAR_WITH_CUDA
  compress_cuda(flat, out);
#endif
}

void decompress(const at::Tensor& wire, at::Tensor& flat) {
  check_backend("decompress", "wire", wire);
  check_backend("decompress", "flat", flat);
  check_same_device("decompress", "wire", wire, "flat", flat);
  TORCH_CHECK(wire.scalar_type() == at::kHalf || wire.scalar_type() == at::kBFloat16,
              "fastar decompress: wire has dtype ", wire.scalar_type(),
              ", but it must be float16 or bfloat16 (what compress returns)");
  TORCH_CHECK(flat.scalar_type() == at::kFloat, "fastar decompress: flat has dtype ", flat.scalar_type(),
              ", but decompress writes into a float32 tensor; pass a float32 flat");
  check_contiguous("decompress", "wire", wire);
  check_contiguous("decompress", "flat", flat);
  TORCH_CHECK(wire.numel() == flat.numel(), "fastar decompress: wire has ", wire.numel(), " elements but flat has ",
              flat.numel(), "; they must have the same number of elements");
  TORCH_CHECK(flat.is_cuda(), "fastar decompress: runs on CUDA tensors (on the CPU the codec casts with ATen's copy_)");
#ifdef FASTAR_WITH_CUDA
  decompress_cuda(wire, flat);
#endif
}

void sum_into(at::Tensor& dst, const at::Tensor& src) {
  check_backend("sum_into", "dst", dst);
  check_backend("sum_into", "src", src);
  check_same_device("sum_into", "src", src, "dst", dst);
  TORCH_CHECK(is_reduced_float(dst.scalar_type()), "fastar sum_into: dst has dtype ", dst.scalar_type(),
              ", but only float32, float64, float16 and bfloat16 are supported");
  TORCH_CHECK(src.scalar_type() == dst.scalar_type(), "fastar sum_into: src has dtype ", src.scalar_type(),
              " but dst has dtype ", dst.scalar_type(), "; they must match (cast src first)");
  check_contiguous("sum_into", "dst", dst);
  check_contiguous("sum_into", "src", src);
  TORCH_CHECK(src.numel() == dst.numel(), "fastar sum_into: src has ", src.numel(), " elements but dst has ",
              dst.numel(), "; they must have the same number of elements");
#ifdef FASTAR_WITH_CUDA
  if (dst.is_cuda()) return sum_into_cuda(dst, src);
#endif
  // the same sum (and rounding) the schedules use on CPU buffers
  reduce_sum(to_dtype(dst.scalar_type()), dst.data_ptr(), src.data_ptr(), dst.numel());
}

void register_kernels(pybind11::module_& m) {
  namespace py = pybind11;
  using Release = py::call_guard<py::gil_scoped_release>;
  m.def(
      "kernels_pack",
      [](const std::vector<at::Tensor>& srcs, at::Tensor flat, const std::vector<int64_t>& offsets, double scale) {
        pack(srcs, flat, offsets, scale);
      },
      py::arg("srcs"), py::arg("flat"), py::arg("offsets"), py::arg("scale") = 1.0, Release(),
      "flat[offsets[i]:offsets[i]+srcs[i].numel()] = srcs[i].view(-1) * scale, one kernel launch on CUDA");
  m.def(
      "kernels_compress", [](at::Tensor flat, at::ScalarType wire) { return compress(flat, wire); }, py::arg("flat"),
      py::arg("wire"), Release(), "a float16/bfloat16 copy (rounded to nearest even) of the float32 tensor flat");
  m.def(
      "kernels_decompress", [](at::Tensor wire, at::Tensor flat) { decompress(wire, flat); }, py::arg("wire"),
      py::arg("flat"), Release(), "flat[:] = wire as float32 (overwrites flat)");
  m.def(
      "kernels_sum_into", [](at::Tensor dst, at::Tensor src) { sum_into(dst, src); }, py::arg("dst"), py::arg("src"),
      Release(), "dst += src elementwise (half types add in float and round once)");
  m.def(
      "cuda_built", [] { return kCudaBuilt; }, "whether this build of fastar has its CUDA kernels");
  // Test-only (kernels.h, Fault): python_tests break the build on purpose to show their checks catch it.
  m.def(
      "_set_fault",
      [](const std::string& name) {
        for (int i = 0; i < (int)std::size(kFaultNames); ++i) {
          if (name == kFaultNames[i]) {
            g_fault.store(i, std::memory_order_relaxed);
            return;
          }
        }
        throw std::invalid_argument("fastar._C._set_fault: unknown fault '" + name +
                                    "'; expected '' (none), 'pack_offset', 'default_stream' or 'skip_wait'");
      },
      py::arg("name"), "TEST ONLY: turn on one deliberate bug ('' turns it off); see csrc/torch/kernels.h");
  m.def(
      "_fault", [] { return std::string(kFaultNames[g_fault.load(std::memory_order_relaxed)]); },
      "TEST ONLY: the fault turned on by _set_fault ('' when none)");
}

}  // namespace fastar
