// Host-side declarations shared by the CPU implementation (fused_augment_cpu.cpp) and the CUDA one
// (fused_augment_cuda.cu) of the op celldino::fused_multicrop.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <tuple>
#include <type_traits>
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

// The supported dtypes mapped to their C++ types in one place, for every entry point (CPU op, emulated kernel,
// CUDA launch). `f` receives a typed null pointer because a generic lambda cannot take an explicit template
// argument; it recovers the type with `std::remove_pointer_t<decltype(tag)>`. validate_batch rejects every other
// dtype with a message listing the supported ones, so the checks below only guard callers that skipped it.
template <class F>
decltype(auto) dispatch_in_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kByte:
      return f(static_cast<uint8_t*>(nullptr));
    case at::kUInt16:
      return f(static_cast<uint16_t*>(nullptr));
    case at::kFloat:
      return f(static_cast<float*>(nullptr));
    default:
      TORCH_CHECK(false, "fused_multicrop: unsupported input dtype");
  }
}

template <class F>
decltype(auto) dispatch_out_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat:
      return f(static_cast<float*>(nullptr));
    case at::kBFloat16:
      return f(static_cast<at::BFloat16*>(nullptr));
    case at::kHalf:
      return f(static_cast<at::Half*>(nullptr));
    default:
      TORCH_CHECK(false, "fused_multicrop: unsupported out_dtype");
  }
}

}  // namespace aug
}  // namespace celldino
