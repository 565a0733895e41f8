#include "reduce.h"

#include <cstring>
#include <stdexcept>
#if defined(__x86_64__)
#include <emmintrin.h>
#endif

namespace fastar {

float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400) == 0) { mant <<= 1; --exp; }
      mant &= 0x3ff;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) {  // inf or nan
    return (uint16_t)(sign | 0x7c00 | (absx > 0x7f800000u ? 0x200 | ((absx >> 13) & 0x3ff) : 0));
  }
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);  // rounds to inf
  if (absx < 0x38800000u) {                                    // subnormal or zero in half
    if (absx < 0x33000000u) return (uint16_t)sign;             // below half the smallest subnormal
    uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e;  // 113 - e + 13
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return (uint16_t)(sign | r);
  }
  uint32_t r = ((absx >> 13) - ((127 - 15) << 10));
  uint32_t rem = absx & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) ++r;
  return (uint16_t)(sign | r);
}

float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40);  // quiet nan
  uint32_t lsb = (x >> 16) & 1;
  x += 0x7fff + lsb;
  return (uint16_t)(x >> 16);
}

namespace {

template <typename T>
void sum_native(T* __restrict d, const T* __restrict s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] += s[i];
}

template <typename T>
void sum_many_native(T* d, const void* const* srcs, int nsrc, int64_t n) {
  if (nsrc == 1) {
    if (d != srcs[0]) std::memmove(d, srcs[0], (size_t)n * sizeof(T));
    return;
  }
  constexpr int64_t kBlock = 1024;  // stay in L1 while walking all sources
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    T acc[kBlock];
    const T* s0 = static_cast<const T*>(srcs[0]);
    for (int64_t i = b; i < e; ++i) acc[i - b] = s0[i];
    for (int k = 1; k + 1 < nsrc; ++k) {
      const T* __restrict sk = static_cast<const T*>(srcs[k]);
      for (int64_t i = b; i < e; ++i) acc[i - b] += sk[i];
    }
    // The last source is added on the way out: one pass less over the block. d may be any of the
    // sources (an in-place sum): element i of every source is read before d[i] is written.
    const T* sl = static_cast<const T*>(srcs[nsrc - 1]);
    for (int64_t i = b; i < e; ++i) d[i] = acc[i - b] + sl[i];
  }
}

template <float (*ToF)(uint16_t), uint16_t (*FromF)(float)>
void sum_16(uint16_t* d, const uint16_t* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) d[i] = FromF(ToF(d[i]) + ToF(s[i]));
}

template <float (*ToF)(uint16_t), uint16_t (*FromF)(float)>
void sum_many_16(uint16_t* d, const void* const* srcs, int nsrc, int64_t n) {
  constexpr int64_t kBlock = 1024;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    float acc[kBlock];
    const uint16_t* s0 = static_cast<const uint16_t*>(srcs[0]);
    for (int64_t i = b; i < e; ++i) acc[i - b] = ToF(s0[i]);
    for (int k = 1; k < nsrc; ++k) {
      const uint16_t* sk = static_cast<const uint16_t*>(srcs[k]);
      for (int64_t i = b; i < e; ++i) acc[i - b] += ToF(sk[i]);
    }
    for (int64_t i = b; i < e; ++i) d[i] = FromF(acc[i - b]);
  }
}

}  // namespace

void reduce_sum(DType t, void* dst, const void* src, int64_t n) {
  switch (t) {
    case DType::Float32: return sum_native(static_cast<float*>(dst), static_cast<const float*>(src), n);
    case DType::Float64: return sum_native(static_cast<double*>(dst), static_cast<const double*>(src), n);
    case DType::Float16:
      return sum_16<half_to_float, float_to_half>(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), n);
    case DType::BFloat16:
      return sum_16<bf16_to_float, float_to_bf16>(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(src), n);
    case DType::Bytes: break;  // moved, never summed
  }
  throw std::invalid_argument("fastar: reduce_sum: unknown dtype");
}

void reduce_sum_many(DType t, void* dst, const void* const* srcs, int nsrc, int64_t n) {
  if (nsrc <= 0) return;
  switch (t) {
    case DType::Float32: return sum_many_native(static_cast<float*>(dst), srcs, nsrc, n);
    case DType::Float64: return sum_many_native(static_cast<double*>(dst), srcs, nsrc, n);
    case DType::Float16:
      return sum_many_16<half_to_float, float_to_half>(static_cast<uint16_t*>(dst), srcs, nsrc, n);
    case DType::BFloat16:
      return sum_many_16<bf16_to_float, float_to_bf16>(static_cast<uint16_t*>(dst), srcs, nsrc, n);
    case DType::Bytes: break;  // moved, never summed
  }
  throw std::invalid_argument("fastar: reduce_sum_many: unknown dtype");
}

void copy_out_stream(void* dst, const void* src, size_t bytes, bool streaming) {
#if defined(__x86_64__)
  if (streaming && bytes >= 256) {
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    const size_t head = (16 - ((uintptr_t)d & 15)) & 15;  // align the destination to 16 bytes
    std::memcpy(d, s, head);
    d += head;
    s += head;
    bytes -= head;
    size_t i = 0;
    for (; i + 64 <= bytes; i += 64) {
      const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i));
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 16));
      const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 32));
      const __m128i e = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i + 48));
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), a);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 16), b);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 32), c);
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i + 48), e);
    }
    std::memcpy(d + i, s + i, bytes - i);
    _mm_sfence();
    return;
  }
#endif
  (void)streaming;
  std::memcpy(dst, src, bytes);
}

void scale(DType t, void* dst, double factor, int64_t n) {
  switch (t) {
    case DType::Float32: {
      float* d = static_cast<float*>(dst);
      const float f = (float)factor;
      for (int64_t i = 0; i < n; ++i) d[i] *= f;
      return;
    }
    case DType::Float64: {
      double* d = static_cast<double*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] *= factor;
      return;
    }
    case DType::Float16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_half(half_to_float(d[i]) * (float)factor);
      return;
    }
    case DType::BFloat16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int64_t i = 0; i < n; ++i) d[i] = float_to_bf16(bf16_to_float(d[i]) * (float)factor);
      return;
    }
    case DType::Bytes: break;  // moved, never summed
  }
  throw std::invalid_argument("fastar: scale: unknown dtype");
}

}  // namespace fastar
