// CUDA kernels behind csrc/torch/kernels.h: multi-tensor pack with scaling, the fp16/bf16 wire
// casts and the elementwise sum. All run on the current stream of the tensors' device; inputs were
// checked by kernels.cpp. Half types compute in float (at::opmath_type) and round once, as the CPU
// versions do, so CPU and GPU give the same bits (except that nvcc's --use_fast_math flushes fp32
// subnormals to zero in the scaled and summed paths; plain copies keep every bit).
#include "kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace fastar {
namespace {

constexpr int kThreads = 256;
// Elements one block moves in the multi-tensor kernels: big enough to amortise the segment lookup,
// small enough that a 25 MB bucket still spreads over every SM.
constexpr int64_t kChunk = 16 * 1024;

// One tensor of a multi-tensor call, as the kernel sees it.
struct Segment {
  void* ptr;            // the tensor's data
  int64_t numel;        // its element count (> 0)
  int64_t offset;       // where it starts in flat, in elements
  int64_t first_chunk;  // index of its first kChunk-sized chunk among all chunks of the call
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Array {
  T v[N];
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte access

inline bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for a grid-stride loop over `work` items: enough to fill the GPU, no more.
int grid_for(int64_t work) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(blocks, sms * 8)));
}

// dst[0:n] = src[0:n] (* scale), by the threads of one block; 16-byte accesses when both are aligned.
template <typename T, bool kScale>
__device__ __forceinline__ void copy_block(T* __restrict__ dst, const T* __restrict__ src, int64_t n,
                                           at::opmath_type<T> scale) {
  using Op = at::opmath_type<T>;
  constexpr int V = kVec<T>;
  int64_t tail = 0;
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 == 0) {
    const int64_t nv = n / V;
    auto* d = reinterpret_cast<Array<T, V>*>(dst);
    const auto* s = reinterpret_cast<const Array<T, V>*>(src);
    for (int64_t i = threadIdx.x; i < nv; i += blockDim.x) {
      Array<T, V> x = s[i];
      if constexpr (kScale) {
#pragma unroll
        for (int k = 0; k < V; ++k) x.v[k] = static_cast<T>(static_cast<Op>(x.v[k]) * scale);
      }
      d[i] = x;
    }
    tail = nv * V;
  }
  for (int64_t i = tail + threadIdx.x; i < n; i += blockDim.x) {
    if constexpr (kScale) {
      dst[i] = static_cast<T>(static_cast<Op>(src[i]) * scale);
    } else {
      dst[i] = src[i];
    }
  }
}

// One block per chunk of one tensor; the block finds its tensor by binary search over first_chunk.
template <typename T, bool kScale>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_copy_kernel(const Segment* __restrict__ segs, int nsegs, T* flat, at::opmath_type<T> scale) {
  __shared__ int seg_index;
  const int64_t chunk = blockIdx.x;
  if (threadIdx.x == 0) {
    int lo = 0, hi = nsegs - 1;  // the last segment whose first_chunk <= chunk
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (segs[mid].first_chunk <= chunk) lo = mid; else hi = mid - 1;
    }
    seg_index = lo;
  }
  __syncthreads();
  const Segment seg = segs[seg_index];
  const int64_t begin = (chunk - seg.first_chunk) * kChunk;
  const int64_t n = seg.numel - begin < kChunk ? seg.numel - begin : kChunk;
  T* tensor = static_cast<T*>(seg.ptr) + begin;
  T* slice = flat + seg.offset + begin;
  copy_block<T, kScale>(slice, tensor, n, scale);
}

// pack: builds the segment table in pinned memory, copies it to the device on the current stream
// (the caching host allocator keeps the pinned block until that copy is done) and launches one
// kernel for all tensors.
void multi_tensor_copy(const std::vector<at::Tensor>& tensors, const at::Tensor& flat,
                       const std::vector<int64_t>& offsets, double scale) {
  std::vector<Segment> segs;
  segs.reserve(tensors.size());
  int64_t chunks = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t n = tensors[i].numel();
    if (n == 0) continue;
    segs.push_back(Segment{tensors[i].data_ptr(), n, offsets[i], chunks});
    chunks += (n + kChunk - 1) / kChunk;
  }
  if (segs.empty()) return;
  TORCH_CHECK(chunks <= INT32_MAX, "fastar pack: ", chunks,
              " chunks exceed the CUDA grid limit; split the call into several smaller ones");

  const c10::cuda::CUDAGuard guard(flat.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t bytes = static_cast<int64_t>(segs.size() * sizeof(Segment));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), segs.data(), bytes);
  const at::Tensor table = host.to(flat.device(), at::kByte, /*non_blocking=*/true);
  const auto* seg_ptr = static_cast<const Segment*>(table.data_ptr());
  const int nsegs = static_cast<int>(segs.size());
  const dim3 grid(static_cast<unsigned>(chunks));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, flat.scalar_type(), "fastar_multi_tensor_copy", [&] {
    using Op = at::opmath_type<scalar_t>;
    auto* flat_ptr = static_cast<scalar_t*>(flat.data_ptr());
    if (scale != 1.0) {
      multi_tensor_copy_kernel<scalar_t, true>
          <<<grid, kThreads, 0, stream>>>(seg_ptr, nsegs, flat_ptr, static_cast<Op>(scale));
    } else {
      multi_tensor_copy_kernel<scalar_t, false>
          <<<grid, kThreads, 0, stream>>>(seg_ptr, nsegs, flat_ptr, static_cast<Op>(scale));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// dst[i] = convert(src[i]); N elements per access when kVector (pointers checked by the caller).
template <typename From, typename To, int N, bool kVector>
__global__ void __launch_bounds__(kThreads) convert_kernel(const From* __restrict__ src, To* __restrict__ dst, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if constexpr (kVector) {
    const int64_t nv = n / N;
    const auto* s = reinterpret_cast<const Array<From, N>*>(src);
    auto* d = reinterpret_cast<Array<To, N>*>(dst);
    for (int64_t i = tid; i < nv; i += stride) {
      const Array<From, N> x = s[i];
      Array<To, N> y;
#pragma unroll
      for (int k = 0; k < N; ++k) y.v[k] = static_cast<To>(static_cast<float>(x.v[k]));
      d[i] = y;
    }
    tail = nv * N;
  }
  for (int64_t i = tail + tid; i < n; i += stride) dst[i] = static_cast<To>(static_cast<float>(src[i]));
}

template <typename From, typename To>
void launch_convert(const From* src, To* dst, int64_t n, cudaStream_t stream) {
  constexpr int N = 4;  // 16 bytes of fp32 on one side, 8 bytes of fp16/bf16 on the other
  if (aligned(src, sizeof(From) * N) && aligned(dst, sizeof(To) * N)) {
    convert_kernel<From, To, N, true><<<grid_for((n + N - 1) / N), kThreads, 0, stream>>>(src, dst, n);
  } else {
    convert_kernel<From, To, N, false><<<grid_for(n), kThreads, 0, stream>>>(src, dst, n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// dst[i] += src[i], in opmath (float for the half types), rounded once.
template <typename T, bool kVector>
__global__ void __launch_bounds__(kThreads) sum_kernel(T* dst, const T* src, int64_t n) {
  using Op = at::opmath_type<T>;
  constexpr int V = kVec<T>;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t tail = 0;
  if constexpr (kVector) {
    const int64_t nv = n / V;
    auto* d = reinterpret_cast<Array<T, V>*>(dst);
    const auto* s = reinterpret_cast<const Array<T, V>*>(src);
    for (int64_t i = tid; i < nv; i += stride) {
      Array<T, V> a = d[i];
      const Array<T, V> b = s[i];
#pragma unroll
      for (int k = 0; k < V; ++k) a.v[k] = static_cast<T>(static_cast<Op>(a.v[k]) + static_cast<Op>(b.v[k]));
      d[i] = a;
    }
    tail = nv * V;
  }
  for (int64_t i = tail + tid; i < n; i += stride) dst[i] = static_cast<T>(static_cast<Op>(dst[i]) + static_cast<Op>(src[i]));
}

}  // namespace

void pack_cuda(const std::vector<at::Tensor>& srcs, at::Tensor& flat, const std::vector<int64_t>& offsets, double scale) {
  multi_tensor_copy(srcs, flat, offsets, scale);
}

void compress_cuda(const at::Tensor& flat, at::Tensor& out) {
  const int64_t n = flat.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(flat.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto* src = static_cast<const float*>(flat.data_ptr());
  if (out.scalar_type() == at::kHalf) {
    launch_convert(src, static_cast<c10::Half*>(out.data_ptr()), n, stream);
  } else {
    launch_convert(src, static_cast<c10::BFloat16*>(out.data_ptr()), n, stream);
  }
}

void decompress_cuda(const at::Tensor& wire, at::Tensor& flat) {
  const int64_t n = wire.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(flat.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto* dst = static_cast<float*>(flat.data_ptr());
  if (wire.scalar_type() == at::kHalf) {
    launch_convert(static_cast<const c10::Half*>(wire.data_ptr()), dst, n, stream);
  } else {
    launch_convert(static_cast<const c10::BFloat16*>(wire.data_ptr()), dst, n, stream);
  }
}

void sum_into_cuda(at::Tensor& dst, const at::Tensor& src) {
  const int64_t n = dst.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(dst.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "fastar_sum_into", [&] {
    auto* d = static_cast<scalar_t*>(dst.data_ptr());
    const auto* s = static_cast<const scalar_t*>(src.data_ptr());
    constexpr int V = kVec<scalar_t>;
    if (aligned(d, 16) && aligned(s, 16)) {
      sum_kernel<scalar_t, true><<<grid_for((n + V - 1) / V), kThreads, 0, stream>>>(d, s, n);
    } else {
      sum_kernel<scalar_t, false><<<grid_for(n), kThreads, 0, stream>>>(d, s, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastar
