// Element types fastar reduces, independent of any framework.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace fastar {

// Bytes: data that is only moved, never summed (allgather of any dtype); the sum kernels refuse it.
enum class DType : int32_t { Float32 = 0, Float64 = 1, Float16 = 2, BFloat16 = 3, Bytes = 4 };

inline size_t dtype_size(DType t) {
  switch (t) {
    case DType::Float32: return 4;
    case DType::Float64: return 8;
    case DType::Float16: return 2;
    case DType::BFloat16: return 2;
    case DType::Bytes: return 1;
  }
  return 0;
}

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::Float32: return "float32";
    case DType::Float64: return "float64";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    case DType::Bytes: return "bytes";
  }
  return "unknown";
}

}  // namespace fastar
