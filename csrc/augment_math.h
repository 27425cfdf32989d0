// Per-pixel arithmetic of the fused Cell-DINO multi-crop augmentation, shared by the CPU (OpenMP) loop and the
// CUDA kernel so that the CPU tests exercise exactly the arithmetic the GPU runs.
//
// Both compilers are told not to contract a*b+c into FMAs (-ffp-contract=off, nvcc --fmad=false) and nvcc keeps
// IEEE division and sqrt (no --use_fast_math): every function below therefore rounds identically on host and
// device. Only the order of the double-precision reductions (mean / variance) differs between the two.
//
// The semantics (what torchvision / torch compute; see docs/fused_augment.md):
//   resize      torch upsample_bilinear2d, align_corners=False, no antialias, output size given (no scale
//               factor): src = (in/out) * (o + 0.5) - 0.5 clamped at 0, i0 = min(floor(src), in-1),
//               i1 = i0 + (i0 < in-1), w1 = clamp(src - i0, 0, 1), w0 = 1 - w1; a dimension whose size does not
//               change is copied (w0 = 1). out = (s00*wx0 + s01*wx1)*wy0 + (s10*wx0 + s11*wx1)*wy1.
//               The source index and weights are computed in double and rounded once (torch's fp32 path rounds
//               `src` in float, i.e. up to ulp(src) ~ 6e-5 at 1000 px; ours is closer to the fp64 result).
//   gain        drop channel -> 0; intensity scale 1/divisor; protein channel x factor / max(image after drop);
//               brightness b: all folded into one per-crop-channel factor (computed in double, rounded once)
//               applied to the interpolated raw value, then clamp to [0, 1].
//   contrast    x = clamp(c*x + (1-c)*mean, 0, 1); (1-c) rounded from double to float and multiplied by the
//               float mean once, as torch does for `(1.0 - ratio) * mean_tensor`.
//   normalise   (x - mean) / (population std + 1e-7); a channel whose range is at most 4 float ulps of its
//               magnitude (constant up to resize rounding) becomes exactly 0 (celldino.data.crop_params rule).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define CD_HD __host__ __device__ __forceinline__
#else
#define CD_HD inline
#endif

namespace celldino {
namespace aug {

constexpr float kSelfNormEps = 1e-7f;
constexpr float kConstantUlps = 4.0f;

// Columns of the per-crop integer table (int32 [N, kIntCols]).
enum IntCol : int {
  kColImage = 0,
  kColTop = 1,
  kColLeft = 2,
  kColHeight = 3,
  kColWidth = 4,
  kColFlipH = 5,
  kColFlipV = 6,
  kColDrop = 7,
  kIntCols = 8,
};
// Per-crop float table (float32 [N, 1 + 2C]): protein factor, brightness[C], contrast[C].
CD_HD int float_cols(int channels) { return 1 + 2 * channels; }

// One output coordinate's two source taps along one axis (indices relative to the crop box).
struct Tap {
  int i0;
  int i1;
  float w0;
  float w1;
};

CD_HD Tap linear_tap(int o, int in_size, int out_size) {
  Tap t;
  if (in_size == out_size) {  // torch copies a dimension whose size does not change
    t.i0 = o;
    t.i1 = o;
    t.w0 = 1.0f;
    t.w1 = 0.0f;
    return t;
  }
  const double ratio = static_cast<double>(in_size) / static_cast<double>(out_size);
  double src = ratio * (static_cast<double>(o) + 0.5) - 0.5;
  if (src < 0.0) src = 0.0;
  int i0 = static_cast<int>(floor(src));
  if (i0 > in_size - 1) i0 = in_size - 1;
  double lam = src - static_cast<double>(i0);
  lam = lam < 0.0 ? 0.0 : (lam > 1.0 ? 1.0 : lam);
  t.i0 = i0;
  t.i1 = i0 + (i0 < in_size - 1 ? 1 : 0);
  t.w1 = static_cast<float>(lam);
  t.w0 = static_cast<float>(1.0 - lam);
  return t;
}

// Output index o of an axis that is flipped after the resize reads resized index (S-1-o).
CD_HD int unflip(int o, int size, bool flipped) { return flipped ? size - 1 - o : o; }

template <typename T>
CD_HD float to_float(T v) {
  return static_cast<float>(v);
}

// One linear step; bilinear = lerp of two row lerps (the CPU evaluates the row lerps once per source row and
// reuses them, the GPU evaluates all three per pixel: the same roundings either way).
CD_HD float lerp(float a, float b, float w0, float w1) { return a * w0 + b * w1; }

CD_HD float bilinear(float s00, float s01, float s10, float s11, float wx0, float wx1, float wy0, float wy1) {
  return lerp(lerp(s00, s01, wx0, wx1), lerp(s10, s11, wx0, wx1), wy0, wy1);
}

// clamp that keeps NaN as NaN (torch.clamp semantics)
CD_HD float clamp01(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }

// The protein step's denominator: the max of the image after the drop (the reference divides by img.max() once the
// dropped channel is zeroed, so that channel counts as 0), from the per-channel maxima (raw units), scaled.
// Returns 0 when the step is skipped (not drawn, C == 1, protein channel absent, or that max is 0).
CD_HD double protein_peak(const float* raw_channel_max, int channels, int drop, int protein_channel,
                          float factor, double divisor) {
  if (!(factor >= 0.0f) || channels < 2 || protein_channel < 0 || protein_channel >= channels) return 0.0;
  float peak = (drop == 0) ? 0.0f : raw_channel_max[0];
  for (int c = 1; c < channels; ++c) {
    const float m = (c == drop) ? 0.0f : raw_channel_max[c];
    if (m > peak) peak = m;
  }
  return static_cast<double>(peak) / divisor;  // the scaled image's max (division is monotone)
}

// Factor applied to the interpolated raw value of channel c: drop, intensity scale, protein contrast and
// brightness in one multiplication (then clamp to [0, 1]).
CD_HD float channel_gain(int c, int drop, int protein_channel, float factor, double peak, double divisor,
                         float brightness) {
  if (c == drop) return 0.0f;
  double g = static_cast<double>(brightness) / divisor;
  if (c == protein_channel && peak != 0.0) g *= static_cast<double>(factor) / peak;
  return static_cast<float>(g);
}

CD_HD float brightness_pixel(float interpolated_raw, float gain) { return clamp01(interpolated_raw * gain); }

// (1 - c) * mean as torch computes `(1.0 - ratio) * mean`: the scalar rounded to float, one float product.
CD_HD float contrast_offset(float contrast, float mean) {
  return static_cast<float>(1.0 - static_cast<double>(contrast)) * mean;
}

CD_HD float contrast_pixel(float x, float contrast, float offset) { return clamp01(contrast * x + offset); }

// Statistics of the values fed to self-normalisation, accumulated around a shift K (the pre-contrast mean,
// close to the final mean) so the variance does not cancel catastrophically.
struct NormStats {
  float mean;
  float denom;  // population std + eps
  bool constant;
};

CD_HD NormStats finish_stats(double shifted_sum, double shifted_sq, float lo, float hi, float shift, int count) {
  NormStats s;
  const double n = static_cast<double>(count);
  const double d = shifted_sum / n;
  double var = shifted_sq / n - d * d;
  if (var < 0.0) var = 0.0;
  s.mean = static_cast<float>(static_cast<double>(shift) + d);
  s.denom = static_cast<float>(sqrt(var)) + kSelfNormEps;
  const float mag = fabsf(hi) > fabsf(lo) ? fabsf(hi) : fabsf(lo);
  s.constant = (hi - lo) <= kConstantUlps * FLT_EPSILON * mag;
  return s;
}

CD_HD float normalize_pixel(float x, const NormStats& s) { return s.constant ? 0.0f : (x - s.mean) / s.denom; }

// Order-preserving int key of a float's bit pattern, for atomicMax of possibly negative maxima on the GPU.
// The map is its own inverse: ordered_key(ordered_key(bits)) == bits.
CD_HD int ordered_key(int float_bits) { return float_bits >= 0 ? float_bits : float_bits ^ 0x7FFFFFFF; }

CD_HD int float_to_key(float f) {
#if defined(__CUDA_ARCH__)
  return ordered_key(__float_as_int(f));
#else
  int bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return ordered_key(bits);
#endif
}

CD_HD float key_to_float(int key) {
  const int bits = ordered_key(key);
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

}  // namespace aug
}  // namespace celldino
