// Host-side declarations shared by the CPU implementation (fused_augment_cpu.cpp) and the CUDA one
// (fused_augment_cuda.cu) of the op celldino::fused_multicrop.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace celldino {
namespace aug {

// Largest output side: bounds the tap tables (CUDA shared memory) and keeps int32 pixel counts safe.
constexpr int64_t kMaxOutSize = 1024;

// What validate_batch checked and derived; everything a backend needs besides the raw pointers.
struct Batch {
  int64_t n_images = 0;
  int64_t channels = 0;
  int64_t n_rows = 0;
  int64_t n_global_rows = 0;
  int64_t global_size = 0;
  int64_t local_size = 0;
  int64_t protein_channel = 1;
  double divisor = 1.0;
  at::ScalarType in_dtype = at::kFloat;
  at::ScalarType out_dtype = at::kFloat;
  std::vector<int64_t> heights;
  std::vector<int64_t> widths;
  // per image: does any of its crops apply the protein step (so its channel maxima are needed)?
  std::vector<uint8_t> needs_max;
  bool any_needs_max = false;
};

// Checks every input (dtypes, shapes, devices, parameter values, boxes inside their images) and throws a
// c10::Error naming the offending argument / crop otherwise. crop_int and crop_float must be CPU tensors.
Batch validate_batch(const std::vector<at::Tensor>& images, const at::Tensor& crop_int, const at::Tensor& crop_float,
                     const c10::optional<at::Tensor>& channel_max, int64_t n_global_rows, int64_t global_size,
                     int64_t local_size, int64_t protein_channel, double divisor, at::ScalarType out_dtype);

// The two outputs: global [n_global_rows, C, G, G] and local [N - n_global_rows, C, L, L].
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const Batch& batch, const at::TensorOptions& options);


}  // namespace aug
}  // namespace celldino
