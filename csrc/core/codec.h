// What the executor does with a step's bytes besides moving them. The executor (executor.cpp) is
// the one step loop: it posts a schedule's sends and receives on a Transport and waits for them; a
// Codec says what a sent chunk looks like on the wire, what a received chunk does to the buffer,
// and where scratch memory lives:
//  - HostSum (here): host memory, the buffer's own dtype. Sends leave straight from the buffer;
//    a received chunk is summed in (the byte path over Gloo and the shared-memory rails).
//  - TensorCodec (csrc/torch/tensor_codec): CUDA tensors (fastar's CUDA kernels on fastar's stream)
//    and a compressed wire (fp16/bf16 on the wire, accumulation in the buffer's dtype), on either
//    device.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "dtype.h"
#include "plan.h"

namespace fastar {


class Codec {
 public:
  virtual ~Codec() = default;
  virtual size_t elem_bytes() const = 0;  // an element of the buffer
  virtual size_t wire_bytes() const = 0;  // an element on the wire
  // Whether sends go through encode() (else they leave straight from the buffer, and receives that
  // are not summed land in place).
  virtual bool encodes() const { return false; }
  virtual void encode(void* wire, const void* src, int64_t n) { (void)wire, (void)src, (void)n; }
  virtual void reduce(void* dst, const void* wire, int64_t n) = 0;  // dst += wire
  virtual void decode(void* dst, const void* wire, int64_t n) { (void)dst, (void)wire, (void)n; }
  // After the last step (an encoding codec): every rank rounds its result once to the wire's
  // precision, so that all end with the same bits (the copies they received were rounded).
  virtual void finish(void* data, int64_t n) { (void)data, (void)n; }
  // Scratch i (0, 1: the receive slots; 2: the send staging) of at least `bytes`, on the device.
  virtual char* scratch(int i, size_t bytes) = 0;
};

// Host memory, the buffer's dtype, plain sums.
class HostSum final : public Codec {
 public:
  explicit HostSum(DType t = DType::Float32) : t_(t) {}
  void set_dtype(DType t) { t_ = t; }
  size_t elem_bytes() const override { return dtype_size(t_); }
  size_t wire_bytes() const override { return dtype_size(t_); }
  void reduce(void* dst, const void* wire, int64_t n) override;
  char* scratch(int i, size_t bytes) override {
    auto& b = bufs_[i & 1];
    if (b.size() < bytes) b.resize(bytes);
    return b.data();
  }

 private:
  DType t_;
  std::vector<char> bufs_[2];
};

}  // namespace fastar
