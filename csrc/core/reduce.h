// Elementwise sums for the dtypes fastar reduces. Every chunk of a result is reduced by exactly one
// rank in a fixed order and then copied, so ranks end with bitwise identical bytes.
#pragma once
#include <cstddef>
#include <cstdint>
#include "dtype.h"

namespace fastar {

// dst[i] += src[i]
void reduce_sum(DType t, void* dst, const void* src, int64_t n);
// dst[i] = srcs[0][i] + srcs[1][i] + ... (left to right; half types accumulate in float, round once)
void reduce_sum_many(DType t, void* dst, const void* const* srcs, int nsrc, int64_t n);
// memcpy; with streaming (non-temporal) stores when `streaming`, for destinations larger than the
// cache that are not read again soon. Ends with a store fence, so the bytes are visible after it.
void copy_out_stream(void* dst, const void* src, size_t bytes, bool streaming);
// dst[i] *= factor (used for op "avg")
void scale(DType t, void* dst, double factor, int64_t n);

float half_to_float(uint16_t h);
uint16_t float_to_half(float f);
float bf16_to_float(uint16_t h);
uint16_t float_to_bf16(float f);

}  // namespace fastar
