// The torch dtype of a tensor as the core's DType, in one place for csrc/torch: fastar reduces the
// four floating types; anything else is an error that says what to use instead.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "core/dtype.h"

namespace fastar {

inline DType to_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return DType::Float32;
    case at::kDouble: return DType::Float64;
    case at::kHalf: return DType::Float16;
    case at::kBFloat16: return DType::BFloat16;
    default:
      TORCH_CHECK(false, "fastar reduces float32, float64, float16 and bfloat16 tensors, not ", s,
                  "; use torch.distributed.all_reduce for other dtypes");
  }
}

}  // namespace fastar
