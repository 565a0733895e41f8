// The torch dtype of a tensor as the core's DType, in one place for csrc/torch: fastar reduces the
// four floating types; anything else is an error that says what to use instead.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "core/dtype.h"

namespace fastar {

// False for a dtype fastar does not reduce (the latency path then declines the call).
inline bool try_dtype(at::ScalarType s, DType* out) {
  switch (s) {
    case at::kFloat: *out = DType::Float32; return true;
    case at::kDouble: *out = DType::Float64; return true;
    case at::kHalf: *out = DType::Float16; return true;
    case at::kBFloat16: *out = DType::BFloat16; return true;
    default: return false;
  }
}

inline DType to_dtype(at::ScalarType s) {
  DType d;
  TORCH_CHECK(try_dtype(s, &d), "fastar reduces float32, float64, float16 and bfloat16 tensors, not ", s,
              "; use torch.distributed.all_reduce for other dtypes");
  return d;
}

}  // namespace fastar
