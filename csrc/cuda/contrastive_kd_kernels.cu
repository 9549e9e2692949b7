// CUDA row kernels of the contrastive KD loss (torch-free; see contrastive_kd_kernels.cuh).
//
// One thread block per row, the CPU core's passes (csrc/kernel/contrastive_kd.cpp):
//   forward
//     * plausibility (beta_p > 0) only: one read of `a` for max(a);
//     * always: one streaming pass over s (and a, t when the soft term is on) with
//       online log-sum-exps of z/tau, s/tau (and s at tau = 1 for the hard term when
//       tau != 1) plus the max-relative KL accumulators of forward or reverse KL;
//     * generalized JSD (0 < beta_j < 1) only: a second pass, since log m needs both
//       normalisers first.
//   backward: one pass that rebuilds log p and log q from the 8 row statistics and
//     writes the gradient (in place over s when the caller aliases them).
// On chip: each thread keeps one online state (8 fp32) for the row; the block merges
// them with warp shuffles and 16 slots of shared memory, in a fixed tree (no atomics:
// bitwise deterministic). Nothing of size V is ever stored.
//
// Each thread owns whole 16-byte chunks (8 bf16/fp16 or 4 fp32 entries): chunk c
// covers row entries [c·VEC − phase, c·VEC − phase + VEC), where `phase` puts every
// chunk boundary on a 16-byte address, so interior chunks are single 128-bit loads
// and only the first and last chunk of a row are partial (masked scalar loads).
// When the tensors of a row disagree in alignment (e.g. odd V), every chunk is
// loaded element by element instead (same arithmetic, slower).
//
// exp: ex2.approx.ftz(x·log2 e) (= __expf), always on max-relative arguments x <= 0
// so the product x·log2 e loses only |x|·2^-24 relative — noise where e^x matters —
// and the MUFU result is within ~2 ulp: far inside the fp32 budget (rtol 1e-5), one
// MUFU op instead of ~10 instructions for expf (the forward does 2–3 exps per entry
// and must stay memory-bound). FTZ zeroes results below 2^-126 exactly like the CPU
// core's fast_exp, so the "e > 0" liveness rules (0·log 0 = 0) agree. The few
// per-row logs are taken in double; the per-entry log of generalized JSD uses
// lg2.approx on an argument in [1, 2] (absolute error ~2^-22).
// All of it is written with explicit intrinsics (__fmul_rn, inline PTX ...), so the
// results do not depend on --use_fast_math (which the JIT build passes) and the
// backward rebuilds z/tau, log p and log q with exactly the forward's roundings.
//
// sm_90 also has a single-pass kernel (contrastive_kd_cluster_kernel, for grad_in_forward):
// a thread-block cluster per row keeps the row in shared memory, so the forward and the
// gradient read s, a, t from HBM once. Written and compile-checked, never run (README.md).
#include "contrastive_kd_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <climits>
#include <map>
#include <mutex>
#include <tuple>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#define CAAD_HD __host__ __device__ __forceinline__
#ifdef __CUDA_ARCH__
#define CAAD_UNROLL _Pragma("unroll")
#else
#define CAAD_UNROLL  // the host pass of the __host__ __device__ helpers: no pragma warnings
#endif

namespace caad {
namespace cuda {
namespace detail {

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr uint32_t kNegInfBits = 0xff800000u;

// ---------------------------------------------------------------------------------
// Scalar helpers. Host branches exist only so the same row functions can be
// exercised by a host-side simulation; the kernels use the device branches.

CAAD_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

CAAD_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

CAAD_HD float neg_inf() { return bits_to_float(kNegInfBits); }
CAAD_HD float pos_inf() { return bits_to_float(0x7f800000u); }
CAAD_HD float quiet_nan() { return bits_to_float(0x7fc00000u); }

// Correctly rounded fp32 ops that --fmad/--use_fast_math may not contract or
// approximate: the forward and backward must compute z/tau and x − max bit for bit
// alike, or log p near the max would differ between the passes.
CAAD_HD float fmul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CAAD_HD float fsub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
CAAD_HD float fadd(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
CAAD_HD float ffma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fmaf(a, b, c);
#endif
}
CAAD_HD float fdiv(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);  // IEEE even under --prec-div=false
#else
  return a / b;
#endif
}

// e^x via one MUFU op (see the header comment); 0 for -inf and below 2^-126, NaN for NaN.
CAAD_HD float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(fmul(x, kLog2e)));
  return y;
#else
  const float y = std::exp2(fmul(x, kLog2e));
  return y < 1.17549435e-38f ? 0.f : y;
#endif
}

// ln x for x in [1, 2] (the log-add-exp argument): lg2.approx has ~2^-22 absolute error there.
CAAD_HD float fast_log(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return fmul(y, kLn2);
#else
  return fmul(std::log2(x), kLn2);
#endif
}

// Per-row logs (a handful per row): double, so --use_fast_math cannot turn them into lg2.approx.
CAAD_HD float exact_log(float x) { return static_cast<float>(::log(static_cast<double>(x))); }

// The value running sums are kept relative to: the running max, or 0 while it is -inf
// (so an all -inf prefix never produces -inf − -inf).
CAAD_HD float safe_of(float raw) { return raw == neg_inf() ? 0.f : raw; }

// NaN or +inf (the SPEC §3 rule for s and a; -inf is a legal "impossible" mark).
// Integer tests so no compiler flag can fold them away.
CAAD_HD uint32_t nan_or_pos_inf(float x) {
  const uint32_t u = float_to_bits(x);
  return static_cast<uint32_t>(((u & 0x7fffffffu) > 0x7f800000u) | (u == 0x7f800000u));
}
// Any non-finite t under an a that is not -inf makes the contrast undefined.
CAAD_HD uint32_t bad_text(float a, float t) {
  return static_cast<uint32_t>((float_to_bits(a) != kNegInfBits) & ((float_to_bits(t) & 0x7fffffffu) >= 0x7f800000u));
}

// log(e^x + e^y), -inf when both are -inf. The CPU core's log(e^(x−m) + e^(y−m)) with
// m = max(x, y) has one term exactly 1, so it is log(1 + e^−|x−y|): one exp saved.
// NaN propagates through x − y (fmaxf alone would drop it).
CAAD_HD float log_add_exp(float x, float y) {
  const float mx = fmaxf(x, y);
  const float lse = fadd(mx, fast_log(fadd(1.f, fast_exp(-fabsf(fsub(x, y))))));
  return mx == neg_inf() ? neg_inf() : lse;
}

// ---------------------------------------------------------------------------------
// Element types: a chunk is 16 bytes of raw bits, converted to fp32 on use.

struct Raw {
  uint32_t w[4];
};

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  using Bits = unsigned int;
  static constexpr uint32_t kNegInf = 0xff800000u;
  CAAD_HD static float get(const Raw& r, int k) { return bits_to_float(r.w[k]); }
  CAAD_HD static void set(Raw& r, int k, uint32_t b) { r.w[k] = b; }
  CAAD_HD static float from_bits(uint32_t b) { return bits_to_float(b); }
  CAAD_HD static uint32_t to_bits(float f) { return float_to_bits(f); }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  using Bits = unsigned short;
  static constexpr uint32_t kNegInf = 0xff80u;
  CAAD_HD static float get(const Raw& r, int k) {
    const uint32_t w = r.w[k >> 1];
    return bits_to_float((k & 1) ? (w & 0xffff0000u) : (w << 16));  // bf16 is the top half of an fp32
  }
  CAAD_HD static void set(Raw& r, int k, uint32_t b) { r.w[k >> 1] |= (k & 1) ? (b << 16) : b; }
  CAAD_HD static float from_bits(uint32_t b) { return bits_to_float(b << 16); }
  CAAD_HD static uint32_t to_bits(float f) {  // hardware round-to-nearest-even (cvt.rn.bf16.f32)
    const __nv_bfloat16_raw r = __float2bfloat16_rn(f);
    return r.x;
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  using Bits = unsigned short;
  static constexpr uint32_t kNegInf = 0xfc00u;
  CAAD_HD static float from_bits(uint32_t b) {
    __half_raw r;
    r.x = static_cast<unsigned short>(b);
    return __half2float(__half(r));
  }
  CAAD_HD static float get(const Raw& r, int k) {
    const uint32_t w = r.w[k >> 1];
    return from_bits((k & 1) ? (w >> 16) : (w & 0xffffu));
  }
  CAAD_HD static void set(Raw& r, int k, uint32_t b) { r.w[k >> 1] |= (k & 1) ? (b << 16) : b; }
  CAAD_HD static uint32_t to_bits(float f) {  // round-to-nearest-even (cvt.rn.f16.f32)
    const __half_raw r = __float2half_rn(f);
    return r.x;
  }
};

// The host pass of the vector accesses (the CPU emulator of csrc/tests/) checks the
// alignment a GPU's 128-bit load or store would need, so misaligned chunks are caught
// there instead of faulting on a GPU.
inline void host_check_aligned(const void* p, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    std::fprintf(stderr, "caad: misaligned %zu-byte vector access at %p\n", bytes, p);
    std::abort();
  }
}

// Read-only data (forward: s, a, t; backward: a, t) goes through the non-coherent
// path. The backward's s may be the gradient buffer itself (in-place backward), so it
// uses a coherent streaming load (ld.global.cs): each chunk is read, then written, by
// the one thread that owns it, and read exactly once.
// The sm_90 cluster kernel reads rows it staged in shared memory: plain (generic) loads.
enum class Load { kReadOnly, kStreaming, kShared };

template <Load L>
CAAD_HD uint4 load16(const void* p) {
#ifdef __CUDA_ARCH__
  if (L == Load::kShared) return *static_cast<const uint4*>(p);
  return L == Load::kReadOnly ? __ldg(static_cast<const uint4*>(p)) : __ldcs(static_cast<const uint4*>(p));
#else
  uint4 u;
  host_check_aligned(p, sizeof u);
  std::memcpy(&u, p, sizeof u);
  return u;
#endif
}

template <Load L, typename B>
CAAD_HD B load_scalar(const B* p) {
#ifdef __CUDA_ARCH__
  if (L == Load::kShared) return *p;
  return L == Load::kReadOnly ? __ldg(p) : __ldcs(p);
#else
  return *p;
#endif
}

// Entries j0 .. j0+VEC−1 of a row; entries outside [0, V) read as `fill` (the Triton
// kernels' `other=`: -inf for s and a, which contributes nothing, 0 for t).
template <typename T, Load L>
CAAD_HD Raw load_chunk(const T* row, int64_t j0, int64_t V, bool vec, uint32_t fill) {
  constexpr int N = Elem<T>::kVec;
  Raw r;
  if (vec && j0 >= 0 && j0 + N <= V) {
    const uint4 u = load16<L>(row + j0);
    r.w[0] = u.x;
    r.w[1] = u.y;
    r.w[2] = u.z;
    r.w[3] = u.w;
    return r;
  }
  r.w[0] = r.w[1] = r.w[2] = r.w[3] = 0;
  const auto* b = reinterpret_cast<const typename Elem<T>::Bits*>(row);
CAAD_UNROLL
  for (int k = 0; k < N; ++k) {
    const int64_t j = j0 + k;
    const uint32_t bits = (j >= 0 && j < V) ? static_cast<uint32_t>(load_scalar<L>(b + j)) : fill;
    Elem<T>::set(r, k, bits);
  }
  return r;
}

// Gradient stores are streaming (st.global.cs): written once, never re-read here.
template <typename G, int N>
CAAD_HD void store_chunk(G* row, int64_t j0, int64_t V, bool vec, const float (&g)[N]) {
  using B = typename Elem<G>::Bits;
  auto* b = reinterpret_cast<B*>(row);
  if (vec && j0 >= 0 && j0 + N <= V) {
    constexpr int kBytes = N * static_cast<int>(sizeof(G));
    static_assert(kBytes == 8 || kBytes == 16, "a chunk is 8 or 16 bytes of gradient");
    uint32_t w[4] = {0, 0, 0, 0};
CAAD_UNROLL
    for (int k = 0; k < N; ++k) {
      if constexpr (sizeof(G) == 4) {
        w[k] = Elem<G>::to_bits(g[k]);
      } else {
        w[k >> 1] |= (k & 1) ? (Elem<G>::to_bits(g[k]) << 16) : Elem<G>::to_bits(g[k]);
      }
    }
#ifdef __CUDA_ARCH__
    if constexpr (kBytes == 16) {
      __stcs(reinterpret_cast<uint4*>(b + j0), make_uint4(w[0], w[1], w[2], w[3]));
    } else {
      __stcs(reinterpret_cast<uint2*>(b + j0), make_uint2(w[0], w[1]));
    }
#else
    host_check_aligned(b + j0, kBytes);
    std::memcpy(b + j0, w, kBytes);
#endif
    return;
  }
CAAD_UNROLL
  for (int k = 0; k < N; ++k) {
    const int64_t j = j0 + k;
    if (j >= 0 && j < V) {
      const B bits = static_cast<B>(Elem<G>::to_bits(g[k]));
#ifdef __CUDA_ARCH__
      __stcs(b + j, bits);
#else
      b[j] = bits;
#endif
    }
  }
}

// ---------------------------------------------------------------------------------
// Kernel parameters: the launcher's args with every scalar rounded to fp32 once,
// the way the CPU core's fp32 path rounds them.

struct Params {
  const void* s;
  const void* a;
  const void* t;
  void* grad;
  int64_t s_sb, s_st, a_sb, a_st, t_sb, t_st, g_sb, g_st;
  const int64_t* labels;
  int64_t l_sb, l_st;
  int64_t rows, rows_per_batch, vocab, ignore_index;
  float* loss;
  float* stats_out;
  const float* stats_in;
  const float* grad_rows;
  int64_t grad_rows_stride;
  float alpha, one_plus_alpha, inv_tau, log_beta_p;
  float beta, one_minus_beta, log_1m_beta, log_beta;
  float w_soft, w_hard;
  bool soft, text, plaus, hard, tau_one;
};

// Where a row's tensors sit relative to 16-byte chunks.
struct RowCtx {
  int phase;       // entries of the first chunk that lie before the row start
  bool vec;        // every chunk boundary is 16-byte (or 8-byte for a 2-byte grad of fp32 inputs) aligned
  int64_t chunks;  // chunks covering [0, V)
};

// phase of a pointer = its element index modulo VEC; -1 when not even element-aligned.
CAAD_HD int phase_of(const void* p, int elem_bytes, int vec) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (addr % static_cast<uintptr_t>(elem_bytes) != 0) return -1;
  return static_cast<int>((addr / static_cast<uintptr_t>(elem_bytes)) % static_cast<uintptr_t>(vec));
}

// The vector path needs one phase for all tensors of the row; null pointers (tensors
// the options never touch) impose nothing.
template <typename T>
CAAD_HD RowCtx make_ctx(const void* s, const void* a, const void* t, const void* g, int g_bytes, int64_t V) {
  constexpr int N = Elem<T>::kVec;
  // The gradient alone sets the phase on ignored rows (backward zero fill).
  const int ph = s != nullptr ? phase_of(s, static_cast<int>(sizeof(T)), N) : phase_of(g, g_bytes, N);
  bool vec = ph >= 0;
  if (s != nullptr && a != nullptr) vec = vec && phase_of(a, static_cast<int>(sizeof(T)), N) == ph;
  if (s != nullptr && t != nullptr) vec = vec && phase_of(t, static_cast<int>(sizeof(T)), N) == ph;
  if (s != nullptr && g != nullptr) vec = vec && phase_of(g, g_bytes, N) == ph;
  RowCtx c;
  c.vec = vec;
  c.phase = vec ? ph : 0;
  c.chunks = (V + c.phase + N - 1) / N;
  return c;
}

// ---------------------------------------------------------------------------------
// Forward: per-thread online state and its merge.
//
// Each log-sum-exp is (raw running max, Σ exp(x − safe(max))). The KL accumulators
// follow the CPU core: forward KL keeps acc1 = Σ e_z·(z/τ − max_z) and
// acc2 = Σ e_z·(s/τ − max_s), each gap relative to its own tensor's max, never
// Σ e_z·(z − s): at |logits| ~ 1e4 that sum would cancel against the max gap and lose
// the loss to fp32 rounding. Reverse KL mirrors it with e_s. When a max moves by
// `shift`, every stored gap moves by −shift: acc → c·(acc − shift·Σe).
struct FwdState {
  float ms, sum_s;  // s/τ
  float mz, sum_z;  // z/τ
  float acc1, acc2;
  float mh, sum_h;  // s at τ = 1 (hard term, τ != 1 only)
};

CAAD_HD FwdState identity_state() {
  FwdState r;
  r.ms = r.mz = r.mh = neg_inf();
  r.sum_s = r.sum_z = r.acc1 = r.acc2 = r.sum_h = 0.f;
  return r;
}

// Folding a new maximum into a running one: `c` rescales sums taken relative to the
// old safe max, `shift` = new safe − old safe. c is exactly 1 (and shift exactly 0)
// when the max did not move, so untouched states merge without rounding.
struct Advance {
  float safe, c, shift;
};

CAAD_HD Advance advance(float& raw, float chunk_max) {
  const float old_raw = raw;
  const float new_raw = fmaxf(old_raw, chunk_max);  // drops NaN; NaN rows are caught by `bad`
  Advance r;
  r.safe = safe_of(new_raw);
  r.c = new_raw == old_raw ? 1.f : fast_exp(fsub(old_raw, r.safe));  // exp(raw − safe): 0 for an empty state
  r.shift = fsub(r.safe, safe_of(old_raw));
  raw = new_raw;
  return r;
}

// c·(acc − shift·Σe), and 0 when c underflowed to 0. The guard matters for an
// accumulator holding -inf (an entry with p > 0 and s = -inf): if a later max makes
// that entry's weight underflow, it is dead (weight 0, like e = 0 entries that are
// skipped), not 0·(-inf) = NaN. Without it the result would depend on the order in
// which the entries were merged.
CAAD_HD float rescale(float c, float acc, float shift, float sum) {
  return c == 0.f ? 0.f : c * (acc - shift * sum);
}

struct MergeMax {
  float raw, ca, cb, sha, shb;
};

CAAD_HD MergeMax merge_max(float ra, float rb) {
  MergeMax m;
  m.raw = fmaxf(ra, rb);
  const float safe = safe_of(m.raw);
  m.ca = ra == m.raw ? 1.f : fast_exp(fsub(ra, safe));
  m.cb = rb == m.raw ? 1.f : fast_exp(fsub(rb, safe));
  m.sha = fsub(safe, safe_of(ra));
  m.shb = fsub(safe, safe_of(rb));
  return m;
}

// Merge of two thread states (what a cluster/DSMEM variant would use across CTAs).
// `soft` / `hard_sep` are the block-uniform flags of the z and τ = 1 log-sum-exps: a
// state that never saw those tensors keeps them at the identity, so they need no merge.
template <int DIV>
CAAD_HD FwdState merge_states(const FwdState& A, const FwdState& B, bool soft, bool hard_sep) {
  FwdState R = A;
  const MergeMax s = merge_max(A.ms, B.ms);
  R.ms = s.raw;
  R.sum_s = A.sum_s * s.ca + B.sum_s * s.cb;
  if (soft) {
    const MergeMax z = merge_max(A.mz, B.mz);
    R.mz = z.raw;
    R.sum_z = A.sum_z * z.ca + B.sum_z * z.cb;
    if (DIV == kForwardKL) {
      R.acc1 = rescale(z.ca, A.acc1, z.sha, A.sum_z) + rescale(z.cb, B.acc1, z.shb, B.sum_z);
      R.acc2 = rescale(z.ca, A.acc2, s.sha, A.sum_z) + rescale(z.cb, B.acc2, s.shb, B.sum_z);
    } else if (DIV == kReverseKL) {
      R.acc1 = rescale(s.ca, A.acc1, s.sha, A.sum_s) + rescale(s.cb, B.acc1, s.shb, B.sum_s);
      R.acc2 = rescale(s.ca, A.acc2, z.sha, A.sum_s) + rescale(s.cb, B.acc2, z.shb, B.sum_s);
    }
  }
  if (hard_sep) {
    const MergeMax h = merge_max(A.mh, B.mh);
    R.mh = h.raw;
    R.sum_h = A.sum_h * h.ca + B.sum_h * h.cb;
  }
  return R;
}

// z/τ: z = (1+α)a − αt (one fma), -inf where a is -inf whatever t is, and -inf below
// the plausibility threshold. Shared by every pass so all see identical bits.
CAAD_HD float contrast(const Params& p, float a, float t, float threshold) {
  float z = p.text ? ffma(p.one_plus_alpha, a, -fmul(p.alpha, t)) : a;
  z = a == neg_inf() ? neg_inf() : z;
  if (p.plaus) z = a < threshold ? neg_inf() : z;
  return fmul(z, p.inv_tau);
}

// One chunk of the streaming pass: the CPU core's block step with a block of VEC entries.
// Chunk maxima first, then one rescale per chunk (not per entry), then the entries'
// exps relative to the new safe maxima, so the chunk sums need no rescale.
template <typename T, int DIV, Load L = Load::kReadOnly>
CAAD_HD void forward_chunk(const Params& p, const T* s_row, const T* a_row, const T* t_row, int64_t j0, bool vec,
                           float threshold, FwdState& S, uint32_t& bad, uint32_t& infinite) {
  constexpr int N = Elem<T>::kVec;
  const int64_t V = p.vocab;
  // All loads first: three 16-byte requests in flight per thread before any use.
  const Raw rs = load_chunk<T, L>(s_row, j0, V, vec, Elem<T>::kNegInf);
  Raw ra = {{0, 0, 0, 0}}, rt = {{0, 0, 0, 0}};
  if (p.soft) {
    ra = load_chunk<T, L>(a_row, j0, V, vec, Elem<T>::kNegInf);
    if (p.text) rt = load_chunk<T, L>(t_row, j0, V, vec, 0u);
  }

  // Register budget (2 blocks of 512 threads per SM = 64 registers): only one
  // VEC-wide array crosses from the s loop to the z loop — the gaps s/τ − max_s for
  // forward KL, the weights e_s for reverse KL (whose Σ e_s·gap_s is summed at once).
  float keep[N];
  float smax = neg_inf();
  uint32_t s_possible = 0;  // bit k: s_k > -inf (q_k > 0 exactly)
CAAD_UNROLL
  for (int k = 0; k < N; ++k) {
    const float x = Elem<T>::get(rs, k);
    bad |= nan_or_pos_inf(x);
    s_possible |= (x != neg_inf() ? 1u : 0u) << k;
    keep[k] = fmul(x, p.inv_tau);
    smax = fmaxf(smax, keep[k]);
  }
  const Advance as = advance(S.ms, smax);
  float sum_s = 0.f, gx = 0.f;
CAAD_UNROLL
  for (int k = 0; k < N; ++k) {
    const float ds = fsub(keep[k], as.safe);
    const float es = fast_exp(ds);
    sum_s += es;
    if (DIV == kReverseKL) {
      gx += es > 0.f ? es * ds : 0.f;  // only entries with e > 0 count (0·log 0 = 0)
      keep[k] = es;
    } else {
      keep[k] = ds;
    }
  }

  // The hard term's log-sum-exp of s at τ = 1 (τ != 1 only), before the z part so the
  // raw s bits die early.
  if (p.hard && !p.tau_one) {
    float hmax = neg_inf();
CAAD_UNROLL
    for (int k = 0; k < N; ++k) hmax = fmaxf(hmax, Elem<T>::get(rs, k));
    const Advance ah = advance(S.mh, hmax);
    float sum_h = 0.f;
CAAD_UNROLL
    for (int k = 0; k < N; ++k) sum_h += fast_exp(fsub(Elem<T>::get(rs, k), ah.safe));
    S.sum_h = S.sum_h * ah.c + sum_h;
  }

  if (p.soft) {
    float dz[N];  // z/τ − max_z
    float zmax = neg_inf();
CAAD_UNROLL
    for (int k = 0; k < N; ++k) {
      const float a = Elem<T>::get(ra, k);
      const float t = p.text ? Elem<T>::get(rt, k) : 0.f;
      bad |= nan_or_pos_inf(a);
      if (p.text) bad |= bad_text(a, t);
      dz[k] = contrast(p, a, t, threshold);
      zmax = fmaxf(zmax, dz[k]);
    }
    const Advance az = advance(S.mz, zmax);
    float sum_z = 0.f, gy = 0.f;
CAAD_UNROLL
    for (int k = 0; k < N; ++k) {
      dz[k] = fsub(dz[k], az.safe);
      const float ez = fast_exp(dz[k]);
      sum_z += ez;
      // Entries in the weighting distribution's support where the other side is -inf make
      // KL = +inf whatever their rounded weight (SPEC §3): flagged, and kept out of the sums,
      // so the result does not depend on the order in which entries are met or merged.
      const bool z_impossible = dz[k] == neg_inf();
      const bool s_impossible = ((s_possible >> k) & 1u) == 0u;
      if (DIV == kForwardKL) {
        gx += ez > 0.f ? ez * dz[k] : 0.f;
        gy += ez > 0.f && !s_impossible ? ez * keep[k] : 0.f;
        infinite |= !z_impossible && s_impossible ? 1u : 0u;
      } else if (DIV == kReverseKL) {
        gy += keep[k] > 0.f && !z_impossible ? keep[k] * dz[k] : 0.f;
        infinite |= !s_impossible && z_impossible ? 1u : 0u;
      }
    }
    // Old sums (before this chunk) with the old maxima: the order matters.
    if (DIV == kForwardKL) {
      S.acc1 = rescale(az.c, S.acc1, az.shift, S.sum_z) + gx;
      S.acc2 = rescale(az.c, S.acc2, as.shift, S.sum_z) + gy;
    } else if (DIV == kReverseKL) {
      S.acc1 = rescale(as.c, S.acc1, as.shift, S.sum_s) + gx;
      S.acc2 = rescale(as.c, S.acc2, az.shift, S.sum_s) + gy;
    }
    S.sum_z = S.sum_z * az.c + sum_z;
  }
  S.sum_s = S.sum_s * as.c + sum_s;
}

// Row normalisers after the streaming pass (what the JSD pass and the backward need).
struct Norms {
  float mz, lsz, ms, lss;
};

CAAD_HD Norms make_norms(const FwdState& R) {
  Norms n;
  n.mz = safe_of(R.mz);
  n.ms = safe_of(R.ms);
  n.lsz = exact_log(R.sum_z);
  n.lss = exact_log(R.sum_s);
  return n;
}

// One chunk of the generalized-JSD pass: Σ p(log p − log m) and Σ q(log q − log m).
template <typename T, Load L = Load::kReadOnly>
CAAD_HD void jsd_chunk(const Params& p, const T* s_row, const T* a_row, const T* t_row, int64_t j0, bool vec,
                       float threshold, const Norms& nm, float& kp, float& kq) {
  constexpr int N = Elem<T>::kVec;
  const int64_t V = p.vocab;
  const Raw rs = load_chunk<T, L>(s_row, j0, V, vec, Elem<T>::kNegInf);
  const Raw ra = load_chunk<T, L>(a_row, j0, V, vec, Elem<T>::kNegInf);
  Raw rt = {{0, 0, 0, 0}};
  if (p.text) rt = load_chunk<T, L>(t_row, j0, V, vec, 0u);
CAAD_UNROLL
  for (int k = 0; k < N; ++k) {
    const float a = Elem<T>::get(ra, k);
    const float t = p.text ? Elem<T>::get(rt, k) : 0.f;
    // log p = (z/τ − max) − log Σ: exact near the max even at |z| ~ 1e4.
    const float lp = fsub(fsub(contrast(p, a, t, threshold), nm.mz), nm.lsz);
    const float lq = fsub(fsub(fmul(Elem<T>::get(rs, k), p.inv_tau), nm.ms), nm.lss);
    const float lm = log_add_exp(fadd(lq, p.log_1m_beta), fadd(lp, p.log_beta));
    const float pp = fast_exp(lp), q = fast_exp(lq);
    kp += pp > 0.f ? pp * (lp - lm) : 0.f;
    kq += q > 0.f ? q * (lq - lm) : 0.f;
  }
}

// Loss and statistics of a valid row from the merged state (thread 0). Same formulas
// and order as forward_row_impl.
template <int DIV>
CAAD_HD void finish_row(const Params& p, const FwdState& R, const Norms& nm, bool bad, bool infinite, float max_a,
                        float kl_pm, float kl_qm, bool label_in_range, float s_y, float* loss_out, float* stats) {
  float loss = bad ? quiet_nan() : 0.f;
  float div_aux = 0.f;
  if (p.soft) {
    float div;
    if (DIV == kForwardKL) {
      div = infinite ? pos_inf() : fsub(fdiv(fsub(R.acc1, R.acc2), R.sum_z), fsub(nm.lsz, nm.lss));
    } else if (DIV == kReverseKL) {
      div = infinite ? pos_inf() : fsub(fdiv(fsub(R.acc1, R.acc2), R.sum_s), fsub(nm.lss, nm.lsz));
      div_aux = div;
    } else {
      div = fadd(fmul(p.beta, kl_pm), fmul(p.one_minus_beta, kl_qm));
      div_aux = kl_qm;
    }
    // SPEC §3: a row with no distribution (all of s/τ, or all of z/τ, −inf) has no divergence.
    if (R.sum_s == 0.f || R.sum_z == 0.f) div = quiet_nan();
    loss = fadd(loss, fmul(p.w_soft, div));
  }
  const float max_h = p.tau_one ? nm.ms : safe_of(R.mh);
  const float lsh = p.tau_one ? nm.lss : exact_log(R.sum_h);
  if (p.hard) {
    const float ce = label_in_range ? fadd(fsub(max_h, s_y), lsh) : quiet_nan();
    loss = fadd(loss, fmul(p.w_hard, ce));
  }
  *loss_out = loss;
  stats[kMaxZ] = nm.mz;
  stats[kLogSumZ] = nm.lsz;
  stats[kMaxS] = nm.ms;
  stats[kLogSumS] = nm.lss;
  stats[kMaxH] = max_h;
  stats[kLogSumH] = lsh;
  stats[kMaxA] = max_a;
  stats[kDivAux] = div_aux;
}

// ---------------------------------------------------------------------------------
// Backward: per-row constants and one chunk of the gradient.

struct BwdRow {
  float max_z, lsz, max_s, lss, max_h, lsh, threshold, div_aux;
  float c_soft, c_soft_jsd, c_hard;
  int64_t label;
};

CAAD_HD BwdRow make_bwd_row(const Params& p, const float* st, float upstream, int64_t label) {
  BwdRow r;
  r.max_z = st[kMaxZ];
  r.lsz = st[kLogSumZ];
  r.max_s = st[kMaxS];
  r.lss = st[kLogSumS];
  r.max_h = st[kMaxH];
  r.lsh = st[kLogSumH];
  r.threshold = fadd(st[kMaxA], p.log_beta_p);  // the forward's threshold, bit for bit
  r.div_aux = st[kDivAux];
  r.c_soft = fmul(fmul(upstream, p.w_soft), p.inv_tau);
  r.c_soft_jsd = fmul(r.c_soft, p.one_minus_beta);
  r.c_hard = fmul(upstream, p.w_hard);
  r.label = label;
  return r;
}

// d loss/d s for entries j0 .. j0+VEC−1, the CPU core's formulas per divergence:
//   forward KL  (q − p)·c,  reverse KL  q(log q − log p − KL)·c,
//   JSD  (1−β)·q(log q − log m − KL(q‖m))·c,  hard  w·(softmax(s) − onehot(y)).
template <typename T, int DIV, Load LS = Load::kStreaming, Load LA = Load::kReadOnly>
CAAD_HD void backward_chunk(const Params& p, const BwdRow& r, const T* s_row, const T* a_row, const T* t_row,
                            int64_t j0, bool vec, float (&g)[Elem<T>::kVec]) {
  constexpr int N = Elem<T>::kVec;
  const int64_t V = p.vocab;
  const Raw rs = load_chunk<T, LS>(s_row, j0, V, vec, Elem<T>::kNegInf);
  Raw ra = {{0, 0, 0, 0}}, rt = {{0, 0, 0, 0}};
  if (p.soft) {
    ra = load_chunk<T, LA>(a_row, j0, V, vec, Elem<T>::kNegInf);
    if (p.text) rt = load_chunk<T, LA>(t_row, j0, V, vec, 0u);
  }
CAAD_UNROLL
  for (int k = 0; k < N; ++k) {
    const float x = Elem<T>::get(rs, k);
    const float lq = fsub(fsub(fmul(x, p.inv_tau), r.max_s), r.lss);
    const float q = fast_exp(lq);
    float gk = 0.f;
    if (p.soft) {
      const float a = Elem<T>::get(ra, k);
      const float t = p.text ? Elem<T>::get(rt, k) : 0.f;
      const float lp = fsub(fsub(contrast(p, a, t, r.threshold), r.max_z), r.lsz);
      if (DIV == kForwardKL) {
        gk = r.c_soft * (q - fast_exp(lp));
      } else if (DIV == kReverseKL) {
        gk = r.c_soft * (q > 0.f ? q * ((lq - lp) - r.div_aux) : 0.f);
      } else {
        const float lm = log_add_exp(fadd(lq, p.log_1m_beta), fadd(lp, p.log_beta));
        gk = r.c_soft_jsd * (q > 0.f ? q * ((lq - lm) - r.div_aux) : 0.f);
      }
    }
    if (p.hard) {
      // At τ = 1, q is softmax(s) exactly as the hard term defines it (max_h = max_s,
      // log_sum_h = log_sum_s, s·1 = s), so it is reused.
      const float qh = p.tau_one ? q : fast_exp(fsub(fsub(x, r.max_h), r.lsh));
      gk += r.c_hard * qh;
      if (j0 + k == r.label) gk -= r.c_hard;
    }
    g[k] = gk;
  }
}

// ---------------------------------------------------------------------------------
// Block reductions, written against a warp context `w` — lane()/warp()/warps(),
// shfl_down(v, off) and shfl_xor(v, off) over the 32 lanes of a warp, sync() for the
// block barrier — so the GPU (DeviceWarp) and the host emulator of
// csrc/tests/kernel_emulation_test.cu run the same trees and the same slot protocol.

// Fixed-shape tree: lane l merges lane l+off. Lanes whose partner is out of range merge
// with themselves; their values never reach lane 0. Result in lane 0.
#pragma nv_exec_check_disable
template <int DIV, class W>
CAAD_HD FwdState warp_merge(const W& w, FwdState v, bool soft, bool hard_sep) {
CAAD_UNROLL
  for (int off = 16; off > 0; off >>= 1) v = merge_states<DIV>(v, w.shfl_down(v, off), soft, hard_sep);
  return v;
}

// Result valid in thread 0 only. `slots` may be rewritten only after the caller's next
// barrier (warp 0 may still be reading them).
#pragma nv_exec_check_disable
template <int DIV, class W>
CAAD_HD FwdState block_merge(const W& w, FwdState v, FwdState* slots, bool soft, bool hard_sep) {
  const int lane = w.lane(), warp = w.warp(), nwarps = w.warps();
  v = warp_merge<DIV>(w, v, soft, hard_sep);
  if (lane == 0) slots[warp] = v;
  w.sync();
  if (warp == 0) {
    v = lane < nwarps ? slots[lane] : identity_state();
    v = warp_merge<DIV>(w, v, soft, hard_sep);
  }
  return v;
}

// Sum of two floats over the block, same tree; result valid in thread 0.
#pragma nv_exec_check_disable
template <class W>
CAAD_HD float2 block_sum2(const W& w, float2 v, float2* slots) {
  const int lane = w.lane(), warp = w.warp(), nwarps = w.warps();
CAAD_UNROLL
  for (int off = 16; off > 0; off >>= 1) {
    const float2 o = w.shfl_down(v, off);
    v.x += o.x;
    v.y += o.y;
  }
  if (lane == 0) slots[warp] = v;
  w.sync();
  if (warp == 0) {
    v = lane < nwarps ? slots[lane] : make_float2(0.f, 0.f);
CAAD_UNROLL
    for (int off = 16; off > 0; off >>= 1) {
      const float2 o = w.shfl_down(v, off);
      v.x += o.x;
      v.y += o.y;
    }
  }
  return v;
}

// Max over the block, returned to every thread (max is exact: order does not matter).
#pragma nv_exec_check_disable
template <class W>
CAAD_HD float block_max_all(const W& w, float v, float* slots) {
  const int lane = w.lane(), warp = w.warp(), nwarps = w.warps();
CAAD_UNROLL
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, w.shfl_xor(v, off));
  if (lane == 0) slots[warp] = v;
  w.sync();
  float m = neg_inf();
  for (int i = 0; i < nwarps; ++i) m = fmaxf(m, slots[i]);
  return m;
}

// The GPU's warp context: full-mask shuffles (every block is a whole number of warps).
struct DeviceWarp {
  __device__ int lane() const { return threadIdx.x & 31; }
  __device__ int warp() const { return threadIdx.x >> 5; }
  __device__ int warps() const { return blockDim.x >> 5; }
  __device__ void sync() const { __syncthreads(); }
  __device__ float shfl_xor(float v, int off) const { return __shfl_xor_sync(0xffffffffu, v, off); }
  __device__ float2 shfl_down(float2 v, int off) const {
    return make_float2(__shfl_down_sync(0xffffffffu, v.x, off), __shfl_down_sync(0xffffffffu, v.y, off));
  }
  __device__ FwdState shfl_down(const FwdState& v, int off) const {
    FwdState r;
    r.ms = __shfl_down_sync(0xffffffffu, v.ms, off);
    r.sum_s = __shfl_down_sync(0xffffffffu, v.sum_s, off);
    r.mz = __shfl_down_sync(0xffffffffu, v.mz, off);
    r.sum_z = __shfl_down_sync(0xffffffffu, v.sum_z, off);
    r.acc1 = __shfl_down_sync(0xffffffffu, v.acc1, off);
    r.acc2 = __shfl_down_sync(0xffffffffu, v.acc2, off);
    r.mh = __shfl_down_sync(0xffffffffu, v.mh, off);
    r.sum_h = __shfl_down_sync(0xffffffffu, v.sum_h, off);
    return r;
  }
};

template <typename T>
CAAD_HD const T* row_ptr(const void* base, int64_t bi, int64_t ti, int64_t sb, int64_t st) {
  return base == nullptr ? nullptr : static_cast<const T*>(base) + (bi * sb + ti * st);
}

// The kernel bodies below are written against an execution context `cx` (one thread's
// view of its block) so the same code runs on the GPU (DeviceBlockCtx) and in the host
// emulator of csrc/tests/kernel_emulation_test.cu (std::thread blocks on the CPU).
// `cx` gives: block()/blocks() (grid-stride over rows), tid()/threads(), sync_block(),
// any(v) (block OR, every thread), block_max(v) (every thread), merge<DIV>(state, soft,
// hard_sep) and sum2(v) (block reductions, result in thread 0).

#pragma nv_exec_check_disable
template <typename T, int DIV, class Ctx>
CAAD_HD void forward_rows(const Params& p, Ctx& cx, Norms& norms) {
  constexpr int N = Elem<T>::kVec;
  const int64_t tid = cx.tid(), nt = cx.threads();
  // Rows are independent: a grid-stride loop only matters when N exceeds the grid limit.
  for (int64_t row = cx.block(); row < p.rows; row += cx.blocks()) {
    const int64_t bi = row / p.rows_per_batch, ti = row - bi * p.rows_per_batch;
    int64_t y = 0;
    if (p.labels != nullptr) y = p.labels[bi * p.l_sb + ti * p.l_st];
    if (p.labels != nullptr && y == p.ignore_index) {  // block-uniform
      if (tid == 0) p.loss[row] = 0.f;
      for (int64_t k = tid; k < kNumStats; k += nt) p.stats_out[row * kNumStats + k] = 0.f;
      continue;
    }
    const T* s_row = row_ptr<T>(p.s, bi, ti, p.s_sb, p.s_st);
    const T* a_row = p.soft ? row_ptr<T>(p.a, bi, ti, p.a_sb, p.a_st) : nullptr;
    const T* t_row = p.text ? row_ptr<T>(p.t, bi, ti, p.t_sb, p.t_st) : nullptr;
    const RowCtx ctx = make_ctx<T>(s_row, a_row, t_row, nullptr, 0, p.vocab);

    float max_a = neg_inf();
    if (p.plaus) {
      float m = neg_inf();
      for (int64_t c = tid; c < ctx.chunks; c += nt) {
        const Raw r = load_chunk<T, Load::kReadOnly>(a_row, c * N - ctx.phase, p.vocab, ctx.vec, Elem<T>::kNegInf);
CAAD_UNROLL
        for (int k = 0; k < N; ++k) m = fmaxf(m, Elem<T>::get(r, k));
      }
      max_a = cx.block_max(m);
    }
    const float threshold = fadd(max_a, p.log_beta_p);

    FwdState S = identity_state();
    uint32_t bad = 0, infinite = 0;
    for (int64_t c = tid; c < ctx.chunks; c += nt) {
      forward_chunk<T, DIV>(p, s_row, a_row, t_row, c * N - ctx.phase, ctx.vec, threshold, S, bad, infinite);
    }
    const bool any_bad = cx.any(bad != 0);
    const bool any_infinite = cx.any(infinite != 0);
    S = cx.template merge<DIV>(S, p.soft, p.hard && !p.tau_one);

    float kl_pm = 0.f, kl_qm = 0.f;
    if (DIV == kJSD && p.soft) {
      if (tid == 0) norms = make_norms(S);
      cx.sync_block();
      const Norms nm = norms;
      float2 k2 = make_float2(0.f, 0.f);
      for (int64_t c = tid; c < ctx.chunks; c += nt) {
        jsd_chunk<T>(p, s_row, a_row, t_row, c * N - ctx.phase, ctx.vec, threshold, nm, k2.x, k2.y);
      }
      k2 = cx.sum2(k2);
      kl_pm = k2.x;
      kl_qm = k2.y;
    }
    if (tid == 0) {
      const bool in_range = y >= 0 && y < p.vocab;
      float s_y = 0.f;
      if (p.hard && in_range) s_y = Elem<T>::from_bits(reinterpret_cast<const typename Elem<T>::Bits*>(s_row)[y]);
      finish_row<DIV>(p, S, make_norms(S), any_bad, any_infinite, max_a, kl_pm, kl_qm, in_range, s_y, p.loss + row,
                      p.stats_out + row * kNumStats);
    }
    cx.sync_block();  // the shared slots are reused by the next row
  }
}

#pragma nv_exec_check_disable
template <typename T, typename G, int DIV, class Ctx>
CAAD_HD void backward_rows(const Params& p, Ctx& cx) {
  constexpr int N = Elem<T>::kVec;
  const int64_t tid = cx.tid(), nt = cx.threads();
  const float zeros[N] = {};
  for (int64_t row = cx.block(); row < p.rows; row += cx.blocks()) {
    const int64_t bi = row / p.rows_per_batch, ti = row - bi * p.rows_per_batch;
    G* g_row = static_cast<G*>(p.grad) + (bi * p.g_sb + ti * p.g_st);
    int64_t y = 0;
    if (p.labels != nullptr) y = p.labels[bi * p.l_sb + ti * p.l_st];
    if (p.labels != nullptr && y == p.ignore_index) {
      // An exact zero gradient; the buffer may be uninitialised or hold s.
      const RowCtx ctx = make_ctx<T>(nullptr, nullptr, nullptr, g_row, sizeof(G), p.vocab);
      for (int64_t c = tid; c < ctx.chunks; c += nt) store_chunk<G, N>(g_row, c * N - ctx.phase, p.vocab, ctx.vec, zeros);
      continue;
    }
    const T* s_row = row_ptr<T>(p.s, bi, ti, p.s_sb, p.s_st);
    const T* a_row = p.soft ? row_ptr<T>(p.a, bi, ti, p.a_sb, p.a_st) : nullptr;
    const T* t_row = p.text ? row_ptr<T>(p.t, bi, ti, p.t_sb, p.t_st) : nullptr;
    const RowCtx ctx = make_ctx<T>(s_row, a_row, t_row, g_row, sizeof(G), p.vocab);
    // Every thread reads the same 8 statistics: one broadcast L1 line.
    const BwdRow r = make_bwd_row(p, p.stats_in + row * kNumStats, p.grad_rows[row * p.grad_rows_stride], y);
    for (int64_t c = tid; c < ctx.chunks; c += nt) {
      const int64_t j0 = c * N - ctx.phase;
      float g[N];
      backward_chunk<T, DIV>(p, r, s_row, a_row, t_row, j0, ctx.vec, g);
      store_chunk<G, N>(g_row, j0, p.vocab, ctx.vec, g);
    }
  }
}

// One thread's view of its block on the GPU.
struct DeviceBlockCtx {
  FwdState* state_slots;
  float2* sum_slots;
  float* max_slots;

  __device__ int64_t block() const { return blockIdx.x; }
  __device__ int64_t blocks() const { return gridDim.x; }
  __device__ int64_t tid() const { return threadIdx.x; }
  __device__ int64_t threads() const { return blockDim.x; }
  __device__ void sync_block() const { __syncthreads(); }
  __device__ bool any(bool v) const { return __syncthreads_or(v ? 1 : 0) != 0; }
  __device__ float block_max(float v) const { return block_max_all(DeviceWarp{}, v, max_slots); }
  template <int DIV>
  __device__ FwdState merge(FwdState v, bool soft, bool hard_sep) const {
    return block_merge<DIV>(DeviceWarp{}, v, state_slots, soft, hard_sep);
  }
  __device__ float2 sum2(float2 v) const { return block_sum2(DeviceWarp{}, v, sum_slots); }
};

template <typename T, int DIV>
__global__ void __launch_bounds__(kMaxThreads, 2) contrastive_kd_forward_kernel(const Params p) {
  __shared__ FwdState state_slots[kMaxWarps];
  __shared__ float2 sum_slots[kMaxWarps];
  __shared__ float max_slots[kMaxWarps];
  __shared__ Norms norms;
  DeviceBlockCtx cx{state_slots, sum_slots, max_slots};
  forward_rows<T, DIV>(p, cx, norms);
}

template <typename T, typename G, int DIV>
__global__ void __launch_bounds__(kMaxThreads, 2) contrastive_kd_backward_kernel(const Params p) {
  DeviceBlockCtx cx{nullptr, nullptr, nullptr};
  backward_rows<T, G, DIV>(p, cx);
}

// ---------------------------------------------------------------------------------
// sm_90: forward and gradient in one launch, the row held on chip by a thread-block
// cluster (grad_in_forward; see README.md "Single pass on Hopper").
//
// A cluster of K CTAs owns one row; CTA r copies entries [r·slice, r·slice + slice) of
// s, a and t into its shared memory with cp.async (one HBM read), runs the forward
// chunks over them, and the K per-CTA states are merged through distributed shared
// memory — every CTA folds them in rank order, so all K hold bitwise the same row
// statistics (and the result does not depend on K's scheduling). Each CTA then writes
// its slice of the gradient from shared memory: 8 bytes per entry of HBM traffic in
// bf16 (read s, a, t; write grad) instead of the two-kernel path's 14. The upstream
// gradient of the row (1/divisor of the reduction) is an input, which is why this
// path exists only behind grad_in_forward.
//
// Preconditions (checked by the launcher, which otherwise reports "not supported" so
// the caller runs the two kernels): compute capability 9.x, one input dtype shared by
// the gradient, V a multiple of the 16-byte chunk, every row start 16-byte aligned,
// and a slice that fits the shared memory budget with K <= 16.

constexpr int kClusterMaxThreads = 256;  // ~80 registers: 3 CTAs of 256 per SM
constexpr int kMaxClusterSize = 16;

struct ClusterExchange {  // what each CTA publishes to the others (written by its thread 0)
  FwdState state;
  float max_a;
  float kl_pm, kl_qm;
  uint32_t flags;  // bit 0: a NaN/+inf entry; bit 1: an entry with infinite divergence
};

// One CTA's row-level shared state.
struct ClusterCtaShared {
  ClusterExchange mine;
  FwdState merged;
  float row_stats[kNumStats];
  float row_loss;
  uint32_t row_flags;
  float row_kl[2];
};

// The kernel body, one thread's view, written against an execution context `cx` so the
// same code runs on the GPU (DeviceClusterCtx below) and in the host emulator of
// csrc/tests/kernel_emulation_test.cu (threads and barriers on the CPU). `cx` gives:
// rank()/size() in the cluster, cluster_id()/clusters(), tid()/threads(), sync_block(),
// sync_cluster(), any(v) (block OR, every thread), block_max(v) (every thread),
// merge<DIV>(state, soft, hard_sep) and sum2(v) (block reductions, result in thread 0),
// remote(&local, r) (the same shared object in CTA r), copy16(dst, src) / copy_wait().
// `stage` is this CTA's dynamic shared memory: s | a | t, `slice` entries each.
#pragma nv_exec_check_disable
template <typename T, int DIV, class Ctx>
CAAD_HD void cluster_rows(const Params& p, const int64_t slice, Ctx& cx, ClusterCtaShared& sh, unsigned char* stage) {
  constexpr int N = Elem<T>::kVec;
  const unsigned rank = cx.rank(), K = cx.size();
  const int64_t tid = cx.tid(), nt = cx.threads();
  T* s_sm = reinterpret_cast<T*>(stage);  // slice is a multiple of N: each part is 16-byte aligned
  T* a_sm = s_sm + slice;
  T* t_sm = a_sm + (p.soft ? slice : 0);
  const int64_t j_begin = static_cast<int64_t>(rank) * slice;
  const int64_t len = j_begin < p.vocab ? (p.vocab - j_begin < slice ? p.vocab - j_begin : slice) : 0;
  const int64_t chunks = len / N;  // len is a multiple of N (V is)
  const bool hard_sep = p.hard && !p.tau_one;

  for (int64_t row = cx.cluster_id(); row < p.rows; row += cx.clusters()) {
    const int64_t bi = row / p.rows_per_batch, ti = row - bi * p.rows_per_batch;
    T* g_row = static_cast<T*>(p.grad) + (bi * p.g_sb + ti * p.g_st) + j_begin;
    int64_t y = 0;
    if (p.labels != nullptr) y = p.labels[bi * p.l_sb + ti * p.l_st];
    if (p.labels != nullptr && y == p.ignore_index) {  // uniform over the cluster: no cluster barrier here
      const float zeros[N] = {};
      for (int64_t c = tid; c < chunks; c += nt) store_chunk<T, N>(g_row, c * N, len, true, zeros);
      if (rank == 0 && tid == 0) p.loss[row] = 0.f;
      if (rank == 0) {
        for (int64_t k = tid; k < kNumStats; k += nt) p.stats_out[row * kNumStats + k] = 0.f;
      }
      continue;
    }
    const T* s_row = row_ptr<T>(p.s, bi, ti, p.s_sb, p.s_st);
    const T* a_row = p.soft ? row_ptr<T>(p.a, bi, ti, p.a_sb, p.a_st) : nullptr;
    const T* t_row = p.text ? row_ptr<T>(p.t, bi, ti, p.t_sb, p.t_st) : nullptr;

    // 1. Stage this CTA's slice: the only HBM read of s, a and t.
    for (int64_t c = tid; c < chunks; c += nt) {
      cx.copy16(s_sm + c * N, s_row + j_begin + c * N);
      if (p.soft) cx.copy16(a_sm + c * N, a_row + j_begin + c * N);
      if (p.text) cx.copy16(t_sm + c * N, t_row + j_begin + c * N);
    }
    cx.copy_wait();
    cx.sync_block();

    // 2. Plausibility: the row's max(a) is the max of the CTAs' maxima (exact in any order).
    float max_a = neg_inf();
    if (p.plaus) {
      float m = neg_inf();
      for (int64_t c = tid; c < chunks; c += nt) {
        const Raw r = load_chunk<T, Load::kShared>(a_sm, c * N, len, true, Elem<T>::kNegInf);
CAAD_UNROLL
        for (int k = 0; k < N; ++k) m = fmaxf(m, Elem<T>::get(r, k));
      }
      m = cx.block_max(m);
      if (tid == 0) sh.mine.max_a = m;
      cx.sync_cluster();
      for (unsigned r = 0; r < K; ++r) max_a = fmaxf(max_a, cx.remote(&sh.mine, r)->max_a);
    }
    const float threshold = fadd(max_a, p.log_beta_p);

    // 3. Streaming statistics over the slice, merged over the block, then over the cluster.
    FwdState S = identity_state();
    uint32_t bad = 0, infinite = 0;
    for (int64_t c = tid; c < chunks; c += nt) {
      forward_chunk<T, DIV, Load::kShared>(p, s_sm, a_sm, t_sm, c * N, true, threshold, S, bad, infinite);
    }
    const bool any_bad = cx.any(bad != 0);
    const bool any_infinite = cx.any(infinite != 0);
    S = cx.template merge<DIV>(S, p.soft, hard_sep);
    if (tid == 0) {
      sh.mine.state = S;
      sh.mine.flags = (any_bad ? 1u : 0u) | (any_infinite ? 2u : 0u);
    }
    cx.sync_cluster();
    if (tid == 0) {
      // Fixed rank order in every CTA: the K copies of the row statistics are bitwise equal.
      FwdState R = cx.remote(&sh.mine, 0u)->state;
      uint32_t flags = cx.remote(&sh.mine, 0u)->flags;
      for (unsigned r = 1; r < K; ++r) {
        const ClusterExchange* o = cx.remote(&sh.mine, r);
        R = merge_states<DIV>(R, o->state, p.soft, hard_sep);
        flags |= o->flags;
      }
      sh.merged = R;
      sh.row_flags = flags;
    }
    cx.sync_block();
    const Norms nm = make_norms(sh.merged);

    // 4. Generalized JSD: its second pass runs over shared memory, then one more exchange.
    if (DIV == kJSD && p.soft) {
      float2 k2 = make_float2(0.f, 0.f);
      for (int64_t c = tid; c < chunks; c += nt) {
        jsd_chunk<T, Load::kShared>(p, s_sm, a_sm, t_sm, c * N, true, threshold, nm, k2.x, k2.y);
      }
      k2 = cx.sum2(k2);
      if (tid == 0) {
        sh.mine.kl_pm = k2.x;
        sh.mine.kl_qm = k2.y;
      }
      cx.sync_cluster();
      if (tid == 0) {
        float pm = 0.f, qm = 0.f;
        for (unsigned r = 0; r < K; ++r) {
          pm += cx.remote(&sh.mine, r)->kl_pm;
          qm += cx.remote(&sh.mine, r)->kl_qm;
        }
        sh.row_kl[0] = pm;
        sh.row_kl[1] = qm;
      }
    }

    // 5. Loss and statistics (every CTA computes them; rank 0 stores them).
    if (tid == 0) {
      const bool in_range = y >= 0 && y < p.vocab;
      float s_y = 0.f;
      if (p.hard && in_range) s_y = Elem<T>::from_bits(reinterpret_cast<const typename Elem<T>::Bits*>(s_row)[y]);
      const bool jsd = DIV == kJSD && p.soft;
      finish_row<DIV>(p, sh.merged, nm, (sh.row_flags & 1u) != 0, (sh.row_flags & 2u) != 0, max_a,
                      jsd ? sh.row_kl[0] : 0.f, jsd ? sh.row_kl[1] : 0.f, in_range, s_y, &sh.row_loss,
                      sh.row_stats);
      if (rank == 0) p.loss[row] = sh.row_loss;
    }
    cx.sync_block();
    if (rank == 0) {
      for (int64_t k = tid; k < kNumStats; k += nt) p.stats_out[row * kNumStats + k] = sh.row_stats[k];
    }

    // 6. The gradient of this slice, from shared memory. Label positions are slice-relative.
    const BwdRow r = make_bwd_row(p, sh.row_stats, p.grad_rows[row * p.grad_rows_stride], y - j_begin);
    for (int64_t c = tid; c < chunks; c += nt) {
      float g[N];
      backward_chunk<T, DIV, Load::kShared, Load::kShared>(p, r, s_sm, a_sm, t_sm, c * N, true, g);
      store_chunk<T, N>(g_row, c * N, len, true, g);
    }
    // No CTA may reuse `mine` or its row buffers, or exit, while another still reads them.
    cx.sync_cluster();
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
struct DeviceClusterCtx : DeviceBlockCtx {
  cooperative_groups::cluster_group cluster;

  __device__ unsigned rank() const { return cluster.block_rank(); }
  __device__ unsigned size() const { return cluster.num_blocks(); }
  __device__ int64_t cluster_id() const { return blockIdx.x / cluster.num_blocks(); }
  __device__ int64_t clusters() const { return gridDim.x / cluster.num_blocks(); }
  __device__ void sync_cluster() { cluster.sync(); }
  template <class X>
  __device__ X* remote(X* local, unsigned r) {
    return cluster.map_shared_rank(local, r);
  }
  __device__ void copy16(void* smem, const void* gmem) const {
    const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(addr), "l"(gmem) : "memory");
  }
  __device__ void copy_wait() const { asm volatile("cp.async.commit_group;\ncp.async.wait_all;\n" ::: "memory"); }
};
#endif

template <typename T, int DIV>
__global__ void __launch_bounds__(kClusterMaxThreads, 3)
    contrastive_kd_cluster_kernel(const Params p, const int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(16) unsigned char row_smem[];
  __shared__ FwdState state_slots[kMaxWarps];
  __shared__ float2 sum_slots[kMaxWarps];
  __shared__ float max_slots[kMaxWarps];
  __shared__ ClusterCtaShared sh;
  DeviceClusterCtx cx{{state_slots, sum_slots, max_slots}, cooperative_groups::this_cluster()};
  cluster_rows<T, DIV>(p, slice, cx, sh, row_smem);
#else
  __trap();  // built for an architecture without clusters; the launcher never gets here
#endif
}

// ---------------------------------------------------------------------------------
// Host side.

inline bool supported_input(DType d) {
  return d == DType::kFloat32 || d == DType::kBFloat16 || d == DType::kFloat16;
}

inline Params make_params(const RowTensor& s, const RowTensor& a, const RowTensor& t, const LabelView& labels,
                          int64_t rows, int64_t rows_per_batch, int64_t vocab, const KernelOptions& o,
                          int64_t ignore_index) {
  Params p;
  std::memset(&p, 0, sizeof p);
  p.s = s.ptr;
  p.s_sb = s.stride_b;
  p.s_st = s.stride_t;
  p.a = o.soft ? a.ptr : nullptr;
  p.a_sb = a.stride_b;
  p.a_st = a.stride_t;
  p.t = o.use_text ? t.ptr : nullptr;
  p.t_sb = t.stride_b;
  p.t_st = t.stride_t;
  p.labels = labels.ptr;
  p.l_sb = labels.stride_b;
  p.l_st = labels.stride_t;
  p.rows = rows;
  p.rows_per_batch = rows_per_batch;
  p.vocab = vocab;
  p.ignore_index = ignore_index;
  // Rounded like the CPU core's fp32 path: each option once to float, then float math.
  p.alpha = static_cast<float>(o.alpha);
  p.one_plus_alpha = 1.f + p.alpha;
  p.inv_tau = static_cast<float>(o.inv_tau);
  p.log_beta_p = static_cast<float>(o.log_beta_p);
  p.beta = static_cast<float>(o.jsd_beta);
  p.one_minus_beta = 1.f - p.beta;
  p.log_1m_beta = static_cast<float>(std::log1p(-o.jsd_beta));
  p.log_beta = static_cast<float>(std::log(o.jsd_beta));
  p.w_soft = static_cast<float>(o.soft_weight);
  p.w_hard = static_cast<float>(o.hard_weight);
  p.soft = o.soft;
  p.text = o.soft && o.use_text;
  p.plaus = o.soft && o.plausibility;
  p.hard = o.hard;
  p.tau_one = o.tau_one;
  return p;
}

// Threads per row: enough chunks per thread (>= 4) to amortise the block reduction,
// up to 512 (2 blocks of 512 per SM keep ~48 KB of loads in flight per SM).
inline int threads_for(int64_t vocab, int vec) {
  const int64_t chunks = vocab / vec + 1;
  if (chunks >= 4 * 512) return 512;
  if (chunks >= 4 * 256) return 256;
  return 128;
}

inline unsigned grid_for(int64_t rows) {
  return static_cast<unsigned>(rows < INT_MAX ? rows : INT_MAX);
}

template <typename T, int DIV>
void launch_forward_t(const Params& p, cudaStream_t stream) {
  contrastive_kd_forward_kernel<T, DIV><<<grid_for(p.rows), threads_for(p.vocab, Elem<T>::kVec), 0, stream>>>(p);
}

template <typename T>
void launch_forward_div(const Params& p, int div, cudaStream_t stream) {
  switch (div) {
    case kForwardKL: launch_forward_t<T, kForwardKL>(p, stream); break;
    case kReverseKL: launch_forward_t<T, kReverseKL>(p, stream); break;
    default: launch_forward_t<T, kJSD>(p, stream); break;
  }
}

template <typename T, typename G, int DIV>
void launch_backward_t(const Params& p, cudaStream_t stream) {
  contrastive_kd_backward_kernel<T, G, DIV>
      <<<grid_for(p.rows), threads_for(p.vocab, Elem<T>::kVec), 0, stream>>>(p);
}

template <typename T, typename G>
void launch_backward_div(const Params& p, int div, cudaStream_t stream) {
  switch (div) {
    case kForwardKL: launch_backward_t<T, G, kForwardKL>(p, stream); break;
    case kReverseKL: launch_backward_t<T, G, kReverseKL>(p, stream); break;
    default: launch_backward_t<T, G, kJSD>(p, stream); break;
  }
}


// Cluster size K and the slice each CTA stages: the smallest K (a power of two, <= 16)
// whose slice fits 64 KB — three CTAs per SM, so one CTA's copy overlaps another's
// math — else the smallest whose slice fits what the device allows one CTA.
struct ClusterPlan {
  int k = 0;
  int64_t slice = 0;
  size_t smem = 0;
  int threads = 0;
};

inline bool plan_cluster(int64_t vocab, int vec, size_t bytes_per_entry, size_t smem_limit, ClusterPlan& out) {
  const size_t budgets[2] = {size_t{64} << 10, smem_limit};
  for (const size_t budget : budgets) {
    for (int k = 1; k <= kMaxClusterSize; k *= 2) {
      const int64_t per_cta = (vocab + k - 1) / k;
      const int64_t slice = (per_cta + vec - 1) / vec * vec;
      const size_t bytes = static_cast<size_t>(slice) * bytes_per_entry;
      if (bytes <= budget && bytes <= smem_limit) {
        out.k = k;
        out.slice = slice;
        out.smem = bytes;
        out.threads = slice / vec >= 4 * 256 ? 256 : 128;  // >= 4 chunks per thread when the slice allows
        return true;
      }
    }
  }
  return false;
}

template <typename T, int DIV>
cudaError_t launch_cluster_t(const Params& p, cudaStream_t stream) {
  constexpr int N = Elem<T>::kVec;
  auto kernel = contrastive_kd_cluster_kernel<T, DIV>;
  int dev = 0, major = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    return cudaErrorNotSupported;
  }
  if (major < 9) return cudaErrorNotSupported;
  cudaFuncAttributes fa;
  // A build without sm_90 code has only the trapping body: never launch it.
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess || fa.ptxVersion < 90 || fa.binaryVersion < 90) {
    return cudaErrorNotSupported;
  }
  const size_t staged = sizeof(T) * static_cast<size_t>(1 + (p.soft ? 1 : 0) + (p.text ? 1 : 0));
  const size_t limit = static_cast<size_t>(optin) > fa.sharedSizeBytes ? optin - fa.sharedSizeBytes : 0;
  ClusterPlan plan;
  if (!plan_cluster(p.vocab, N, staged, limit, plan)) return cudaErrorNotSupported;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(plan.k);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  const int64_t max_clusters = INT_MAX / plan.k;
  const int64_t clusters = p.rows < max_clusters ? p.rows : max_clusters;
  cfg.gridDim = dim3(static_cast<unsigned>(clusters * plan.k), 1, 1);
  cfg.blockDim = dim3(static_cast<unsigned>(plan.threads), 1, 1);
  cfg.dynamicSmemBytes = plan.smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  // The shared-memory attribute is set on every launch (plans of different V need different
  // sizes); the occupancy answer is cached per (device, kernel, plan): it is a host-side
  // computation worth skipping on every training step.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem)) !=
      cudaSuccess) {
    return cudaErrorNotSupported;
  }
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, size_t, int, int>, bool> schedulable;
  const auto key = std::make_tuple(dev, reinterpret_cast<const void*>(kernel), plan.smem, plan.k, plan.threads);
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto it = schedulable.find(key);
    if (it == schedulable.end()) {
      bool ok = plan.k <= 8 ||
                cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
      int active = 0;
      ok = ok && cudaOccupancyMaxActiveClusters(&active, kernel, &cfg) == cudaSuccess && active >= 1;
      it = schedulable.emplace(key, ok).first;
    }
    if (!it->second) return cudaErrorNotSupported;
  }
  return cudaLaunchKernelEx(&cfg, kernel, p, plan.slice);
}

template <typename T>
cudaError_t launch_cluster_div(const Params& p, int div, cudaStream_t stream) {
  switch (div) {
    case kForwardKL: return launch_cluster_t<T, kForwardKL>(p, stream);
    case kReverseKL: return launch_cluster_t<T, kReverseKL>(p, stream);
    default: return launch_cluster_t<T, kJSD>(p, stream);
  }
}

// Every row start of a [B, T, V] view on a 16-byte boundary.
inline bool rows_aligned(const void* ptr, int64_t sb, int64_t st, int vec, int elem_bytes) {
  return ptr == nullptr ||
         (reinterpret_cast<uintptr_t>(ptr) % (static_cast<uintptr_t>(vec) * elem_bytes) == 0 && sb % vec == 0 &&
          st % vec == 0);
}

}  // namespace detail

cudaError_t launch_contrastive_kd_forward(const ForwardArgs& args, cudaStream_t stream) {
  using namespace detail;
  const KernelOptions& o = args.opts;
  const DType d = args.s.dtype;
  // Data pointers may be null only for an empty vocabulary (nothing is loaded then).
  const bool data = args.vocab > 0;
  if (!supported_input(d) || (o.soft && args.a.dtype != d) || (o.soft && o.use_text && args.t.dtype != d) ||
      (data && args.s.ptr == nullptr) || (data && o.soft && args.a.ptr == nullptr) ||
      (data && o.soft && o.use_text && args.t.ptr == nullptr) || args.loss == nullptr || args.stats == nullptr ||
      args.vocab < 0 || args.rows < 0 || (args.rows > 0 && args.rows_per_batch <= 0)) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  Params p = make_params(args.s, args.a, args.t, args.labels, args.rows, args.rows_per_batch, args.vocab, o,
                         args.ignore_index);
  p.loss = args.loss;
  p.stats_out = args.stats;
  switch (d) {
    case DType::kFloat32: launch_forward_div<float>(p, o.divergence, stream); break;
    case DType::kBFloat16: launch_forward_div<__nv_bfloat16>(p, o.divergence, stream); break;
    default: launch_forward_div<__half>(p, o.divergence, stream); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_contrastive_kd_backward(const BackwardArgs& args, cudaStream_t stream) {
  using namespace detail;
  const KernelOptions& o = args.opts;
  const DType d = args.s.dtype, gd = args.grad.dtype;
  // Gradient dtype: the inputs' own, or any 16-bit type when the inputs are fp32
  // (the binding's upcast of mismatched inputs). Never an fp32 gradient of 16-bit inputs.
  const bool grad_ok = supported_input(gd) && (gd == d || d == DType::kFloat32);
  const bool data = args.vocab > 0;
  if (!supported_input(d) || !grad_ok || (o.soft && args.a.dtype != d) ||
      (o.soft && o.use_text && args.t.dtype != d) || (data && args.s.ptr == nullptr) ||
      (data && o.soft && args.a.ptr == nullptr) || (data && o.soft && o.use_text && args.t.ptr == nullptr) ||
      (data && args.grad.ptr == nullptr) || args.stats == nullptr || args.grad_rows == nullptr || args.vocab < 0 ||
      args.rows < 0 || (args.rows > 0 && args.rows_per_batch <= 0)) {
    return cudaErrorInvalidValue;
  }
  if (args.rows == 0) return cudaSuccess;
  Params p = make_params(args.s, args.a, args.t, args.labels, args.rows, args.rows_per_batch, args.vocab, o,
                         args.ignore_index);
  p.grad = args.grad.ptr;
  p.g_sb = args.grad.stride_b;
  p.g_st = args.grad.stride_t;
  p.stats_in = args.stats;
  p.grad_rows = args.grad_rows;
  p.grad_rows_stride = args.grad_rows_stride;
  const int div = o.divergence;
  if (d == DType::kFloat32) {
    switch (gd) {
      case DType::kFloat32: launch_backward_div<float, float>(p, div, stream); break;
      case DType::kBFloat16: launch_backward_div<float, __nv_bfloat16>(p, div, stream); break;
      default: launch_backward_div<float, __half>(p, div, stream); break;
    }
  } else if (d == DType::kBFloat16) {
    launch_backward_div<__nv_bfloat16, __nv_bfloat16>(p, div, stream);
  } else {
    launch_backward_div<__half, __half>(p, div, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_contrastive_kd_single_pass(const SinglePassArgs& args, cudaStream_t stream) {
  using namespace detail;
  const ForwardArgs& f = args.forward;
  const KernelOptions& o = f.opts;
  const DType d = f.s.dtype;
  if (!supported_input(d) || args.grad.dtype != d || (o.soft && f.a.dtype != d) ||
      (o.soft && o.use_text && f.t.dtype != d) || f.s.ptr == nullptr || (o.soft && f.a.ptr == nullptr) ||
      (o.soft && o.use_text && f.t.ptr == nullptr) || args.grad.ptr == nullptr || f.loss == nullptr ||
      f.stats == nullptr || args.grad_rows == nullptr || f.vocab <= 0 || f.rows <= 0 || f.rows_per_batch <= 0) {
    return cudaErrorNotSupported;
  }
  const int vec = d == DType::kFloat32 ? 4 : 8;
  const int bytes = d == DType::kFloat32 ? 4 : 2;
  if (f.vocab % vec != 0 || !rows_aligned(f.s.ptr, f.s.stride_b, f.s.stride_t, vec, bytes) ||
      !rows_aligned(o.soft ? f.a.ptr : nullptr, f.a.stride_b, f.a.stride_t, vec, bytes) ||
      !rows_aligned(o.soft && o.use_text ? f.t.ptr : nullptr, f.t.stride_b, f.t.stride_t, vec, bytes) ||
      !rows_aligned(args.grad.ptr, args.grad.stride_b, args.grad.stride_t, vec, bytes)) {
    return cudaErrorNotSupported;
  }
  Params p = make_params(f.s, f.a, f.t, f.labels, f.rows, f.rows_per_batch, f.vocab, o, f.ignore_index);
  p.loss = f.loss;
  p.stats_out = f.stats;
  p.grad = args.grad.ptr;
  p.g_sb = args.grad.stride_b;
  p.g_st = args.grad.stride_t;
  p.grad_rows = args.grad_rows;
  p.grad_rows_stride = args.grad_rows_stride;
  cudaError_t err;
  switch (d) {
    case DType::kFloat32: err = launch_cluster_div<float>(p, o.divergence, stream); break;
    case DType::kBFloat16: err = launch_cluster_div<__nv_bfloat16>(p, o.divergence, stream); break;
    default: err = launch_cluster_div<__half>(p, o.divergence, stream); break;
  }
  if (err == cudaErrorNotSupported) {
    (void)cudaGetLastError();  // clear a sticky-free error left by a refused attribute query
    return err;
  }
  return err == cudaSuccess ? cudaGetLastError() : err;
}

}  // namespace cuda
}  // namespace caad
