// The CUDA kernel's work, written as host-device phase functions over one output plane (one crop x channel),
// so that the exact same code runs (a) in the CUDA kernel, one thread block per plane, and (b) on the CPU in
// `_fused_multicrop_emulated`, which loops over the block's thread ids serially. The tests compare (b) with the
// CPU implementation, which checks the kernel's indexing, addressing and phase structure without a GPU; only
// the block reductions' summation order and the launch itself are CUDA-only.
#pragma once

#include "augment_math.h"

namespace celldino {
namespace aug {

// Arguments of one launch (everything lives on the device executing the kernel).
template <typename Out>
struct LaunchArgs {
  const int64_t* image_table;  // [B, 3]: data address, height, width
  const int32_t* crop_int;     // [N, kIntCols]
  const float* crop_float;     // [N, 1 + 2C]
  const float* raw_max;        // [B, C] raw per-channel maxima, or null when no crop applies the protein step
  int channels;
  int n_global_rows;
  int global_size;
  int local_size;
  int protein_channel;
  double divisor;
  Out* global_out;
  Out* local_out;
};

// Per-plane quantities every thread derives identically from the tables.
template <typename In, typename Out>
struct PlaneJob {
  const In* src;      // the crop box's top-left pixel in the source channel plane
  int64_t src_stride; // source row stride (image width)
  int box_h;
  int box_w;
  bool flip_h;
  bool flip_v;
  int size;           // output side S
  bool dropped;       // the channel is zeroed: output exactly 0
  float gain;
  float contrast;
  Out* out;           // S x S output plane
};

template <typename In, typename Out>
CD_HD PlaneJob<In, Out> make_plane_job(const LaunchArgs<Out>& a, int64_t plane) {
  const int C = a.channels;
  const int64_t r = plane / C;
  const int c = static_cast<int>(plane - r * C);
  const int32_t* row = a.crop_int + r * kIntCols;
  const float* frow = a.crop_float + r * float_cols(C);
  const int64_t j = row[kColImage];
  const int64_t H = a.image_table[j * 3 + 1], W = a.image_table[j * 3 + 2];
  const In* base = reinterpret_cast<const In*>(static_cast<uintptr_t>(a.image_table[j * 3]));
  PlaneJob<In, Out> job;
  const bool global = r < a.n_global_rows;
  job.size = global ? a.global_size : a.local_size;
  const int64_t area = static_cast<int64_t>(job.size) * job.size;
  job.out = global ? a.global_out + (r * C + c) * area : a.local_out + ((r - a.n_global_rows) * C + c) * area;
  job.src = base + c * H * W + static_cast<int64_t>(row[kColTop]) * W + row[kColLeft];
  job.src_stride = W;
  job.box_h = row[kColHeight];
  job.box_w = row[kColWidth];
  job.flip_h = row[kColFlipH] != 0;
  job.flip_v = row[kColFlipV] != 0;
  const int drop = row[kColDrop];
  job.dropped = c == drop;
  const float factor = frow[0];
  const double peak =
      a.raw_max != nullptr ? protein_peak(a.raw_max + j * C, C, drop, a.protein_channel, factor, a.divisor) : 0.0;
  job.gain = channel_gain(c, drop, a.protein_channel, factor, peak, a.divisor, frow[1 + c]);
  job.contrast = frow[1 + C + c];
  return job;
}

// Taps of every output column / row, flips folded in (filled cooperatively: thread tid of nthreads).
template <typename In, typename Out>
CD_HD void fill_taps(const PlaneJob<In, Out>& job, Tap* xtaps, Tap* ytaps, int tid, int nthreads) {
  for (int o = tid; o < job.size; o += nthreads) {
    xtaps[o] = linear_tap(unflip(o, job.size, job.flip_h), job.box_w, job.size);
    ytaps[o] = linear_tap(unflip(o, job.size, job.flip_v), job.box_h, job.size);
  }
}

// Output pixel p after resize, flips, drop / scale / protein / brightness and the clamp.
template <typename In, typename Out>
CD_HD float bright_value(const PlaneJob<In, Out>& job, const Tap* xtaps, const Tap* ytaps, int p) {
  const int oy = p / job.size;
  const int ox = p - oy * job.size;
  const Tap tx = xtaps[ox], ty = ytaps[oy];
  const In* r0 = job.src + static_cast<int64_t>(ty.i0) * job.src_stride;
  const In* r1 = job.src + static_cast<int64_t>(ty.i1) * job.src_stride;
  const float v = bilinear(to_float(r0[tx.i0]), to_float(r0[tx.i1]), to_float(r1[tx.i0]), to_float(r1[tx.i1]),
                           tx.w0, tx.w1, ty.w0, ty.w1);
  return brightness_pixel(v, job.gain);
}

// Phase 1: this thread's part of the sum of the brightness-stage values (-> the contrast mean).
template <typename In, typename Out>
CD_HD double phase_sum(const PlaneJob<In, Out>& job, const Tap* xt, const Tap* yt, int tid, int nthreads) {
  const int n = job.size * job.size;
  double s = 0.0;
  for (int p = tid; p < n; p += nthreads) s += static_cast<double>(bright_value(job, xt, yt, p));
  return s;
}

// Phase 2: this thread's shifted sums and range of the contrast-stage values.
struct Moments {
  double s1;
  double s2;
  float lo;
  float hi;
};

CD_HD Moments empty_moments() {
  Moments m;
  m.s1 = 0.0;
  m.s2 = 0.0;
  m.lo = INFINITY;
  m.hi = -INFINITY;
  return m;
}

CD_HD Moments merge_moments(const Moments& a, const Moments& b) {
  Moments m;
  m.s1 = a.s1 + b.s1;
  m.s2 = a.s2 + b.s2;
  m.lo = b.lo < a.lo ? b.lo : a.lo;
  m.hi = b.hi > a.hi ? b.hi : a.hi;
  return m;
}

template <typename In, typename Out>
CD_HD Moments phase_moments(const PlaneJob<In, Out>& job, const Tap* xt, const Tap* yt, float mean_before, int tid,
                            int nthreads) {
  const int n = job.size * job.size;
  const float offset = contrast_offset(job.contrast, mean_before);
  const double shift = static_cast<double>(mean_before);
  Moments m = empty_moments();
  for (int p = tid; p < n; p += nthreads) {
    const float y = contrast_pixel(bright_value(job, xt, yt, p), job.contrast, offset);
    const double d = static_cast<double>(y) - shift;
    m.s1 += d;
    m.s2 += d * d;
    m.lo = y < m.lo ? y : m.lo;
    m.hi = y > m.hi ? y : m.hi;
  }
  return m;
}

CD_HD float plane_mean(double sum, int size) { return static_cast<float>(sum / (static_cast<double>(size) * size)); }

// Phase 3: write this thread's normalised output pixels (or zeros for a dropped channel).
template <typename In, typename Out>
CD_HD void phase_write(const PlaneJob<In, Out>& job, const Tap* xt, const Tap* yt, float mean_before,
                       const NormStats& st, int tid, int nthreads) {
  const int n = job.size * job.size;
  const float offset = contrast_offset(job.contrast, mean_before);
  for (int p = tid; p < n; p += nthreads) {
    const float y = contrast_pixel(bright_value(job, xt, yt, p), job.contrast, offset);
    job.out[p] = static_cast<Out>(normalize_pixel(y, st));
  }
}

template <typename In, typename Out>
CD_HD void phase_zero(const PlaneJob<In, Out>& job, int tid, int nthreads) {
  const int n = job.size * job.size;
  for (int p = tid; p < n; p += nthreads) job.out[p] = static_cast<Out>(0.0f);
}

}  // namespace aug
}  // namespace celldino
