// celldino._C: the fused Cell-DINO multi-crop augmentation, CPU (OpenMP) implementation, input validation,
// op schema (torch.library, namespace "celldino") and the Python module.
//
// celldino::fused_multicrop(images, crop_int, crop_float, channel_max, n_global_rows, global_size, local_size,
//                           protein_channel, divisor, out_dtype) -> (global_crops, local_crops)
//   images       list of C x H x W contiguous tensors (uint8 / uint16 / float32, same dtype, C and device;
//                sizes may differ). Read in place: no copy, no concatenation.
//   crop_int     int32 [N, 8] CPU: image, top, left, height, width, flip_h, flip_v, drop_channel (-1 none)
//   crop_float   float32 [N, 1 + 2C] CPU: protein factor (-1 = not applied), brightness[C], contrast[C]
//   channel_max  optional float32 [B, C] per-channel maxima of the raw images (computed when omitted and needed)
//   rows [0, n_global_rows) -> global_crops [n_global_rows, C, G, G]; the rest -> local_crops [.., C, L, L]
//   divisor      intensity scale (the raw values are divided by it), out_dtype float32 / bfloat16 / float16.
// Per-pixel arithmetic lives in augment_math.h, shared with the CUDA kernel.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "augment_math.h"
#include "fused_augment.h"
#include "multicrop_plane.h"

namespace celldino {
namespace aug {

namespace {

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

bool supported_input(at::ScalarType t) { return t == at::kByte || t == at::kUInt16 || t == at::kFloat; }
bool supported_output(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

}  // namespace

Batch validate_batch(const std::vector<at::Tensor>& images, const at::Tensor& crop_int, const at::Tensor& crop_float,
                     const c10::optional<at::Tensor>& channel_max, int64_t n_global_rows, int64_t global_size,
                     int64_t local_size, int64_t protein_channel, double divisor, at::ScalarType out_dtype) {
  Batch b;
  TORCH_CHECK(!images.empty(), "fused_multicrop: `images` is empty; need at least one C x H x W image");
  const at::Tensor& first = images[0];
  TORCH_CHECK(first.defined() && first.dim() == 3, "fused_multicrop: images[0] must be a C x H x W tensor, got ",
              first.defined() ? first.sizes() : at::IntArrayRef{});
  TORCH_CHECK(supported_input(first.scalar_type()), "fused_multicrop: images have dtype ",
              dtype_name(first.scalar_type()), "; supported: uint8, uint16, float32 (convert others to float32)");
  b.n_images = static_cast<int64_t>(images.size());
  b.channels = first.size(0);
  b.in_dtype = first.scalar_type();
  TORCH_CHECK(b.channels >= 1, "fused_multicrop: images[0] has no channels");
  for (int64_t j = 0; j < b.n_images; ++j) {
    const at::Tensor& im = images[j];
    TORCH_CHECK(im.defined() && im.dim() == 3, "fused_multicrop: images[", j, "] must be C x H x W, got shape ",
                im.defined() ? im.sizes() : at::IntArrayRef{});
    TORCH_CHECK(im.scalar_type() == b.in_dtype, "fused_multicrop: images[", j, "] has dtype ",
                dtype_name(im.scalar_type()), " but images[0] has ", dtype_name(b.in_dtype),
                " (one dtype per batch)");
    TORCH_CHECK(im.size(0) == b.channels, "fused_multicrop: images[", j, "] has ", im.size(0),
                " channels but images[0] has ", b.channels, " (the crops are stacked: one channel count per batch)");
    TORCH_CHECK(im.device() == first.device(), "fused_multicrop: images[", j, "] is on ", im.device(),
                " but images[0] is on ", first.device());
    TORCH_CHECK(im.is_contiguous(), "fused_multicrop: images[", j, "] is not contiguous (call .contiguous())");
    TORCH_CHECK(im.size(1) >= 1 && im.size(2) >= 1, "fused_multicrop: images[", j, "] has an empty side: ",
                im.sizes());
    TORCH_CHECK(im.size(1) < (int64_t{1} << 31) && im.size(2) < (int64_t{1} << 31),
                "fused_multicrop: images[", j, "] is too large: ", im.sizes());
    b.heights.push_back(im.size(1));
    b.widths.push_back(im.size(2));
  }

  TORCH_CHECK(crop_int.device().is_cpu() && crop_float.device().is_cpu(),
              "fused_multicrop: crop_int / crop_float must be CPU tensors (they are validated on the host)");
  TORCH_CHECK(crop_int.scalar_type() == at::kInt && crop_int.dim() == 2 && crop_int.size(1) == kIntCols &&
                  crop_int.is_contiguous(),
              "fused_multicrop: crop_int must be a contiguous int32 [N, ", static_cast<int>(kIntCols), "] tensor, got ",
              dtype_name(crop_int.scalar_type()), " ", crop_int.sizes());
  b.n_rows = crop_int.size(0);
  const int64_t fcols = float_cols(static_cast<int>(b.channels));
  TORCH_CHECK(crop_float.scalar_type() == at::kFloat && crop_float.dim() == 2 && crop_float.size(0) == b.n_rows &&
                  crop_float.size(1) == fcols && crop_float.is_contiguous(),
              "fused_multicrop: crop_float must be a contiguous float32 [N=", b.n_rows, ", 1 + 2C=", fcols,
              "] tensor, got ", dtype_name(crop_float.scalar_type()), " ", crop_float.sizes());
  TORCH_CHECK(n_global_rows >= 0 && n_global_rows <= b.n_rows, "fused_multicrop: n_global_rows=", n_global_rows,
              " must lie in [0, N=", b.n_rows, "]");
  b.n_global_rows = n_global_rows;
  if (n_global_rows > 0) {
    TORCH_CHECK(global_size >= 1 && global_size <= kMaxOutSize, "fused_multicrop: global_size=", global_size,
                " must lie in [1, ", kMaxOutSize, "]");
  }
  if (b.n_rows - n_global_rows > 0) {
    TORCH_CHECK(local_size >= 1 && local_size <= kMaxOutSize, "fused_multicrop: local_size=", local_size,
                " must lie in [1, ", kMaxOutSize, "]");
  }
  b.global_size = std::max<int64_t>(global_size, 1);
  b.local_size = std::max<int64_t>(local_size, 1);
  TORCH_CHECK(protein_channel >= 0, "fused_multicrop: protein_channel=", protein_channel, " must be >= 0");
  b.protein_channel = protein_channel;
  TORCH_CHECK(std::isfinite(divisor) && divisor > 0.0, "fused_multicrop: divisor=", divisor,
              " must be a positive finite number (use 1 for no intensity scaling)");
  b.divisor = divisor;
  TORCH_CHECK(supported_output(out_dtype), "fused_multicrop: out_dtype ", dtype_name(out_dtype),
              " not supported; use float32, bfloat16 or float16");
  b.out_dtype = out_dtype;

  if (channel_max.has_value() && channel_max->defined()) {
    const at::Tensor& m = *channel_max;
    TORCH_CHECK(m.scalar_type() == at::kFloat && m.dim() == 2 && m.size(0) == b.n_images &&
                    m.size(1) == b.channels && m.is_contiguous(),
                "fused_multicrop: channel_max must be a contiguous float32 [B=", b.n_images, ", C=", b.channels,
                "] tensor, got ", dtype_name(m.scalar_type()), " ", m.sizes());
    TORCH_CHECK(m.device() == first.device(), "fused_multicrop: channel_max is on ", m.device(),
                " but the images are on ", first.device());
  }

  b.needs_max.assign(static_cast<size_t>(b.n_images), 0);
  const int32_t* ci = crop_int.data_ptr<int32_t>();
  const float* cf = crop_float.data_ptr<float>();
  const bool protein_possible = b.channels >= 2 && protein_channel < b.channels;
  for (int64_t r = 0; r < b.n_rows; ++r) {
    const int32_t* row = ci + r * kIntCols;
    const int64_t img = row[kColImage];
    TORCH_CHECK(img >= 0 && img < b.n_images, "fused_multicrop: crop ", r, ": image index ", img,
                " outside [0, ", b.n_images, ")");
    const int64_t top = row[kColTop], left = row[kColLeft], h = row[kColHeight], w = row[kColWidth];
    const int64_t H = b.heights[img], W = b.widths[img];
    TORCH_CHECK(top >= 0 && left >= 0 && h >= 1 && w >= 1 && top + h <= H && left + w <= W, "fused_multicrop: crop ",
                r, ": box (top=", top, ", left=", left, ", height=", h, ", width=", w, ") outside image ", img,
                " of size ", H, " x ", W);
    TORCH_CHECK((row[kColFlipH] == 0 || row[kColFlipH] == 1) && (row[kColFlipV] == 0 || row[kColFlipV] == 1),
                "fused_multicrop: crop ", r, ": flips must be 0 or 1, got (", row[kColFlipH], ", ", row[kColFlipV],
                ")");
    TORCH_CHECK(row[kColDrop] >= -1 && row[kColDrop] < b.channels, "fused_multicrop: crop ", r, ": drop_channel ",
                row[kColDrop], " outside [-1, C=", b.channels, ")");
    if (protein_possible && cf[r * fcols] >= 0.0f) {
      b.needs_max[img] = 1;
      b.any_needs_max = true;
    }
  }
  return b;
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const Batch& b, const at::TensorOptions& options) {
  const auto opts = options.dtype(b.out_dtype);
  at::Tensor g = at::empty({b.n_global_rows, b.channels, b.global_size, b.global_size}, opts);
  at::Tensor l = at::empty({b.n_rows - b.n_global_rows, b.channels, b.local_size, b.local_size}, opts);
  return {g, l};
}

namespace {

int cpu_threads() {
#ifdef _OPENMP
  // torch's thread setting (torch.set_num_threads; 1 inside DataLoader workers); never nest inside a parallel
  // region of the caller.
  return at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
#else
  return 1;
#endif
}

// Per-channel maxima of the raw values of the images that need them ([B, C], float; others left at 0).
template <typename In>
std::vector<float> channel_maxima_cpu(const Batch& b, const std::vector<const In*>& src) {
  std::vector<float> out(static_cast<size_t>(b.n_images * b.channels), 0.0f);
  const int64_t items = b.n_images * b.channels;
  const int threads = cpu_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && items > 1)
  for (int64_t it = 0; it < items; ++it) {
    const int64_t j = it / b.channels, c = it % b.channels;
    if (!b.needs_max[j]) continue;
    const int64_t n = b.heights[j] * b.widths[j];
    const In* p = src[j] + c * n;
    In m = p[0];
    for (int64_t i = 1; i < n; ++i) m = p[i] > m ? p[i] : m;
    out[it] = to_float(m);
  }
  return out;
}

// Sums over blocks of kBlock floats use SIMD float partial sums (few terms per lane, so the rounding stays at a
// few 1e-8 relative), flushed into double: vectorised and about as accurate as a double accumulation.
constexpr int64_t kBlock = 64;

double sum_blocks(const float* x, int64_t n) {
  double total = 0.0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float a = 0.0f;
#pragma omp simd reduction(+ : a)
    for (int64_t i = start; i < end; ++i) a += x[i];
    total += static_cast<double>(a);
  }
  return total;
}

// Contrast in place, then the shifted sums and the range that self-normalisation needs.
NormStats contrast_and_stats(float* x, int64_t n, float contrast, float mean_before) {
  const float offset = contrast_offset(contrast, mean_before);
  const float shift = mean_before;
  double s1 = 0.0, s2 = 0.0;
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t end = std::min(n, start + kBlock);
    float a1 = 0.0f, a2 = 0.0f;
#pragma omp simd reduction(+ : a1, a2) reduction(min : lo) reduction(max : hi)
    for (int64_t i = start; i < end; ++i) {
      const float y = contrast_pixel(x[i], contrast, offset);
      x[i] = y;
      const float d = y - shift;
      a1 += d;
      a2 += d * d;
      lo = std::min(lo, y);
      hi = std::max(hi, y);
    }
    s1 += static_cast<double>(a1);
    s2 += static_cast<double>(a2);
  }
  return finish_stats(s1, s2, lo, hi, mean_before, static_cast<int>(n));
}

// Source rows interpolated horizontally at every output column, two at a time: the bilinear sample is
// lerp(row lerp of y0, row lerp of y1) (augment_math.h), so each source row's lerps are computed once and reused
// by every output row that reads it (output rows visit source rows monotonically, so two slots suffice).
template <typename In>
class RowCache {
 public:
  RowCache(const In* base, int64_t stride, const Tap* xtaps, int size, float* storage)
      : base_(base), stride_(stride), xtaps_(xtaps), size_(size) {
    buf_[0] = storage;
    buf_[1] = storage + size;
  }

  // The lerped source row `want`; never evicts row `keep` (the other row the current output row needs).
  const float* get(int want, int keep) {
    if (idx_[0] == want) return buf_[0];
    if (idx_[1] == want) return buf_[1];
    const int slot = idx_[0] == keep ? 1 : 0;
    const In* src = base_ + static_cast<int64_t>(want) * stride_;
    float* dst = buf_[slot];
    for (int ox = 0; ox < size_; ++ox) {
      const Tap t = xtaps_[ox];
      dst[ox] = lerp(to_float(src[t.i0]), to_float(src[t.i1]), t.w0, t.w1);
    }
    idx_[slot] = want;
    return dst;
  }

 private:
  const In* base_;
  int64_t stride_;
  const Tap* xtaps_;
  int size_;
  float* buf_[2];
  int idx_[2] = {-1, -1};
};

template <typename In, typename Out>
void multicrop_cpu(const Batch& b, const std::vector<const In*>& src, const float* raw_max, const int32_t* ci,
                   const float* cf, Out* gout, Out* lout) {
  const int64_t C = b.channels;
  const int64_t fcols = float_cols(static_cast<int>(C));
  const int64_t items = b.n_rows * C;
  const int64_t max_side = std::max(b.n_global_rows > 0 ? b.global_size : 1,
                                    b.n_rows > b.n_global_rows ? b.local_size : 1);
  const int threads = cpu_threads();
#pragma omp parallel num_threads(threads) if (threads > 1 && items > 1)
  {
    std::vector<float> scratch(static_cast<size_t>(max_side * max_side));
    std::vector<Tap> xtaps(static_cast<size_t>(max_side)), ytaps(static_cast<size_t>(max_side));
    std::vector<float> rowbuf(static_cast<size_t>(2 * max_side));
    // Crop-major rows put every global crop first: dynamic scheduling then starts the biggest items first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {
      const int64_t r = it / C, c = it % C;
      const bool global = r < b.n_global_rows;
      const int S = static_cast<int>(global ? b.global_size : b.local_size);
      const int64_t plane = static_cast<int64_t>(S) * S;
      Out* out = global ? gout + (r * C + c) * plane : lout + ((r - b.n_global_rows) * C + c) * plane;
      const int32_t* row = ci + r * kIntCols;
      const float* frow = cf + r * fcols;
      const int64_t j = row[kColImage];
      const int drop = row[kColDrop];
      if (c == drop) {  // the reference zeroes the channel: constant -> exactly 0 after self-normalisation
        std::fill(out, out + plane, static_cast<Out>(0.0f));
        continue;
      }
      const int top = row[kColTop], left = row[kColLeft], h = row[kColHeight], w = row[kColWidth];
      const float factor = frow[0];
      const double peak = b.needs_max[j] ? protein_peak(raw_max + j * C, static_cast<int>(C), drop,
                                                        static_cast<int>(b.protein_channel), factor, b.divisor)
                                         : 0.0;
      const float gain = channel_gain(static_cast<int>(c), drop, static_cast<int>(b.protein_channel), factor, peak,
                                      b.divisor, frow[1 + c]);
      const float contrast = frow[1 + C + c];
      for (int o = 0; o < S; ++o) {
        xtaps[o] = linear_tap(unflip(o, S, row[kColFlipH] != 0), w, S);
        ytaps[o] = linear_tap(unflip(o, S, row[kColFlipV] != 0), h, S);
      }
      const int64_t W = b.widths[j];
      const In* base = src[j] + c * b.heights[j] * W + static_cast<int64_t>(top) * W + left;
      float* x = scratch.data();
      RowCache<In> rows(base, W, xtaps.data(), S, rowbuf.data());
      double total = 0.0;
      for (int oy = 0; oy < S; ++oy) {
        const Tap ty = ytaps[oy];
        const float* h0 = rows.get(ty.i0, ty.i1);
        const float* h1 = ty.i1 == ty.i0 ? h0 : rows.get(ty.i1, ty.i0);
        float* xr = x + static_cast<int64_t>(oy) * S;
#pragma omp simd
        for (int ox = 0; ox < S; ++ox) xr[ox] = brightness_pixel(lerp(h0[ox], h1[ox], ty.w0, ty.w1), gain);
        total += sum_blocks(xr, S);
      }
      const float mean_before = static_cast<float>(total / static_cast<double>(plane));
      const NormStats st = contrast_and_stats(x, plane, contrast, mean_before);
      for (int64_t i = 0; i < plane; ++i) out[i] = static_cast<Out>(normalize_pixel(x[i], st));
    }
  }
}

template <typename In>
std::tuple<at::Tensor, at::Tensor> run_cpu(const Batch& b, const std::vector<at::Tensor>& images,
                                           const at::Tensor& crop_int, const at::Tensor& crop_float,
                                           const c10::optional<at::Tensor>& channel_max) {
  std::vector<const In*> src;
  src.reserve(images.size());
  for (const auto& im : images) src.push_back(im.data_ptr<In>());
  std::vector<float> computed;
  const float* raw_max = nullptr;
  if (b.any_needs_max) {
    if (channel_max.has_value() && channel_max->defined()) {
      raw_max = channel_max->data_ptr<float>();
    } else {
      computed = channel_maxima_cpu<In>(b, src);
      raw_max = computed.data();
    }
  }
  auto outs = allocate_outputs(b, images[0].options());
  at::Tensor& g = std::get<0>(outs);
  at::Tensor& l = std::get<1>(outs);
  const int32_t* ci = crop_int.data_ptr<int32_t>();
  const float* cf = crop_float.data_ptr<float>();
  dispatch_out_dtype(b.out_dtype, [&](auto* tag) {
    using Out = std::remove_pointer_t<decltype(tag)>;
    multicrop_cpu<In, Out>(b, src, raw_max, ci, cf, g.data_ptr<Out>(), l.data_ptr<Out>());
  });
  return outs;
}

std::tuple<at::Tensor, at::Tensor> fused_multicrop_cpu(at::TensorList images_list, const at::Tensor& crop_int,
                                                       const at::Tensor& crop_float,
                                                       const c10::optional<at::Tensor>& channel_max,
                                                       int64_t n_global_rows, int64_t global_size,
                                                       int64_t local_size, int64_t protein_channel, double divisor,
                                                       at::ScalarType out_dtype) {
  std::vector<at::Tensor> images(images_list.begin(), images_list.end());
  const Batch b = validate_batch(images, crop_int, crop_float, channel_max, n_global_rows, global_size, local_size,
                                 protein_channel, divisor, out_dtype);
  TORCH_CHECK(images[0].device().is_cpu(), "fused_multicrop (CPU): images are on ", images[0].device());
  return dispatch_in_dtype(b.in_dtype, [&](auto* tag) {
    return run_cpu<std::remove_pointer_t<decltype(tag)>>(b, images, crop_int, crop_float, channel_max);
  });
}


// ---------------------------------------------------------------------------------------------------------------
// The CUDA kernel's per-plane code (multicrop_plane.h) run on the CPU, one emulated thread block per plane with
// its threads executed one after the other between the block's barriers; the channel maxima go through the same
// order-preserving keys as the GPU's atomicMax. Used by the tests to check the kernel logic without a GPU.

template <typename In, typename Out>
void emulate_kernel(const Batch& b, const std::vector<at::Tensor>& images, const int32_t* ci, const float* cf,
                    const float* given_max, Out* gout, Out* lout, int nthreads) {
  std::vector<int64_t> table(static_cast<size_t>(b.n_images * 3));
  for (int64_t j = 0; j < b.n_images; ++j) {
    table[j * 3] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(images[j].data_ptr()));
    table[j * 3 + 1] = b.heights[j];
    table[j * 3 + 2] = b.widths[j];
  }
  std::vector<float> maxima;
  const float* raw_max = nullptr;
  if (b.any_needs_max) {
    if (given_max != nullptr) {
      raw_max = given_max;
    } else {  // as channel_max_kernel + decode_keys_kernel: every image, max of keys
      maxima.resize(static_cast<size_t>(b.n_images * b.channels));
      for (int64_t j = 0; j < b.n_images; ++j) {
        const int64_t n = b.heights[j] * b.widths[j];
        for (int64_t c = 0; c < b.channels; ++c) {
          const In* p = images[j].data_ptr<In>() + c * n;
          int best = float_to_key(-INFINITY);
          for (int64_t i = 0; i < n; ++i) best = std::max(best, float_to_key(to_float(p[i])));
          maxima[j * b.channels + c] = key_to_float(best);
        }
      }
      raw_max = maxima.data();
    }
  }
  LaunchArgs<Out> a;
  a.image_table = table.data();
  a.crop_int = ci;
  a.crop_float = cf;
  a.raw_max = raw_max;
  a.channels = static_cast<int>(b.channels);
  a.n_global_rows = static_cast<int>(b.n_global_rows);
  a.global_size = static_cast<int>(b.global_size);
  a.local_size = static_cast<int>(b.local_size);
  a.protein_channel = static_cast<int>(b.protein_channel);
  a.divisor = b.divisor;
  a.global_out = gout;
  a.local_out = lout;
  std::vector<Tap> xt(static_cast<size_t>(kMaxOutSize)), yt(static_cast<size_t>(kMaxOutSize));
  for (int64_t plane = 0; plane < b.n_rows * b.channels; ++plane) {
    const PlaneJob<In, Out> job = make_plane_job<In, Out>(a, plane);
    if (job.dropped) {
      for (int tid = 0; tid < nthreads; ++tid) phase_zero(job, tid, nthreads);
      continue;
    }
    for (int tid = 0; tid < nthreads; ++tid) fill_taps(job, xt.data(), yt.data(), tid, nthreads);
    double total = 0.0;
    for (int tid = 0; tid < nthreads; ++tid) total += phase_sum(job, xt.data(), yt.data(), tid, nthreads);
    const float mean_before = plane_mean(total, job.size);
    Moments m = empty_moments();
    for (int tid = 0; tid < nthreads; ++tid)
      m = merge_moments(m, phase_moments(job, xt.data(), yt.data(), mean_before, tid, nthreads));
    const NormStats st = finish_stats(m.s1, m.s2, m.lo, m.hi, mean_before, job.size * job.size);
    for (int tid = 0; tid < nthreads; ++tid)
      phase_write(job, xt.data(), yt.data(), mean_before, st, tid, nthreads);
  }
}

template <typename In>
std::tuple<at::Tensor, at::Tensor> run_emulated(const Batch& b, const std::vector<at::Tensor>& images,
                                                const at::Tensor& crop_int, const at::Tensor& crop_float,
                                                const c10::optional<at::Tensor>& channel_max, int nthreads) {
  auto outs = allocate_outputs(b, images[0].options());
  at::Tensor& g = std::get<0>(outs);
  at::Tensor& l = std::get<1>(outs);
  const float* given = channel_max.has_value() && channel_max->defined() ? channel_max->data_ptr<float>() : nullptr;
  const int32_t* ci = crop_int.data_ptr<int32_t>();
  const float* cf = crop_float.data_ptr<float>();
  dispatch_out_dtype(b.out_dtype, [&](auto* tag) {
    using Out = std::remove_pointer_t<decltype(tag)>;
    emulate_kernel<In, Out>(b, images, ci, cf, given, g.data_ptr<Out>(), l.data_ptr<Out>(), nthreads);
  });
  return outs;
}

std::tuple<at::Tensor, at::Tensor> fused_multicrop_emulated(at::TensorList images_list, const at::Tensor& crop_int,
                                                            const at::Tensor& crop_float,
                                                            const c10::optional<at::Tensor>& channel_max,
                                                            int64_t n_global_rows, int64_t global_size,
                                                            int64_t local_size, int64_t protein_channel,
                                                            double divisor, at::ScalarType out_dtype,
                                                            int64_t threads_per_block) {
  std::vector<at::Tensor> images(images_list.begin(), images_list.end());
  const Batch b = validate_batch(images, crop_int, crop_float, channel_max, n_global_rows, global_size, local_size,
                                 protein_channel, divisor, out_dtype);
  TORCH_CHECK(images[0].device().is_cpu(), "_fused_multicrop_emulated runs on CPU tensors");
  TORCH_CHECK(threads_per_block >= 1 && threads_per_block <= 1024, "threads_per_block must lie in [1, 1024]");
  const int nt = static_cast<int>(threads_per_block);
  return dispatch_in_dtype(b.in_dtype, [&](auto* tag) {
    return run_emulated<std::remove_pointer_t<decltype(tag)>>(b, images, crop_int, crop_float, channel_max, nt);
  });
}

}  // namespace

}  // namespace aug
}  // namespace celldino

TORCH_LIBRARY_FRAGMENT(celldino, m) {
  m.def(
      "fused_multicrop(Tensor[] images, Tensor crop_int, Tensor crop_float, Tensor? channel_max, "
      "int n_global_rows, int global_size, int local_size, int protein_channel, float divisor, "
      "ScalarType out_dtype) -> (Tensor, Tensor)");
  // test helper: the CUDA kernel's code run on the CPU (see multicrop_plane.h)
  m.def(
      "_fused_multicrop_emulated(Tensor[] images, Tensor crop_int, Tensor crop_float, Tensor? channel_max, "
      "int n_global_rows, int global_size, int local_size, int protein_channel, float divisor, "
      "ScalarType out_dtype, int threads_per_block) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(celldino, CPU, m) {
  m.impl("fused_multicrop", &celldino::aug::fused_multicrop_cpu);
  m.impl("_fused_multicrop_emulated", &celldino::aug::fused_multicrop_emulated);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "celldino fused multi-crop augmentation (op: torch.ops.celldino.fused_multicrop)";
#ifdef CELLDINO_WITH_CUDA
  m.attr("__version__") = "0.1.0+cpu.cuda";
  m.def("has_cuda", []() { return true; }, "True when the CUDA implementation was compiled in");
#else
  m.attr("__version__") = "0.1.0+cpu";
  m.def("has_cuda", []() { return false; }, "True when the CUDA implementation was compiled in");
#endif
  m.def("has_openmp", []() {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  }, "True when the CPU implementation was compiled with OpenMP");
  m.attr("max_out_size") = celldino::aug::kMaxOutSize;
}
