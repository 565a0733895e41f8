// The step loop's codec (core/codec.h) for what the byte-level host path does not do: a buffer on
// a GPU (fastar's CUDA kernels: sum_into, compress, decompress, on the current stream, which is
// fastar's communication stream), and a compressed wire (fp16/bf16 on the wire, accumulation in
// the buffer's dtype) on either device.
#pragma once
#include <torch/extension.h>

#include <array>

#include "core/codec.h"

namespace fastar {

class TensorCodec final : public Codec {
 public:
  // buffer: the options of the buffer (dtype, device); wire: the dtype on the wire (the buffer's:
  // no compression). host_scratch: buffers kept across calls on the CPU (a fresh one costs its page
  // faults on every call); on a GPU the caching allocator keeps fresh ones cheap and stream-safe.
  TensorCodec(const at::TensorOptions& buffer, at::ScalarType wire, std::array<at::Tensor, 4>* host_scratch);
  size_t elem_bytes() const override { return elem_; }
  size_t wire_bytes() const override { return wire_size_; }
  bool encodes() const override { return wire_ != dtype_; }
  void encode(void* wire, const void* src, int64_t n) override;
  void reduce(void* dst, const void* wire, int64_t n) override;
  void decode(void* dst, const void* wire, int64_t n) override;
  void finish(void* data, int64_t n) override;
  char* scratch(int i, size_t bytes) override;

 private:
  at::Tensor view(const void* p, int64_t n, at::ScalarType t) const;
  at::Tensor buffer(int i, size_t bytes);
  static void cast(const at::Tensor& from, at::Tensor& to);

  at::TensorOptions opts_;
  at::ScalarType dtype_, wire_;
  size_t elem_, wire_size_;
  std::array<at::Tensor, 4>* host_;
  std::array<at::Tensor, 4> device_;
};

}  // namespace fastar
