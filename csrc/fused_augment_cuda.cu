// celldino::fused_multicrop, CUDA implementation (registered for the CUDA dispatch key).
//
// Launches (all on the current stream, no host synchronisation):
//   1. only when some crop applies the protein step and no channel_max was given: per-channel maxima of the raw
//      images (grid-stride atomicMax of order-preserving int keys), then a B*C-thread decode to float;
//   2. one launch for all crops: one thread block per output plane (crop x channel). The block recomputes the
//      bilinear sample three times (sum -> contrast mean; contrast moments -> mean/std/range; write) instead of
//      staging the plane, so it needs no scratch memory; the source reads hit L1/L2.
// The per-plane work is the host-device code of multicrop_plane.h, which the CPU tests run through
// `_fused_multicrop_emulated`; the parameter tables are validated on the host (crop_int / crop_float are CPU
// tensors) and uploaded from pinned memory.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "augment_math.h"
#include "fused_augment.h"
#include "multicrop_plane.h"

namespace celldino {
namespace aug {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxThreads = 256;
constexpr int kMaxChunkBlocks = 256;  // grid-stride blocks per (image, channel) plane in the max kernel

// One warp shuffle of each type the block reductions carry (Moments moves field by field).
__device__ __forceinline__ double shfl_down(double v, int offset) { return __shfl_down_sync(0xffffffffu, v, offset); }

__device__ __forceinline__ Moments shfl_down(const Moments& m, int offset) {
  Moments other;
  other.s1 = __shfl_down_sync(0xffffffffu, m.s1, offset);
  other.s2 = __shfl_down_sync(0xffffffffu, m.s2, offset);
  other.lo = __shfl_down_sync(0xffffffffu, m.lo, offset);
  other.hi = __shfl_down_sync(0xffffffffu, m.hi, offset);
  return other;
}

template <class T, class Merge>
__device__ __forceinline__ T warp_reduce(T v, Merge merge) {
  for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_down(v, o));
  return v;
}

// Block-wide reduction, result returned to every thread: each warp reduces by shuffles, then warp 0 merges the
// per-warp partials (its lanes past the last warp hold `identity`). One template, so the contrast sum and the
// self-normalisation moments share the merge order and the barriers.
template <class T, class Merge>
__device__ T block_reduce(T v, T identity, Merge merge) {
  __shared__ T partial[kWarps];
  __shared__ T result;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_reduce(v, merge);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T s = lane < kWarps ? partial[lane] : identity;
    s = warp_reduce(s, merge);
    if (lane == 0) result = s;
  }
  __syncthreads();
  return result;
}

__device__ double block_sum(double v) {
  return block_reduce(v, 0.0, [](double a, double b) { return a + b; });
}

__device__ Moments block_moments(const Moments& m) {
  return block_reduce(m, empty_moments(), [](const Moments& a, const Moments& b) { return merge_moments(a, b); });
}

template <typename In, typename Out>
__global__ void __launch_bounds__(kThreads) multicrop_kernel(LaunchArgs<Out> a) {
  extern __shared__ Tap taps[];  // 2 x max output side
  const PlaneJob<In, Out> job = make_plane_job<In, Out>(a, blockIdx.x);
  const int tid = threadIdx.x, nt = blockDim.x;
  if (job.dropped) {  // uniform over the block: no barrier is skipped by part of it
    phase_zero(job, tid, nt);
    return;
  }
  Tap* xt = taps;
  Tap* yt = taps + job.size;
  fill_taps(job, xt, yt, tid, nt);
  __syncthreads();
  const float mean_before = plane_mean(block_sum(phase_sum(job, xt, yt, tid, nt)), job.size);
  const Moments m = block_moments(phase_moments(job, xt, yt, mean_before, tid, nt));
  const NormStats st = finish_stats(m.s1, m.s2, m.lo, m.hi, mean_before, job.size * job.size);
  phase_write(job, xt, yt, mean_before, st, tid, nt);
}

// Per-(image, channel) maxima as ordered keys: grid (chunks, B*C); keys pre-filled with key(-inf).
template <typename In>
__global__ void __launch_bounds__(kMaxThreads) channel_max_kernel(const int64_t* image_table, int channels, int* keys) {
  const int plane = blockIdx.y;
  const int64_t j = plane / channels;
  const int64_t c = plane - j * channels;
  const int64_t H = image_table[j * 3 + 1], W = image_table[j * 3 + 2];
  const int64_t n = H * W;
  const In* src = reinterpret_cast<const In*>(static_cast<uintptr_t>(image_table[j * 3])) + c * n;
  int best = float_to_key(-INFINITY);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int k = float_to_key(to_float(src[i]));
    best = k > best ? k : best;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const int other = __shfl_down_sync(0xffffffffu, best, o);
    best = other > best ? other : best;
  }
  if ((threadIdx.x & 31) == 0) atomicMax(keys + plane, best);
}

__global__ void decode_keys_kernel(const int* keys, float* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = key_to_float(keys[i]);
}

at::Tensor upload(const at::Tensor& host, const at::Device& device) {
  return host.pin_memory().to(device, /*non_blocking=*/true);
}

template <typename In, typename Out>
void launch(const Batch& b, const LaunchArgs<Out>& args, int64_t max_side, cudaStream_t stream) {
  const int64_t planes = b.n_rows * b.channels;
  if (planes == 0) return;
  TORCH_CHECK(planes < (int64_t{1} << 31), "fused_multicrop (CUDA): too many crop planes: ", planes);
  const size_t smem = static_cast<size_t>(2 * max_side) * sizeof(Tap);
  multicrop_kernel<In, Out><<<static_cast<unsigned>(planes), kThreads, smem, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In>
std::tuple<at::Tensor, at::Tensor> run_cuda(const Batch& b, const std::vector<at::Tensor>& images,
                                            const at::Tensor& crop_int, const at::Tensor& crop_float,
                                            const c10::optional<at::Tensor>& channel_max) {
  const at::Device device = images[0].device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  at::Tensor table_host = at::empty({b.n_images, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* t = table_host.data_ptr<int64_t>();
  for (int64_t j = 0; j < b.n_images; ++j) {
    t[j * 3] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(images[j].data_ptr()));
    t[j * 3 + 1] = b.heights[j];
    t[j * 3 + 2] = b.widths[j];
  }
  const at::Tensor table = upload(table_host, device);
  const at::Tensor ci = upload(crop_int, device);
  const at::Tensor cf = upload(crop_float, device);

  at::Tensor raw_max;
  if (b.any_needs_max) {
    if (channel_max.has_value() && channel_max->defined()) {
      raw_max = *channel_max;
    } else {
      const int64_t planes = b.n_images * b.channels;
      TORCH_CHECK(planes <= 65535, "fused_multicrop (CUDA): B x C = ", planes, " exceeds 65535 (split the batch)");
      at::Tensor keys = at::full({planes}, float_to_key(-INFINITY), at::TensorOptions().dtype(at::kInt).device(device));
      int64_t largest = 1;
      for (int64_t j = 0; j < b.n_images; ++j) largest = std::max(largest, b.heights[j] * b.widths[j]);
      const int64_t chunks = std::min<int64_t>(kMaxChunkBlocks, (largest + kMaxThreads * 8 - 1) / (kMaxThreads * 8));
      const dim3 grid(static_cast<unsigned>(std::max<int64_t>(chunks, 1)), static_cast<unsigned>(planes));
      channel_max_kernel<In><<<grid, kMaxThreads, 0, stream>>>(table.data_ptr<int64_t>(),
                                                                static_cast<int>(b.channels), keys.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      raw_max = at::empty({b.n_images, b.channels}, at::TensorOptions().dtype(at::kFloat).device(device));
      decode_keys_kernel<<<static_cast<unsigned>((planes + 255) / 256), 256, 0, stream>>>(
          keys.data_ptr<int>(), raw_max.data_ptr<float>(), static_cast<int>(planes));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  auto outs = allocate_outputs(b, images[0].options());
  at::Tensor& g = std::get<0>(outs);
  at::Tensor& l = std::get<1>(outs);
  const int64_t max_side = std::max(b.n_global_rows > 0 ? b.global_size : 1,
                                    b.n_rows > b.n_global_rows ? b.local_size : 1);

  auto fill = [&](auto* out_tag) {
    using Out = std::remove_pointer_t<decltype(out_tag)>;
    LaunchArgs<Out> a;
    a.image_table = table.data_ptr<int64_t>();
    a.crop_int = ci.data_ptr<int32_t>();
    a.crop_float = cf.data_ptr<float>();
    a.raw_max = raw_max.defined() ? raw_max.data_ptr<float>() : nullptr;
    a.channels = static_cast<int>(b.channels);
    a.n_global_rows = static_cast<int>(b.n_global_rows);
    a.global_size = static_cast<int>(b.global_size);
    a.local_size = static_cast<int>(b.local_size);
    a.protein_channel = static_cast<int>(b.protein_channel);
    a.divisor = b.divisor;
    a.global_out = reinterpret_cast<Out*>(g.data_ptr());
    a.local_out = reinterpret_cast<Out*>(l.data_ptr());
    launch<In, Out>(b, a, max_side, stream);
  };
  dispatch_out_dtype(b.out_dtype, fill);
  return outs;
}

std::tuple<at::Tensor, at::Tensor> fused_multicrop_cuda(at::TensorList images_list, const at::Tensor& crop_int,
                                                        const at::Tensor& crop_float,
                                                        const c10::optional<at::Tensor>& channel_max,
                                                        int64_t n_global_rows, int64_t global_size,
                                                        int64_t local_size, int64_t protein_channel, double divisor,
                                                        at::ScalarType out_dtype) {
  std::vector<at::Tensor> images(images_list.begin(), images_list.end());
  const Batch b = validate_batch(images, crop_int, crop_float, channel_max, n_global_rows, global_size, local_size,
                                 protein_channel, divisor, out_dtype);
  TORCH_CHECK(images[0].is_cuda(), "fused_multicrop (CUDA): images are on ", images[0].device(),
              "; move them to the GPU or call with CPU images for the CPU implementation");
  TORCH_CHECK(b.n_rows < (int64_t{1} << 31) / std::max<int64_t>(b.channels, 1),
              "fused_multicrop (CUDA): too many crops");
  const c10::cuda::CUDAGuard guard(images[0].device());
  return dispatch_in_dtype(b.in_dtype, [&](auto* tag) {
    return run_cuda<std::remove_pointer_t<decltype(tag)>>(b, images, crop_int, crop_float, channel_max);
  });
}

}  // namespace
}  // namespace aug
}  // namespace celldino

TORCH_LIBRARY_IMPL(celldino, CUDA, m) { m.impl("fused_multicrop", &celldino::aug::fused_multicrop_cuda); }
