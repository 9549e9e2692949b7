// CPU row kernels of the contrastive KD loss (see contrastive_kd.h for the passes).
#include "contrastive_kd.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "fast_math.h"

namespace caad {
namespace {

constexpr int64_t kBlock = 2048;  // entries per stack buffer: 8 KiB in fp32 (the fp32 one-pass row uses two)
// Sums over a block are taken per chunk of at most kSumChunk entries and then added: where a loop
// is not vectorised (sanitizer builds) one accumulator would otherwise chain 2048 additions and
// lose ~1e-5 of a sum to rounding; vectorised, each lane chains kSumChunk / width of them.
constexpr int64_t kSumChunk = 256;

template <typename Acc>
constexpr Acc kNegInf = -std::numeric_limits<Acc>::infinity();

// exp/log of the accumulation type: vectorisable polynomials in fp32, libm in fp64
// (the float64 path exists for gradcheck and exact parity, not for speed).
inline float vexp(float x) { return fast_exp(x); }
inline double vexp(double x) { return std::exp(x); }
// exp(x − max) where max is taken over the x it is applied to (x − max ≤ 0, −inf or NaN).
inline float vexp_gap(float x) { return fast_exp_nonpos(x); }
inline double vexp_gap(double x) { return std::exp(x); }
inline float vlog(float x) { return fast_log(x); }
inline double vlog(double x) { return std::log(x); }

// log(exp x + exp y); -inf when both are -inf.
template <typename Acc>
inline Acc log_add_exp_t(Acc x, Acc y) {
  Acc mx = x > y ? x : y;
  Acc mx_safe = mx == kNegInf<Acc> ? Acc(0) : mx;
  return mx_safe + vlog(vexp(x - mx_safe) + vexp(y - mx_safe));
}

#if defined(__FLT16_MAX__)
inline float half_to_float(uint16_t h) {
  _Float16 v;
  std::memcpy(&v, &h, sizeof v);
  return static_cast<float>(v);
}
inline uint16_t float_to_half(float f) {
  _Float16 v = static_cast<_Float16>(f);  // hardware round-to-nearest-even
  uint16_t h;
  std::memcpy(&h, &v, sizeof h);
  return h;
}
#else
// Portable IEEE binary16 conversions for compilers without _Float16.
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    float v = std::ldexp(static_cast<float>(man), -24);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline uint16_t float_to_half(float f) {
  uint32_t u = float_to_bits(f);
  uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  float a = std::fabs(f);
  if (a != a) return static_cast<uint16_t>(sign | 0x7e00u);
  if (a >= 65520.f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (a < 6.103515625e-05f) {  // subnormal half: round a·2^24 to nearest even
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.f)));
  }
  uint32_t au = float_to_bits(a);
  uint32_t rounded = au + 0xfffu + ((au >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((rounded >> 13) - (112u << 10)));
}
#endif

// Converts n entries starting at element `offset` of a row into fp32.
template <typename Acc>
void load_block(const Row& row, int64_t offset, int64_t n, Acc* out) {
  switch (row.dtype) {
    case DType::kFloat32: {
      const float* p = static_cast<const float*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = p[i];
      break;
    }
    case DType::kFloat64: {
      const double* p = static_cast<const double*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<Acc>(p[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(p[i]);
      break;
    }
    case DType::kFloat16: {
      const uint16_t* p = static_cast<const uint16_t*>(row.ptr) + offset;
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(p[i]);
      break;
    }
  }
}

// A block of a row as Acc values: the row's own memory when it is stored as Acc already
// (fp32 rows on the fast path: no copy), else converted into `buf`.
template <typename Acc>
const Acc* block_view(const Row& row, int64_t offset, int64_t n, Acc* buf) {
  constexpr DType kAcc = sizeof(Acc) == sizeof(float) ? DType::kFloat32 : DType::kFloat64;
  if (row.dtype == kAcc) return static_cast<const Acc*>(row.ptr) + offset;
  load_block(row, offset, n, buf);
  return buf;
}

template <typename Acc>
void store_block(void* dst, DType dtype, int64_t offset, int64_t n, const Acc* in) {
  switch (dtype) {
    case DType::kFloat32: {
      float* p = static_cast<float*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>(in[i]);
      break;
    }
    case DType::kFloat64: {
      double* p = static_cast<double*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = in[i];
      break;
    }
    case DType::kBFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_bf16(static_cast<float>(in[i]));
      break;
    }
    case DType::kFloat16: {
      uint16_t* p = static_cast<uint16_t*>(dst) + offset;
      for (int64_t i = 0; i < n; ++i) p[i] = float_to_half(static_cast<float>(in[i]));
      break;
    }
  }
}

// `#pragma omp simd` lets the compiler vectorise the float reductions below: without
// it, IEEE addition order forbids it (and -ffast-math would break the inf/NaN rules).
#define CAAD_SIMD _Pragma("omp simd")
#define CAAD_SIMD_SUM(...) _Pragma(CAAD_STR(omp simd reduction(+ : __VA_ARGS__)))
#define CAAD_STR(x) #x

// Contrasted, masked, temperature-scaled teacher logits z/tau of one block and its
// maximum. Adds the block's share of the non-finite check (0, or NaN) to `chk`.
// TEXT and PLAUS are template flags so the loop body is branch-free (vectorisable).
template <typename Acc, bool TEXT, bool PLAUS>
Acc contrast_block_t(const Acc* a, const Acc* t, int64_t n, const KernelOptions& o, Acc threshold, Acc* zt,
                     Acc& chk) {
  const Acc alpha = static_cast<Acc>(o.alpha), one_plus = 1 + alpha, inv_tau = static_cast<Acc>(o.inv_tau);
  Acc c = 0, zmax = kNegInf<Acc>;
#pragma omp simd reduction(+ : c) reduction(max : zmax)
  for (int64_t i = 0; i < n; ++i) {
    const bool impossible = a[i] == kNegInf<Acc>;
    // NaN for NaN or +inf in a, and (with the text path) for any non-finite t under a finite a.
    const Acc bad = TEXT ? a[i] * Acc(0) + t[i] * Acc(0) : a[i] * Acc(0);
    c += impossible ? Acc(0) : bad;
    Acc z = TEXT ? one_plus * a[i] - alpha * t[i] : a[i];
    z = impossible ? kNegInf<Acc> : z;
    if (PLAUS) z = a[i] < threshold ? kNegInf<Acc> : z;
    zt[i] = z * inv_tau;
    zmax = zt[i] > zmax ? zt[i] : zmax;  // not std::max: its reference result defeats vectorisation
  }
  chk += c;
  return zmax;
}

template <typename Acc>
Acc contrast_block(const Acc* a, const Acc* t, int64_t n, const KernelOptions& o, Acc threshold, Acc* zt,
                   Acc& chk) {
  if (o.use_text) {
    return o.plausibility ? contrast_block_t<Acc, true, true>(a, t, n, o, threshold, zt, chk)
                          : contrast_block_t<Acc, true, false>(a, t, n, o, threshold, zt, chk);
  }
  return o.plausibility ? contrast_block_t<Acc, false, true>(a, t, n, o, threshold, zt, chk)
                        : contrast_block_t<Acc, false, false>(a, t, n, o, threshold, zt, chk);
}

template <typename Acc>
Acc block_max(const Acc* x, int64_t n) {
  Acc m = kNegInf<Acc>;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// Running maximum of a streamed row: `raw` may be −inf, `safe` is the value the
// running sums are taken relative to (0 while raw is still −inf).
template <typename Acc>
struct RunningMax {
  Acc raw = kNegInf<Acc>;
  Acc safe = 0;
};

// Folds a block's maximum into m; returns the rescale factor exp(old raw − new safe)
// and the shift (new safe − old safe) that the running accumulators need.
template <typename Acc>
inline void advance(RunningMax<Acc>& m, Acc block_max_value, Acc& rescale, Acc& shift) {
  Acc raw = std::max(m.raw, block_max_value);
  Acc safe = raw == kNegInf<Acc> ? Acc(0) : raw;
  rescale = vexp(m.raw - safe);
  shift = safe - m.safe;
  m.raw = raw;
  m.safe = safe;
}

// e[i] = exp(x[i] − m); returns Σ e (per kSumChunk, then added).
template <typename Acc>
Acc exp_block(const Acc* x, int64_t n, Acc m, Acc* e) {
  Acc total = 0;
  for (int64_t c = 0; c < n; c += kSumChunk) {
    const int64_t end = std::min(n, c + kSumChunk);
    Acc sum = 0;
    CAAD_SIMD_SUM(sum)
    for (int64_t i = c; i < end; ++i) {
      e[i] = vexp_gap(x[i] - m);
      sum += e[i];
    }
    total += sum;
  }
  return total;
}

// An input entry as Acc: In is Acc itself (fp32 rows, or blocks already converted by block_view)
// or uint16_t holding bf16 bits (bf16 rows read in place, converted in registers).
template <typename Acc>
inline Acc as_acc(Acc x) { return x; }
template <typename Acc>
inline Acc as_acc(uint16_t bf16_bits) { return bf16_to_float(bf16_bits); }

// The soft path's first loop over a block: s/τ and the contrasted z/τ (see contrast_block_t)
// with both maxima and both NaN/+inf checks, reading s, a and t once.
template <typename Acc, typename In, bool TEXT, bool PLAUS>
void scale_and_contrast_t(const In* s, const In* a, const In* t, int64_t n, const KernelOptions& o,
                          Acc threshold, Acc* st, Acc* zt, Acc& smax_out, Acc& zmax_out, Acc& chk) {
  const Acc alpha = static_cast<Acc>(o.alpha), one_plus = 1 + alpha, inv_tau = static_cast<Acc>(o.inv_tau);
  Acc c = 0, smax = kNegInf<Acc>, zmax = kNegInf<Acc>;
#pragma omp simd reduction(+ : c) reduction(max : smax, zmax)
  for (int64_t i = 0; i < n; ++i) {
    const Acc si = as_acc<Acc>(s[i]), ai = as_acc<Acc>(a[i]), ti = TEXT ? as_acc<Acc>(t[i]) : Acc(0);
    c += si == kNegInf<Acc> ? Acc(0) : si * Acc(0);
    const bool impossible = ai == kNegInf<Acc>;
    const Acc bad = TEXT ? ai * Acc(0) + ti * Acc(0) : ai * Acc(0);
    c += impossible ? Acc(0) : bad;
    Acc z = TEXT ? one_plus * ai - alpha * ti : ai;
    z = impossible ? kNegInf<Acc> : z;
    if (PLAUS) z = ai < threshold ? kNegInf<Acc> : z;
    st[i] = si * inv_tau;
    zt[i] = z * inv_tau;
    smax = st[i] > smax ? st[i] : smax;
    zmax = zt[i] > zmax ? zt[i] : zmax;
  }
  smax_out = smax;
  zmax_out = zmax;
  chk += c;
}

template <typename Acc, typename In>
void scale_and_contrast(const In* s, const In* a, const In* t, int64_t n, const KernelOptions& o, Acc threshold,
                        Acc* st, Acc* zt, Acc& smax, Acc& zmax, Acc& chk) {
  if (o.use_text) {
    if (o.plausibility) {
      return scale_and_contrast_t<Acc, In, true, true>(s, a, t, n, o, threshold, st, zt, smax, zmax, chk);
    }
    return scale_and_contrast_t<Acc, In, true, false>(s, a, t, n, o, threshold, st, zt, smax, zmax, chk);
  }
  if (o.plausibility) {
    return scale_and_contrast_t<Acc, In, false, true>(s, a, t, n, o, threshold, st, zt, smax, zmax, chk);
  }
  scale_and_contrast_t<Acc, In, false, false>(s, a, t, n, o, threshold, st, zt, smax, zmax, chk);
}

// scale_and_contrast of the block at `start`: bf16 rows are read in place when s, a (and t) are
// all bf16, any other mix through block_view's conversion into the stack buffers.
template <typename Acc>
void scale_and_contrast_rows(const Row& s, const Row& a, const Row& t, int64_t start, int64_t n,
                             const KernelOptions& o, Acc threshold, Acc* sb, Acc* ab, Acc* tb, Acc* st, Acc* zt,
                             Acc& smax, Acc& zmax, Acc& chk) {
  const bool bf16 = std::is_same<Acc, float>::value && s.dtype == DType::kBFloat16 &&
                    a.dtype == DType::kBFloat16 && (!o.use_text || t.dtype == DType::kBFloat16);
  if (bf16) {
    const uint16_t* sp = static_cast<const uint16_t*>(s.ptr) + start;
    const uint16_t* ap = static_cast<const uint16_t*>(a.ptr) + start;
    const uint16_t* tp = o.use_text ? static_cast<const uint16_t*>(t.ptr) + start : ap;
    return scale_and_contrast<Acc, uint16_t>(sp, ap, tp, n, o, threshold, st, zt, smax, zmax, chk);
  }
  const Acc* sp = block_view(s, start, n, sb);
  const Acc* ap = block_view(a, start, n, ab);
  const Acc* tp = o.use_text ? block_view(t, start, n, tb) : ap;  // read only with the text path
  scale_and_contrast<Acc, Acc>(sp, ap, tp, n, o, threshold, st, zt, smax, zmax, chk);
}

// What the soft path's second loop over a block sums (relative to the running maxima m_s, m_z).
template <typename Acc>
struct BlockSums {
  Acc sum_s = 0, sum_z = 0;  // Σ e_s, Σ e_z
  Acc gx = 0, gy = 0;        // Σ w·(x − m_x), Σ w·(y − m_y): the KL's weighted gaps (exp_and_gaps_t)
};

// The soft path's second loop over one chunk: e_s = exp(s/τ − m_s) and e_z = exp(z/τ − m_z)
// into es, ez, their sums, and in the same loop the weighted gaps of the KL: Σ w·(x − m_x) and
// Σ w·(y − m_y) over entries with w > 0 (0·log 0 = 0), x the distribution the divergence weights
// by (forward KL: x = z/τ, w = e_z, y = s/τ; reverse KL: mirrored), so each gap is the exp's own
// argument and st, zt, es, ez are not read again. DIV = kJSD: the sums only.
// Entries in x's support (x > −inf) where y = −inf make KL = +inf whatever their weight after
// rounding: they are counted in `infinite` and kept out of the sums (an order-independent rule; a
// −inf inside a running sum would turn into 0·(−inf) = NaN once its weight underflowed). No select
// on the sums (GCC turns those into masked loads and blends): a gap clamped at the lowest finite
// value is exact wherever w > 0 (x − m_x ≥ −745 there) and gives w·gap = 0 where x = −inf (w = 0);
// where y = −inf the y-gap is garbage but the entry counts as infinite, which overrides the sum.
template <typename Acc, int DIV>
void exp_and_gaps_t(const Acc* st, Acc ms, const Acc* zt, Acc mz, int64_t n, Acc* es, Acc* ez, BlockSums<Acc>& b,
                    Acc& infinite) {
  constexpr Acc kLowest = std::numeric_limits<Acc>::lowest();
  Acc ss = 0, sz = 0, sx = 0, sy = 0, inf_count = 0;
#pragma omp simd reduction(+ : ss, sz, sx, sy, inf_count)
  for (int64_t i = 0; i < n; ++i) {
    const Acc ds = st[i] - ms, dz = zt[i] - mz;
    const Acc e_s = vexp_gap(ds), e_z = vexp_gap(dz);
    es[i] = e_s;
    ez[i] = e_z;
    ss += e_s;
    sz += e_z;
    if (DIV != kJSD) {
      const Acc dx = DIV == kForwardKL ? dz : ds, dy = DIV == kForwardKL ? ds : dz;
      const Acc w = DIV == kForwardKL ? e_z : e_s;
      const Acc x = DIV == kForwardKL ? zt[i] : st[i], y = DIV == kForwardKL ? st[i] : zt[i];
      sx += w * (dx > kLowest ? dx : kLowest);
      sy += w * (dy > kLowest ? dy : kLowest);
      inf_count += x != kNegInf<Acc> && y == kNegInf<Acc> ? Acc(1) : Acc(0);
    }
  }
  infinite += inf_count;
  b.sum_s += ss;
  b.sum_z += sz;
  b.gx += sx;
  b.gy += sy;
}

// exp_and_gaps_t over a block, chunk by chunk (kSumChunk).
template <typename Acc>
BlockSums<Acc> exp_and_gaps(int32_t divergence, const Acc* st, Acc ms, const Acc* zt, Acc mz, int64_t n, Acc* es,
                            Acc* ez, Acc& infinite) {
  BlockSums<Acc> b;
  for (int64_t c = 0; c < n; c += kSumChunk) {
    const int64_t m = std::min(kSumChunk, n - c);
    if (divergence == kForwardKL) {
      exp_and_gaps_t<Acc, kForwardKL>(st + c, ms, zt + c, mz, m, es + c, ez + c, b, infinite);
    } else if (divergence == kReverseKL) {
      exp_and_gaps_t<Acc, kReverseKL>(st + c, ms, zt + c, mz, m, es + c, ez + c, b, infinite);
    } else {
      exp_and_gaps_t<Acc, kJSD>(st + c, ms, zt + c, mz, m, es + c, ez + c, b, infinite);
    }
  }
  return b;
}

// What the forward keeps for a backward in the same call (forward_backward_row): each
// block's exp(s/τ − m_s) and exp(z/τ − m_z), relative to the running maxima m_s, m_z
// reached at that block, and those maxima ([vocab], [vocab], [blocks], [blocks]).
template <typename Acc>
struct RowCapture {
  Acc* exp_s;
  Acc* exp_z;
  Acc* max_s;
  Acc* max_z;
};

template <typename Acc>
Acc forward_row_impl(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                     const KernelOptions& o, Acc* stats, const RowCapture<Acc>* capture = nullptr) {
  using std::log;
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  alignas(64) Acc sb[kBlock], st[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], es[kBlock], ez[kBlock];
  Acc max_a = kNegInf<Acc>;
  if (o.soft && o.plausibility) {
    for (int64_t start = 0; start < vocab; start += kBlock) {
      const int64_t n = std::min(kBlock, vocab - start);
      max_a = std::max(max_a, block_max(block_view(a, start, n, ab), n));
    }
  }
  const Acc threshold = max_a + static_cast<Acc>(o.log_beta_p);

  // Online log-sum-exps, each sum relative to its safe running max. The KL
  // accumulators hold Σ e·(x − max_x) with x's own max, never Σ e·(z − s): at
  // |logits| ~ 1e4 that would cancel against the max gap and lose the loss to rounding.
  RunningMax<Acc> mz, ms, mh;
  Acc sum_z = 0, sum_s = 0, sum_h = 0;
  Acc acc_zz = 0, acc_zs = 0;  // forward KL = (acc_zz − acc_zs)/sum_z − log sum_z + log sum_s
  Acc acc_ss = 0, acc_sz = 0;  // reverse KL, mirrored
  Acc chk = 0;                 // stays 0 unless a NaN/+inf rule of SPEC §3 fires
  Acc infinite = 0;            // entries that make forward/reverse KL +inf (see exp_and_gaps_t)
  for (int64_t start = 0, block = 0; start < vocab; start += kBlock, ++block) {
    const int64_t n = std::min(kBlock, vocab - start);
    Acc* es_out = capture ? capture->exp_s + start : es;
    Acc* ez_out = capture ? capture->exp_z + start : ez;
    Acc c_s, shift_s;
    if (o.soft) {
      Acc smax, zmax, c_z, shift_z;
      scale_and_contrast_rows(s, a, t, start, n, o, threshold, sb, ab, tb, st, zt, smax, zmax, chk);
      advance(ms, smax, c_s, shift_s);
      advance(mz, zmax, c_z, shift_z);
      const BlockSums<Acc> b = exp_and_gaps(o.divergence, st, ms.safe, zt, mz.safe, n, es_out, ez_out, infinite);
      if (capture) {
        capture->max_s[block] = ms.safe;
        capture->max_z[block] = mz.safe;
      }
      if (o.divergence == kForwardKL) {
        acc_zz = c_z * (acc_zz - shift_z * sum_z) + b.gx;
        acc_zs = c_z * (acc_zs - shift_s * sum_z) + b.gy;
      } else if (o.divergence == kReverseKL) {
        acc_ss = c_s * (acc_ss - shift_s * sum_s) + b.gx;
        acc_sz = c_s * (acc_sz - shift_z * sum_s) + b.gy;
      }
      sum_z = sum_z * c_z + b.sum_z;
      sum_s = sum_s * c_s + b.sum_s;
    } else {
      const Acc* sp = block_view(s, start, n, sb);
      Acc smax = kNegInf<Acc>, c = 0;
#pragma omp simd reduction(+ : c) reduction(max : smax)
      for (int64_t i = 0; i < n; ++i) {
        c += sp[i] == kNegInf<Acc> ? Acc(0) : sp[i] * Acc(0);
        st[i] = sp[i] * inv_tau;
        smax = st[i] > smax ? st[i] : smax;
      }
      chk += c;
      advance(ms, smax, c_s, shift_s);
      sum_s = sum_s * c_s + exp_block(st, n, ms.safe, es_out);
      if (capture) capture->max_s[block] = ms.safe;
    }
    if (o.hard && !o.tau_one) {
      const Acc* sp = block_view(s, start, n, sb);
      Acc c_h, shift_h;
      advance(mh, block_max(sp, n), c_h, shift_h);
      sum_h = sum_h * c_h + exp_block(sp, n, mh.safe, es);
    }
  }

  const Acc log_sum_z = log(sum_z), log_sum_s = log(sum_s);
  Acc loss = chk;
  Acc div_aux = 0;
  if (o.soft) {
    Acc div;
    const Acc inf = std::numeric_limits<Acc>::infinity();
    if (o.divergence == kForwardKL) {
      div = infinite > 0 ? inf : (acc_zz - acc_zs) / sum_z - (log_sum_z - log_sum_s);
    } else if (o.divergence == kReverseKL) {
      div = infinite > 0 ? inf : (acc_ss - acc_sz) / sum_s - (log_sum_s - log_sum_z);
      div_aux = div;
    } else {
      // Generalized JSD needs both normalisers before log m: a second pass.
      const Acc beta = static_cast<Acc>(o.jsd_beta);
      const Acc log_1m_beta = static_cast<Acc>(std::log1p(-o.jsd_beta));
      const Acc log_beta = static_cast<Acc>(std::log(o.jsd_beta));
      Acc kl_pm = 0, kl_qm = 0, unused = 0;
      for (int64_t start = 0; start < vocab; start += kBlock) {
        const int64_t n = std::min(kBlock, vocab - start);
        load_block(s, start, n, sb);
        load_block(a, start, n, ab);
        if (o.use_text) load_block(t, start, n, tb);
        contrast_block(ab, tb, n, o, threshold, zt, unused);
        for (int64_t c = 0; c < n; c += kSumChunk) {
          const int64_t end = std::min(n, c + kSumChunk);
          Acc kp = 0, kq = 0;
          CAAD_SIMD_SUM(kp, kq)
          for (int64_t i = c; i < end; ++i) {
            const Acc log_p = (zt[i] - mz.safe) - log_sum_z;
            const Acc log_q = (sb[i] * inv_tau - ms.safe) - log_sum_s;
            const Acc log_m = log_add_exp_t(log_q + log_1m_beta, log_p + log_beta);
            const Acc p = vexp(log_p), q = vexp(log_q);
            kp += p > 0 ? p * (log_p - log_m) : Acc(0);
            kq += q > 0 ? q * (log_q - log_m) : Acc(0);
          }
          kl_pm += kp;
          kl_qm += kq;
        }
      }
      div = beta * kl_pm + (1 - beta) * kl_qm;
      div_aux = kl_qm;
    }
    // SPEC §3: a row with no distribution (all of s/τ, or all of z/τ, −inf) has no divergence.
    if (sum_s == 0 || sum_z == 0) div = std::numeric_limits<Acc>::quiet_NaN();
    loss += static_cast<Acc>(o.soft_weight) * div;
  }
  const Acc max_h = o.tau_one ? ms.safe : mh.safe;
  const Acc log_sum_h = o.tau_one ? log_sum_s : log(sum_h);
  if (o.hard) {
    Acc ce = std::numeric_limits<Acc>::quiet_NaN();
    if (label >= 0 && label < vocab) {
      Acc s_y;
      load_block(s, label, 1, &s_y);
      ce = (max_h - s_y) + log_sum_h;
    }
    loss += static_cast<Acc>(o.hard_weight) * ce;
  }
  stats[kMaxZ] = mz.safe;
  stats[kLogSumZ] = log_sum_z;
  stats[kMaxS] = ms.safe;
  stats[kLogSumS] = log_sum_s;
  stats[kMaxH] = max_h;
  stats[kLogSumH] = log_sum_h;
  stats[kMaxA] = max_a;
  stats[kDivAux] = div_aux;
  return loss;
}

template <typename Acc>
void backward_row_impl(Acc upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                       const KernelOptions& o, const Acc* stats, void* grad, DType grad_dtype) {
  alignas(64) Acc sb[kBlock], ab[kBlock], tb[kBlock], zt[kBlock], g[kBlock];
  const Acc inv_tau = static_cast<Acc>(o.inv_tau);
  const Acc max_z = stats[kMaxZ], log_sum_z = stats[kLogSumZ], max_s = stats[kMaxS];
  const Acc log_sum_s = stats[kLogSumS], max_h = stats[kMaxH], log_sum_h = stats[kLogSumH];
  const Acc threshold = stats[kMaxA] + static_cast<Acc>(o.log_beta_p);
  const Acc div_aux = stats[kDivAux];
  const Acc c_soft = upstream * static_cast<Acc>(o.soft_weight) * inv_tau;
  const Acc c_hard = upstream * static_cast<Acc>(o.hard_weight);
  const Acc beta = static_cast<Acc>(o.jsd_beta);
  const Acc log_1m_beta = static_cast<Acc>(std::log1p(-o.jsd_beta));
  const Acc log_beta = static_cast<Acc>(std::log(o.jsd_beta));
  Acc unused = 0;
  // Reverse KL / JSD: q·(r − D) cancels at the student's argmax when q saturates there (|x| ~ 1e3:
  // r ≈ D ≈ 1e3, an error of an ulp of 1e3 where the true gradient is ~1e-4). The soft gradient
  // sums to 0 exactly, so that one entry is written last as minus the sum of all the others.
  const bool compensate = o.soft && o.divergence != kForwardKL;
  int64_t arg = -1;                 // the first entry with s/τ = max_s: withheld until the end
  Acc soft_sum = 0, arg_soft = 0, arg_hard = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    load_block(s, start, n, sb);
    int64_t block_arg = -1;
    if (o.soft) {
      load_block(a, start, n, ab);
      if (o.use_text) load_block(t, start, n, tb);
      contrast_block(ab, tb, n, o, threshold, zt, unused);
      // One loop per divergence, so each is a straight-line vector loop.
      if (o.divergence == kForwardKL) {
        CAAD_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const Acc q = vexp((sb[i] * inv_tau - max_s) - log_sum_s);
          const Acc p = vexp((zt[i] - max_z) - log_sum_z);
          g[i] = c_soft * (q - p);
        }
      } else if (o.divergence == kReverseKL) {
        CAAD_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const Acc log_q = (sb[i] * inv_tau - max_s) - log_sum_s;
          const Acc log_p = (zt[i] - max_z) - log_sum_z;
          const Acc q = vexp(log_q);
          g[i] = c_soft * (q > 0 ? q * (log_q - log_p - div_aux) : Acc(0));
        }
      } else {
        CAAD_SIMD
        for (int64_t i = 0; i < n; ++i) {
          const Acc log_q = (sb[i] * inv_tau - max_s) - log_sum_s;
          const Acc log_p = (zt[i] - max_z) - log_sum_z;
          const Acc q = vexp(log_q);
          const Acc log_m = log_add_exp_t(log_q + log_1m_beta, log_p + log_beta);
          g[i] = c_soft * (1 - beta) * (q > 0 ? q * (log_q - log_m - div_aux) : Acc(0));
        }
      }
    } else {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = 0;
    }
    if (compensate) {
      Acc block_sum = 0;
      CAAD_SIMD_SUM(block_sum)
      for (int64_t i = 0; i < n; ++i) block_sum += g[i];
      soft_sum += block_sum;
      for (int64_t i = 0; arg < 0 && i < n; ++i) {
        if (sb[i] * inv_tau == max_s) {
          arg = block_arg = start + i;
          arg_soft = g[i];
        }
      }
    }
    if (o.hard) {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] += c_hard * vexp((sb[i] - max_h) - log_sum_h);
      if (label >= start && label < start + n) g[label - start] -= c_hard;
    }
    if (block_arg >= 0) arg_hard = g[block_arg - start] - arg_soft;
    store_block(grad, grad_dtype, start, n, g);
  }
  if (arg >= 0) {
    const Acc fixed = -(soft_sum - arg_soft) + arg_hard;
    store_block(grad, grad_dtype, arg, 1, &fixed);
  }
}

}  // namespace

float forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label, const KernelOptions& opts,
                  float* stats) {
  return forward_row_impl<float>(s, a, t, vocab, label, opts, stats);
}

double forward_row(const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label, const KernelOptions& opts,
                   double* stats) {
  return forward_row_impl<double>(s, a, t, vocab, label, opts, stats);
}

void backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const float* stats, void* grad, DType grad_dtype) {
  backward_row_impl<float>(upstream, s, a, t, vocab, label, opts, stats, grad, grad_dtype);
}

void backward_row(double upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                  const KernelOptions& opts, const double* stats, void* grad, DType grad_dtype) {
  backward_row_impl<double>(upstream, s, a, t, vocab, label, opts, stats, grad, grad_dtype);
}

int64_t forward_backward_workspace(int64_t vocab) {
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  return 2 * vocab + 2 * blocks;
}

// The forward keeps its exps (RowCapture in `work`); the gradient is then, per block b,
// q = exp_s·exp(m_s(b) − m_s − log Σ_s) and p = exp_z·exp(m_z(b) − m_z − log Σ_z): one
// multiply per entry instead of a second read of s, a, t and two exps. Only where the
// gradient is q and p alone (forward KL; the hard term's softmax(s) is q at τ = 1) and
// the loss is finite; the SPEC §3 rows (NaN, +inf, no distribution) take backward_row.
float forward_backward_row(float upstream, const Row& s, const Row& a, const Row& t, int64_t vocab, int64_t label,
                           const KernelOptions& o, float* stats, float* work, void* grad, DType grad_dtype) {
  const bool from_exps = (!o.soft || o.divergence == kForwardKL) && (!o.hard || o.tau_one);
  const int64_t blocks = (vocab + kBlock - 1) / kBlock;
  const RowCapture<float> cap{work, work + vocab, work + 2 * vocab, work + 2 * vocab + blocks};
  const float loss = forward_row_impl<float>(s, a, t, vocab, label, o, stats, from_exps ? &cap : nullptr);
  if (!from_exps || !std::isfinite(loss)) {
    backward_row_impl<float>(upstream, s, a, t, vocab, label, o, stats, grad, grad_dtype);
    return loss;
  }
  const float max_s = stats[kMaxS], log_sum_s = stats[kLogSumS];
  const float max_z = stats[kMaxZ], log_sum_z = stats[kLogSumZ];
  const float c_soft = upstream * static_cast<float>(o.soft_weight * o.inv_tau);
  const float c_hard = upstream * static_cast<float>(o.hard_weight);
  alignas(64) float g[kBlock];
  for (int64_t start = 0, block = 0; start < vocab; start += kBlock, ++block) {
    const int64_t n = std::min(kBlock, vocab - start);
    // grad = c_soft·(q − p) + c_hard·(q − onehot) with q = e_s·f_q, p = e_z·f_p: one factor per
    // block for each kept exp. min(·, 0): a block seen while the running max was still −inf has
    // m(b) = 0 and only zero exps. The soft term is a difference taken before it is scaled, so
    // q = p gives exactly 0 (V = 1) and the hard term's q − 1 cancels exactly too.
    const float fq = vexp(std::min(cap.max_s[block] - max_s, 0.f) - log_sum_s);
    const float fp = o.soft ? vexp(std::min(cap.max_z[block] - max_z, 0.f) - log_sum_z) : 0.f;
    const float cs = o.soft ? c_soft : 0.f, ch = o.hard ? c_hard : 0.f;
    const float* es = cap.exp_s + start;
    const float* ez = o.soft ? cap.exp_z + start : es;  // fp = 0 without the soft term
    const bool onehot = o.hard && label >= start && label < start + n;
    if (grad_dtype == DType::kFloat32 && !onehot) {  // straight into the gradient row
      float* out = static_cast<float*>(grad) + start;
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) out[i] = cs * (es[i] * fq - ez[i] * fp) + ch * (es[i] * fq);
    } else if (grad_dtype == DType::kBFloat16 && !onehot) {
      uint16_t* out = static_cast<uint16_t*>(grad) + start;
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(cs * (es[i] * fq - ez[i] * fp) + ch * (es[i] * fq));
    } else {
      CAAD_SIMD
      for (int64_t i = 0; i < n; ++i) g[i] = cs * (es[i] * fq - ez[i] * fp) + ch * (es[i] * fq);
      if (onehot) g[label - start] -= c_hard;
      store_block(grad, grad_dtype, start, n, g);
    }
  }
  return loss;
}

double forward_backward_row(double upstream, const Row& s, const Row& a, const Row& t, int64_t vocab,
                            int64_t label, const KernelOptions& o, double* stats, double* /*work*/, void* grad,
                            DType grad_dtype) {
  const double loss = forward_row_impl<double>(s, a, t, vocab, label, o, stats);
  backward_row_impl<double>(upstream, s, a, t, vocab, label, o, stats, grad, grad_dtype);
  return loss;
}

void zero_row(void* grad, DType grad_dtype, int64_t vocab) {
  const size_t bytes = grad_dtype == DType::kFloat64 ? 8 : grad_dtype == DType::kFloat32 ? 4 : 2;
  std::memset(grad, 0, static_cast<size_t>(vocab) * bytes);
}

}  // namespace caad
