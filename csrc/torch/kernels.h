#pragma once
#include <torch/extension.h>
namespace fastar {
// flat[offsets[i] : offsets[i] + srcs[i].numel()] = srcs[i] * scale (flat is 1-D contiguous; srcs contiguous, any shape, same dtype as flat). One kernel launch for all tensors on CUDA (multi-tensor apply: a small device array of {ptr, numel, offset} built per call), a plain (OpenMP-free) loop on CPU.
void pack(const std::vector<at::Tensor>& srcs, at::Tensor& flat, const std::vector<int64_t>& offsets, double scale);
// fp32 bucket -> fp16 or bf16 wire copy (wire dtype at::kHalf / at::kBFloat16), and back (decompress writes into an fp32 tensor, fp32 accumulation). CUDA tensors: on the CPU the codec casts with ATen's copy_ (TensorCodec::cast)
at::Tensor compress(const at::Tensor& flat, at::ScalarType wire);
void compress_into(const at::Tensor& flat, at::Tensor& out);  // into a wire tensor of flat's size (the step loop's codec)
void decompress(const at::Tensor& wire, at::Tensor& flat);
// dst += src elementwise (fp32, fp64, fp16, bf16; half types accumulate in float) — the sum the schedules use when buffers are on the GPU; CPU version too
void sum_into(at::Tensor& dst, const at::Tensor& src);
// Test-only fault injection: python_tests turn one on (fastar._C._set_fault) to show that their
// checks catch a broken build. All off unless a test sets one; a check is one relaxed atomic load.
//   PackOffset:    pack writes every tensor at offset - 1 (offset > 0): an off-by-one in the pack
//   DefaultStream: pack launches on the device's default stream instead of the current one
//   SkipWait:      TensorAllreduce does not wait for a collective (NCCL: the stream order is lost;
//                  Gloo: the wait moves to the end of the call, after the data was used)
enum class Fault : int { None = 0, PackOffset = 1, DefaultStream = 2, SkipWait = 3 };
bool fault_active(Fault f);
// registers python functions kernels_pack, kernels_compress, kernels_decompress, kernels_sum_into, cuda_built() -> bool, and the test-only _set_fault(name) / _fault() on the module
void register_kernels(pybind11::module_& m);
}
