// CUDA halves of the kernels in csrc/torch/kernels.h, one per CPU function. They trust their inputs:
// kernels.cpp checks them once (dtype, contiguity, device, ranges) before it dispatches here.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fastar {

void pack_cuda(const std::vector<at::Tensor>& srcs, at::Tensor& flat, const std::vector<int64_t>& offsets, double scale);
// writes into `out` (an empty tensor of the wire dtype, same numel and device as flat)
void compress_cuda(const at::Tensor& flat, at::Tensor& out);
void decompress_cuda(const at::Tensor& wire, at::Tensor& flat);
void sum_into_cuda(at::Tensor& dst, const at::Tensor& src);

}  // namespace fastar
