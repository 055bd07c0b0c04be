// Sink-window attention on CPU: the rows of a sliding layer that see the sinks [0, k) and the window (i - W, i].
//
// Flash-attention forward (Dao et al., FlashAttention, arXiv 2205.14135, Algorithm 1: online softmax over key
// blocks) specialised to SWAA's two key ranges (shared/SWAA.md). Built once per machine by
// swaa_kernels.sink_window_native (torch.utils.cpp_extension, -march=native) and called from
// swaa_kernels.cpu._sink_window_attention.
//
// One call = one run of consecutive sink-window rows of one request, read straight from vLLM's paged CPU cache
// (see sink_window_attention below for the arguments). The run's keys (sinks, then the window keys from position
// first_position - W + 1) are first packed into blocks of 32 keys (pack_keys); key index u < k is sink u, u >= k
// the window key first_position - W + 1 + (u - k), so row r (position first_position + r) sees key indices [0, k)
// and [k + r, k + r + W).
//
// Work unit: one KV head and a tile of ROWS_PER_TILE rows, all `group` query heads of that KV head ("pairs" of
// (row, head)); each 32-key block of K and V is read from L2 once per unit and used by every pair of the tile.
// The micro-kernels keep MR pairs x 32 scores (QK^T) and PR pairs x 64 output lanes (PV) in registers.
// Arithmetic: float32 FMAs on float32/float16 inputs (widened when packed); bfloat16 on CPUs with AVX512_BF16 uses
// VDPBF16PS for QK^T (exact products, float32 sums) and for PV (probabilities rounded to bf16, as FlashAttention
// does; softmax statistics in float32, in base 2). On machines without AVX-512 the same loops run on a portable 16-lane
// vector type (correct, not tuned: swaa_kernels.sink_window_native picks the torch path there by default).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int KB = 32;             // keys per packed block and QK^T micro-kernel: two 16-lane vectors
constexpr int SB = 4 * KB;         // keys per softmax step: up to four packed blocks of one segment
// Tile sizes: measured best of MR 4/6/8/12, PR 2/4/6 and 8/16/32 rows (8k bf16 and float32 layers, AMD EPYC).
constexpr int MR = 8;              // (row, head) pairs per QK micro-kernel: 16 score accumulators
constexpr int PR = 4;              // pairs per PV micro-kernel: 16 output accumulators for 64 head dimensions
constexpr int ROWS_PER_TILE = 16;  // rows per work unit
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// The softmax runs in base 2: scores are scaled by scale * LOG2E (folded into the query pre-scale, or for bf16 into
// the subtraction of the running max), so that e^(s - m) = 2^(s log2(e) - m log2(e)); the normalised result is the same.
constexpr float LOG2E = 1.44269504088896341f;
constexpr float MAX_SLACK = 8.0f * LOG2E;  // e^8 in base 2; see the online softmax in attend_unit

#if defined(__AVX512F__)
struct Vec {
  __m512 v;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec set1(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  friend Vec fmadd(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  friend Vec fmsub(Vec a, Vec b, Vec c) { return {_mm512_fmsub_ps(a.v, b.v, c.v)}; }
  friend Vec operator*(Vec a, Vec b) { return {_mm512_mul_ps(a.v, b.v)}; }
  friend Vec operator-(Vec a, Vec b) { return {_mm512_sub_ps(a.v, b.v)}; }
  friend Vec operator+(Vec a, Vec b) { return {_mm512_add_ps(a.v, b.v)}; }
  friend Vec vmax(Vec a, Vec b) { return {_mm512_max_ps(a.v, b.v)}; }
  // Lanes whose bit is clear in `keep` become x.
  Vec keep_or(uint32_t keep, float x) const { return {_mm512_mask_mov_ps(_mm512_set1_ps(x), __mmask16(keep), v)}; }
  float hmax() const { return _mm512_reduce_max_ps(v); }
  float hsum() const { return _mm512_reduce_add_ps(v); }
  // 2^x for x <= 0 (scores in base 2 minus their running max; see LOG2E): x = n + r with n = round(x), |r| <= 1/2,
  // Taylor polynomial of 2^r = e^(r ln 2) of degree 6 (relative error < 2e-7 on the interval) or, with Short,
  // degree 4 (< 6e-5: for probabilities that are rounded to bf16 next, whose rounding step is 4e-3), times 2^n by
  // scalef. In base 2 the reduction is one subtraction (base e needs a multiply and two Cody-Waite steps). Arguments
  // <= -125 (and -inf, and NaN) give exactly 0: no subnormal probability reaches PV.
  template <bool Short = false>
  Vec exp2() const {
    const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(v, n);
    __m512 p;
    if constexpr (Short) {
      p = _mm512_set1_ps(9.6181291076284772e-3f);  // ln2^4 / 4!
    } else {
      p = _mm512_set1_ps(1.5403530393381606e-4f);                        // ln2^6 / 6!
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
      p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.6181291076284772e-3f));  // ln2^4 / 4!
    }
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.5504108664821580e-2f));  // ln2^3 / 3!
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4022650695910071e-1f));  // ln2^2 / 2!
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.9314718055994531e-1f));  // ln2
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-125.0f), _CMP_GT_OQ);
    return {_mm512_maskz_scalef_ps(live, p, n)};
  }
};
#else
struct Vec {  // portable fallback: same algorithm, scalar loops the compiler may vectorise
  float a[16];
  static Vec zero() { return set1(0.0f); }
  static Vec set1(float x) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = x; return r; }
  static Vec load(const float* p) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = p[i]; return r; }
  void store(float* p) const { for (int i = 0; i < 16; ++i) p[i] = a[i]; }
  friend Vec fmadd(Vec x, Vec y, Vec z) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = x.a[i] * y.a[i] + z.a[i]; return r; }
  friend Vec fmsub(Vec x, Vec y, Vec z) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = x.a[i] * y.a[i] - z.a[i]; return r; }
  friend Vec operator*(Vec x, Vec y) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = x.a[i] * y.a[i]; return r; }
  friend Vec operator-(Vec x, Vec y) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = x.a[i] - y.a[i]; return r; }
  friend Vec operator+(Vec x, Vec y) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = x.a[i] + y.a[i]; return r; }
  friend Vec vmax(Vec x, Vec y) { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = std::max(x.a[i], y.a[i]); return r; }
  Vec keep_or(uint32_t keep, float x) const { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = (keep >> i) & 1u ? a[i] : x; return r; }
  float hmax() const { float m = a[0]; for (int i = 1; i < 16; ++i) m = std::max(m, a[i]); return m; }
  float hsum() const { float s = 0.0f; for (int i = 0; i < 16; ++i) s += a[i]; return s; }
  template <bool Short = false>
  Vec exp2() const { Vec r; for (int i = 0; i < 16; ++i) r.a[i] = a[i] > -125.0f ? std::exp2(a[i]) : 0.0f; return r; }
};
#endif

// Bits [lo, hi) of a 32-bit lane mask (0 <= lo, hi <= 32).
inline uint32_t bit_range(int lo, int hi) {
  if (hi <= lo) return 0u;
  const uint64_t upper = (uint64_t{1} << hi) - 1u;
  const uint64_t lower = (uint64_t{1} << lo) - 1u;
  return uint32_t(upper & ~lower);
}

// Calls f(std::integral_constant<int, n>{}) for a runtime n in [1, N]: the micro-kernels take their tile height as a
// template argument, so that their accumulators live in registers.
template <int N, typename F>
inline void with_count(int n, F&& f) {
  if constexpr (N > 1) {
    if (n >= N) return f(std::integral_constant<int, N>{});
    return with_count<N - 1>(n, f);
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses it (one 64-byte load
// per FMA instead of one per key), which makes the PV loop load-bound (measured: PV 1.25x the time of QK^T at the
// same FLOPs, AMD EPYC).
inline void keep_in_register([[maybe_unused]] Vec& x) {
#if defined(__AVX512F__)
  asm volatile("" : "+v"(x.v));
#endif
}

// s[m][0:32] = q_m . k_u for the 32 keys of one packed block (kt: D rows of 32 keys).
template <int M>
inline void qk_block(const float* const* q, const float* kt, int D, float (*s)[SB]) {
  Vec a0[M], a1[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) { a0[m] = Vec::zero(); a1[m] = Vec::zero(); }
  for (int d = 0; d < D; ++d) {
    const Vec k0 = Vec::load(kt + d * KB), k1 = Vec::load(kt + d * KB + 16);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const Vec b = Vec::set1(q[m][d]);
      a0[m] = fmadd(b, k0, a0[m]);
      a1[m] = fmadd(b, k1, a1[m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) { a0[m].store(s[m]); a1[m].store(s[m] + 16); }
}

#if defined(__AVX512BF16__)
constexpr bool BF16_DOT = true;
// BFloat16 inputs on CPUs with AVX512_BF16: s[m][0:32] = q_m . k_u with VDPBF16PS (each fp32 lane adds the two
// products of a pair of head dimensions; the products of two bf16 values are exact in fp32). kt: D / 2 rows of
// 32 keys x 2 dimensions; q: the row's bf16 pairs. Half the instructions of the float32 loop.
template <int M>
inline void qk_block_bf16(const uint32_t* const* q, const uint16_t* kt, int D, float (*s)[SB]) {
  __m512 a0[M], a1[M];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
  for (int dp = 0; dp < D / 2; ++dp) {
    const __m512bh k0 = (__m512bh)_mm512_loadu_si512(kt + dp * 2 * KB);
    const __m512bh k1 = (__m512bh)_mm512_loadu_si512(kt + dp * 2 * KB + KB);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int(q[m][dp]));
      a0[m] = _mm512_dpbf16_ps(a0[m], b, k0);
      a1[m] = _mm512_dpbf16_ps(a1[m], b, k1);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) { _mm512_storeu_ps(s[m], a0[m]); _mm512_storeu_ps(s[m] + 16, a1[m]); }
}

void qk_dispatch_bf16(int m, const uint32_t* const* q, const uint16_t* kt, int D, float (*s)[SB]) {
  with_count<MR>(m, [&](auto M) { qk_block_bf16<M()>(q, kt, D, s); });
}
// acc[p][dc : dc + 16 * NV] = alpha[p] * acc[p][...] + sum_u prob[p][u] * v[u][...] with VDPBF16PS over pairs of
// keys: prob16 holds each pair's probabilities rounded to bf16, two keys per 32-bit lane, v16 the block's values as
// [16 key pairs][D][2] bf16 (rounding P to bf16 before PV is what FlashAttention does for bf16; the row sums
// stay float32).
template <int P, int NV>
inline void pv_block_bf16(float* const* acc, const float* alpha, const uint32_t (*prob16)[SB / 2], const uint16_t* v16,
                          int D, int dc, int cnt) {
  __m512 o[P][NV];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const __m512 a = _mm512_set1_ps(alpha[p]);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) o[p][j] = _mm512_mul_ps(_mm512_loadu_ps(acc[p] + dc + 16 * j), a);
  }
  for (int up = 0; up < cnt / 2; ++up) {
    __m512bh vr[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      vr[j] = (__m512bh)_mm512_loadu_si512(v16 + (int64_t(up) * D + dc + 16 * j) * 2);
      asm volatile("" : "+v"(vr[j]));  // see keep_in_register
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const __m512bh b = (__m512bh)_mm512_set1_epi32(int(prob16[p][up]));
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) o[p][j] = _mm512_dpbf16_ps(o[p][j], b, vr[j]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(acc[p] + dc + 16 * j, o[p][j]);
}

template <int P>
inline void pv_block_bf16_all(float* const* acc, const float* alpha, const uint32_t (*prob16)[SB / 2],
                              const uint16_t* v16, int D, int cnt) {
  int dc = 0;
  for (; dc + 64 <= D; dc += 64) pv_block_bf16<P, 4>(acc, alpha, prob16, v16, D, dc, cnt);
  if (dc < D) with_count<3>((D - dc) / 16, [&](auto NV) { pv_block_bf16<P, NV()>(acc, alpha, prob16, v16, D, dc, cnt); });  // 16-48 left
}

void pv_dispatch_bf16(int p, float* const* acc, const float* alpha, const uint32_t (*prob16)[SB / 2],
                      const uint16_t* v16, int D, int cnt) {
  with_count<PR>(p, [&](auto P) { pv_block_bf16_all<P()>(acc, alpha, prob16, v16, D, cnt); });
}

inline void store_bf16_pairs(uint32_t* dst, const __m512 e0, const __m512 e1) {
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));  // lanes 0-15 from e0, 16-31 from e1
}
#else
constexpr bool BF16_DOT = false;
#endif

#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
// AMX (Intel Sapphire Rapids and later): TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 bf16 tile (stored
// as 16 rows of 16 column pairs, the "VNNI" order) into a 16 x 16 float32 tile; the same exact products and float32
// sums as VDPBF16PS, at 16x the work per instruction. Tiles here are always 16 rows x 64 bytes (unused rows of the
// query and probability tiles are padding whose results are dropped). Eight tile registers: 0-3 accumulate, 4 holds
// the A operand (queries or probabilities), 5-7 the B operand (keys or values).
constexpr bool AMX_BUILD = true;

// Linux hands AMX tile state to a process only on request (arch_prctl ARCH_REQ_XCOMP_PERM for XTILEDATA); without it
// the first tile instruction raises SIGILL. Asked once per process; false (not permitted) keeps the VDPBF16PS path.
bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tile configuration is per thread; each work unit sets it (tiles 0-7: 16 rows x 64 bytes) and releases it.
inline void amx_configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// s[0:16][0:cnt] = q16[0:16] . k_u for the cnt keys (a multiple of 32, <= SB) of consecutive packed blocks kt
// ([D / 2][32][2] bf16 each); q16: 16 rows of D bf16 (D a multiple of 32).
inline void qk_amx(const uint16_t* q16, const uint16_t* kt, int D, int cnt, float (*s)[SB]) {
  const int64_t b_stride = KB * 2 * sizeof(uint16_t);  // bytes between rows (dimension pairs) of a B tile
  for (int c0 = 0; c0 < cnt; c0 += 2 * KB) {  // two packed blocks (four 16-key tiles) at a time
    const bool two = c0 + KB < cnt;
    const uint16_t* k0 = kt + int64_t(c0) * D;
    const uint16_t* k1 = k0 + int64_t(KB) * D;
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int d0 = 0; d0 < D; d0 += 32) {
      _tile_loadd(4, q16 + d0, D * sizeof(uint16_t));
      const int64_t row = int64_t(d0 / 2) * KB * 2;  // first dimension pair of this step, in a packed block
      _tile_loadd(5, k0 + row, b_stride);
      _tile_loadd(6, k0 + row + 32, b_stride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      if (two) {
        _tile_loadd(7, k1 + row, b_stride);
        _tile_loadd(5, k1 + row + 32, b_stride);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, &s[0][c0], SB * sizeof(float));
    _tile_stored(1, &s[0][c0 + 16], SB * sizeof(float));
    if (two) {
      _tile_stored(2, &s[0][c0 + 32], SB * sizeof(float));
      _tile_stored(3, &s[0][c0 + 48], SB * sizeof(float));
    }
  }
}

// acc[0:16][0:D] += P[0:16][0:cnt] . V[0:cnt][0:D] (acc: 16 rows of D float32, accumulated in the tiles): prob16
// rows hold the probabilities as bf16 in key order, v16 the values as [cnt / 2 key pairs][D][2] bf16 (consecutive
// packed blocks); cnt a multiple of 32, D of 32.
inline void pv_amx(const uint32_t (*prob16)[SB / 2], const uint16_t* v16, int D, int cnt, float* acc) {
  const int64_t b_stride = int64_t(D) * 2 * sizeof(uint16_t);  // bytes between key pairs of a B tile
  for (int dc = 0; dc < D; dc += 64) {  // up to four 16-dimension output tiles at a time
    const bool four = dc + 32 < D;
    _tile_loadd(0, acc + dc, D * sizeof(float));
    _tile_loadd(1, acc + dc + 16, D * sizeof(float));
    if (four) {
      _tile_loadd(2, acc + dc + 32, D * sizeof(float));
      _tile_loadd(3, acc + dc + 48, D * sizeof(float));
    }
    for (int k0 = 0; k0 < cnt; k0 += 32) {
      _tile_loadd(4, &prob16[0][k0 / 2], (SB / 2) * sizeof(uint32_t));
      const uint16_t* v = v16 + (int64_t(k0 / 2) * D + dc) * 2;
      _tile_loadd(5, v, b_stride);
      _tile_loadd(6, v + 32, b_stride);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      if (four) {
        _tile_loadd(7, v + 64, b_stride);
        _tile_loadd(5, v + 96, b_stride);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, acc + dc, D * sizeof(float));
    _tile_stored(1, acc + dc + 16, D * sizeof(float));
    if (four) {
      _tile_stored(2, acc + dc + 32, D * sizeof(float));
      _tile_stored(3, acc + dc + 48, D * sizeof(float));
    }
  }
}
#else
constexpr bool AMX_BUILD = false;
bool amx_permitted() { return false; }
#endif

// acc[p][dc : dc + 16 * NV] = alpha[p] * acc[p][...] + sum_u prob[p][u] * v[u][...] for P pairs.
template <int P, int NV>
inline void pv_block(float* const* acc, const float* alpha, const float (*prob)[SB], const float* v, int D,
                     int dc, int cnt) {
  Vec o[P][NV];
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
    const Vec a = Vec::set1(alpha[p]);
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) o[p][j] = Vec::load(acc[p] + dc + 16 * j) * a;
  }
  for (int u = 0; u < cnt; ++u) {
    Vec vr[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      vr[j] = Vec::load(v + int64_t(u) * D + dc + 16 * j);
      keep_in_register(vr[j]);
    }
#pragma GCC unroll 4
    for (int p = 0; p < P; ++p) {
      const Vec b = Vec::set1(prob[p][u]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) o[p][j] = fmadd(b, vr[j], o[p][j]);
    }
  }
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) o[p][j].store(acc[p] + dc + 16 * j);
}

template <int P>
inline void pv_block_all(float* const* acc, const float* alpha, const float (*prob)[SB], const float* v, int D,
                         int cnt) {
  int dc = 0;
  for (; dc + 64 <= D; dc += 64) pv_block<P, 4>(acc, alpha, prob, v, D, dc, cnt);
  if (dc < D) with_count<3>((D - dc) / 16, [&](auto NV) { pv_block<P, NV()>(acc, alpha, prob, v, D, dc, cnt); });  // 16-48 left
}

void qk_dispatch(int m, const float* const* q, const float* kt, int D, float (*s)[SB]) {
  with_count<MR>(m, [&](auto M) { qk_block<M()>(q, kt, D, s); });
}

void pv_dispatch(int p, float* const* acc, const float* alpha, const float (*prob)[SB], const float* v, int D,
                 int cnt) {
  with_count<PR>(p, [&](auto P) { pv_block_all<P()>(acc, alpha, prob, v, D, cnt); });
}

// One work unit: KV head `hk`, rows [r0, r1), all `group` query heads of hk. The queries come from `query`
// (any of float/BFloat16/Half; scaled and widened here), the result goes to `out` in the same type.
// CH: pairs per step of the pair loop (MR; 16 with AMX, whose tiles hold 16 rows). amx: QK^T and PV on AMX tiles
// (bf16 with kt16/v16, D a multiple of 32, AMX_BUILD and amx_permitted()).
template <typename T, int CH>
void attend_unit(const T* query, const float* kt, const uint16_t* kt16, const float* v, const uint16_t* v16, T* out,
                 int64_t H, int64_t D, int64_t L, int64_t group, int64_t hk, int64_t r0, int64_t r1, int64_t sinks,
                 int64_t window, float scale, bool amx) {
  // kt16/v16 (bf16 keys and values for the VDPBF16PS micro-kernels) are set for BFloat16 on CPUs with AVX512_BF16;
  // then the queries stay bf16 and the scores are scaled (in the softmax's subtraction of the running max),
  // otherwise the queries are widened and pre-scaled. Either way by scale * LOG2E: the softmax runs in base 2.
  const bool bf16_dot = kt16 != nullptr;
  const float score_scale = scale * LOG2E;
  const float pending_scale = bf16_dot ? score_scale : 1.0f;  // still to apply to the micro-kernels' scores
  const int64_t rows = r1 - r0;
  const int64_t pairs = rows * group;  // pair index = row offset * group + head offset
  std::vector<float> q(static_cast<size_t>(pairs * D));
  // With AMX, PV accumulates into acc 16 rows at a time: pairs padded to a multiple of 16 (padding never read).
  const int64_t acc_rows = amx ? (pairs + 15) / 16 * 16 : pairs;
  std::vector<float> acc(static_cast<size_t>(acc_rows * D), 0.0f);
  std::vector<float> row_max(static_cast<size_t>(pairs), NEG_INF);
  std::vector<float> row_sum(static_cast<size_t>(pairs * 16), 0.0f);  // per pair: 16 lane partial sums
  std::vector<const float*> qp(static_cast<size_t>(pairs));
  std::vector<const uint32_t*> qp16(static_cast<size_t>(pairs));
  std::vector<float*> accp(static_cast<size_t>(pairs));
  std::vector<int64_t> pair_row(static_cast<size_t>(pairs));  // row of each pair (no division in the block loop)
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t r = r0 + p / group, h = hk * group + p % group;
    pair_row[p] = r;
    const T* src = query + (r * H + h) * D;
    qp16[p] = reinterpret_cast<const uint32_t*>(src);
    float* dst = q.data() + p * D;
    if (!bf16_dot)
      for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * score_scale;
    qp[p] = dst;
    accp[p] = acc.data() + p * D;
  }
  const float* kt_h = bf16_dot ? nullptr : kt + hk * D * L;  // L: padded key count
  const uint16_t* kt16_h = bf16_dot ? kt16 + hk * D * L : nullptr;
  const uint16_t* v16_h = bf16_dot ? v16 + hk * L * D : nullptr;
  const float* v_h = v + hk * L * D;
  alignas(64) float s[CH][SB];
  alignas(64) float prob[CH][SB];
  alignas(64) uint32_t prob16[CH][SB / 2];
  float alpha[CH];
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  // AMX: the queries as 16-row tiles (pairs padded like acc, with zeros).
  std::vector<uint16_t> q16(amx ? static_cast<size_t>(acc_rows * D) : 0, uint16_t(0));
  if (amx) {
    for (int64_t p = 0; p < pairs; ++p) std::copy_n(reinterpret_cast<const uint16_t*>(qp16[p]), D, &q16[p * D]);
    amx_configure();
  }
#endif
  auto columns = [](float (*rows)[SB], int c) { return reinterpret_cast<float(*)[SB]>(&rows[0][c * KB]); };

  // Two key segments: the sinks [0, k) and the union of the tile's windows [k + r0, k + r1 - 1 + W). A step takes
  // up to SB keys of one segment, in the packed 32-key blocks that overlap it; lanes outside it are masked.
  const int64_t seg_lo[2] = {0, sinks + r0};
  const int64_t seg_hi[2] = {sinks, sinks + r1 - 1 + window};
  for (int seg = 0; seg < 2; ++seg) {
    for (int64_t j0 = seg_lo[seg] / KB * KB; j0 < seg_hi[seg]; j0 += SB) {
      const int sub = int(std::min<int64_t>(SB, seg_hi[seg] - j0) + KB - 1) / KB;  // packed blocks in this step
      const int cnt = sub * KB;
      for (int64_t p0 = 0; p0 < pairs; p0 += CH) {
        const int m = int(std::min<int64_t>(CH, pairs - p0));
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
        if (amx) qk_amx(&q16[p0 * D], kt16_h + j0 * D, int(D), cnt, s);
#endif
        for (int c = 0; c < sub && !(AMX_BUILD && amx); ++c) {
#if defined(__AVX512BF16__)
          if (bf16_dot)
            qk_dispatch_bf16(m, qp16.data() + p0, kt16_h + (j0 + c * KB) * D, int(D), columns(s, c));
          else
#endif
            qk_dispatch(m, qp.data() + p0, kt_h + (j0 + c * KB) * D, int(D), columns(s, c));
        }
        for (int i = 0; i < m; ++i) {
          const int64_t p = p0 + i, r = pair_row[p];
          // Visible keys of row r, as lanes of each packed block: the segment's lanes, and in the window segment
          // only row r's window [k + r, k + r + W).
          const int64_t vis_lo = seg == 0 ? seg_lo[0] : std::max(seg_lo[1], sinks + r);
          const int64_t vis_hi = seg == 0 ? seg_hi[0] : std::min(seg_hi[1], sinks + r + window);
          Vec x[2 * SB / KB];
          Vec running = Vec::set1(NEG_INF);
          for (int c = 0; c < sub; ++c) {
            const int64_t base = j0 + c * KB;
            const uint32_t keep = bit_range(int(std::clamp<int64_t>(vis_lo - base, 0, KB)),
                                            int(std::clamp<int64_t>(vis_hi - base, 0, KB)));
            Vec x0 = Vec::load(s[i] + c * KB), x1 = Vec::load(s[i] + c * KB + 16);
            if (keep != 0xFFFFFFFFu) {
              x0 = x0.keep_or(keep & 0xFFFFu, NEG_INF);
              x1 = x1.keep_or(keep >> 16, NEG_INF);
            }
            x[2 * c] = x0;
            x[2 * c + 1] = x1;
            running = vmax(running, vmax(x0, x1));
          }
          // Online softmax with a lazily raised running max (as in FlashAttention-4): the max moves only when
          // a step's scores exceed it by more than MAX_SLACK, so most steps skip the rescale. Exact all the
          // same: every term is 2^(s - m) for one m per update, and 2^MAX_SLACK keeps the sums far from overflow.
          // The max of the unscaled bf16 scores times score_scale (> 0) is the max of the scaled ones.
          const float block_max = running.hmax() * pending_scale;
          float& m_run = row_max[p];
          if (block_max > m_run + MAX_SLACK) {
            alpha[i] = m_run == NEG_INF ? 0.0f : std::exp2(m_run - block_max);
            m_run = block_max;
          } else {
            alpha[i] = 1.0f;
          }
          const Vec mx = Vec::set1(m_run), to_base2 = Vec::set1(pending_scale);
          Vec sum = Vec::zero();
          for (int c = 0; c < sub; ++c) {
            Vec e0, e1;
            if (bf16_dot) {  // the probabilities are rounded to bf16 for PV: the short polynomial is exact enough
              e0 = fmsub(x[2 * c], to_base2, mx).template exp2<true>();
              e1 = fmsub(x[2 * c + 1], to_base2, mx).template exp2<true>();
            } else {
              e0 = fmsub(x[2 * c], to_base2, mx).exp2();
              e1 = fmsub(x[2 * c + 1], to_base2, mx).exp2();
            }
#if defined(__AVX512BF16__)
            if (bf16_dot)
              store_bf16_pairs(prob16[i] + c * KB / 2, e0.v, e1.v);
            else
#endif
            {
              e0.store(prob[i] + c * KB);
              e1.store(prob[i] + c * KB + 16);
            }
            sum = sum + (e0 + e1);
          }
          float* l = row_sum.data() + p * 16;
          fmadd(Vec::load(l), Vec::set1(alpha[i]), sum).store(l);
        }
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
        if (amx) {
          for (int i = 0; i < m; ++i) {  // rescale the rows whose running max moved (rare: see the lazy max)
            if (alpha[i] == 1.0f) continue;
            float* a = accp[p0 + i];
            for (int64_t d = 0; d < D; d += 16) (Vec::load(a + d) * Vec::set1(alpha[i])).store(a + d);
          }
          pv_amx(prob16, v16_h + j0 * D, int(D), cnt, accp[p0]);
          continue;
        }
#endif
        for (int i = 0; i < m; i += PR) {
          const int np = std::min(PR, m - i);
#if defined(__AVX512BF16__)
          if (bf16_dot)
            pv_dispatch_bf16(np, accp.data() + p0 + i, alpha + i, prob16 + i, v16_h + j0 * D, int(D), cnt);
          else
#endif
            pv_dispatch(np, accp.data() + p0 + i, alpha + i, prob + i, v_h + j0 * D, int(D), cnt);
        }
      }
    }
  }
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (amx) _tile_release();
#endif
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t r = r0 + p / group, h = hk * group + p % group;
    T* o = out + (r * H + h) * D;
    const float inv = 1.0f / Vec::load(row_sum.data() + p * 16).hsum();
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(accp[p][d] * inv);
  }
}

// Offsets of key / value element (t, d) of one block and KV head (t: offset in the block, d: head dimension) from
// the start of that block's keys, in the two layouts of vLLM's CPU attention op (csrc/cpu/cpu_attn_*.hpp; checked
// against its writer cpu_attn_reshape_and_cache by tests/test_sink_window_native.py and at backend start-up):
// * ISA vec/vec16: keys transposed [D][block_size], then values [block_size][D];
// * ISA amx (bf16; block_size and D multiples of 32): keys [block_size / 16][D / 2][16][2] (AMX B tiles of 16 keys,
//   head dimensions in pairs), then values [D / 16][block_size / 2][16][2] (16 dimensions, keys in pairs).
struct VecLayout {
  static int64_t key(int64_t t, int64_t d, int64_t block_size, int64_t) { return d * block_size + t; }
  static int64_t value(int64_t t, int64_t d, int64_t block_size, int64_t D) { return block_size * D + t * D + d; }
};
struct AmxLayout {
  static int64_t key(int64_t t, int64_t d, int64_t, int64_t D) {
    return ((t / 16) * (D / 2) + d / 2) * 32 + (t % 16) * 2 + d % 2;
  }
  static int64_t value(int64_t t, int64_t d, int64_t block_size, int64_t D) {
    return block_size * D + ((d / 16) * (block_size / 2) + t / 2) * 32 + (d % 16) * 2 + t % 2;
  }
};

// Packs the run's keys and values from the paged cache (Layout: VecLayout or AmxLayout above) into float32 blocks
// of 32 keys. With kt16 (bf16 caches on AVX512_BF16 CPUs), the keys go there as bf16 pairs of head dimensions
// ([D / 2][32][2] per block) instead of into kt.
template <typename T, typename Layout>
void pack_keys(const T* cache, const int32_t* block_row, float* kt, uint16_t* kt16, float* v, uint16_t* v16,
               int64_t Hkv, int64_t block_size, int64_t D, int64_t num_keys, int64_t L, int64_t sinks,
               int64_t window_start) {
  const int64_t blocks = L / KB;
  at::parallel_for(0, Hkv * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t h = unit / blocks, b = unit % blocks;
      const T* block_base[KB];  // the cache block (this KV head) of key u of the block; null = padding
      int64_t offset[KB];       // key u's offset in its cache block
      for (int u = 0; u < KB; ++u) {
        const int64_t index = b * KB + u;
        if (index >= num_keys) {
          block_base[u] = nullptr;
          offset[u] = 0;
          continue;
        }
        const int64_t pos = index < sinks ? index : window_start + (index - sinks);
        offset[u] = pos % block_size;
        block_base[u] = cache + (int64_t(block_row[pos / block_size]) * Hkv + h) * block_size * 2 * D;
      }
      if (kt16 != nullptr) {  // bf16 bits as they are, in pairs: keys [D / 2][32][2], values [16][D][2]
        uint16_t* kt_b = kt16 + (h * blocks + b) * D * KB;
        uint16_t* v_b = v16 + (h * L + b * KB) * D;
        for (int u = 0; u < KB; ++u) {
          const auto* base = reinterpret_cast<const uint16_t*>(block_base[u]);
          const int64_t t = offset[u];
          for (int64_t d = 0; d < D; ++d) {
            kt_b[((d / 2) * KB + u) * 2 + d % 2] = base == nullptr ? uint16_t(0) : base[Layout::key(t, d, block_size, D)];
            v_b[((u / 2) * D + d) * 2 + u % 2] = base == nullptr ? uint16_t(0) : base[Layout::value(t, d, block_size, D)];
          }
        }
        continue;
      }
      float* kt_b = kt + (h * blocks + b) * D * KB;  // float32: keys [D][32], values [32][D]
      float* v_b = v + (h * L + b * KB) * D;
      for (int u = 0; u < KB; ++u) {
        const T* base = block_base[u];
        const int64_t t = offset[u];
        for (int64_t d = 0; d < D; ++d) {
          kt_b[d * KB + u] = base == nullptr ? 0.0f : static_cast<float>(base[Layout::key(t, d, block_size, D)]);
          v_b[u * D + d] = base == nullptr ? 0.0f : static_cast<float>(base[Layout::value(t, d, block_size, D)]);
        }
      }
    }
  });
}

template <typename T>
void run(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_row, at::Tensor& out,
         int64_t sinks, int64_t window, int64_t first_position, double scale, bool amx_layout, bool amx_tiles) {
  const int64_t N = query.size(0), H = query.size(1), D = query.size(2);
  const int64_t Hkv = kv_cache.size(1), block_size = kv_cache.size(2);
  const int64_t num_keys = sinks + window + N - 1, L = (num_keys + KB - 1) / KB * KB;
  const bool bf16_dot = BF16_DOT && std::is_same_v<T, at::BFloat16>;
  // Packed keys and values: float32, or bf16 for the VDPBF16PS micro-kernels.
  const int64_t packed = Hkv * L * D;
  at::Tensor kt = at::empty({bf16_dot ? 0 : packed}, query.options().dtype(at::kFloat));
  at::Tensor v = at::empty({bf16_dot ? 0 : packed}, query.options().dtype(at::kFloat));
  at::Tensor kt16 = at::empty({bf16_dot ? packed : 0}, query.options().dtype(at::kBFloat16));
  at::Tensor v16 = at::empty({bf16_dot ? packed : 0}, query.options().dtype(at::kBFloat16));
  uint16_t* kt16_d = bf16_dot ? reinterpret_cast<uint16_t*>(kt16.data_ptr<at::BFloat16>()) : nullptr;
  uint16_t* v16_d = bf16_dot ? reinterpret_cast<uint16_t*>(v16.data_ptr<at::BFloat16>()) : nullptr;
  const auto pack = amx_layout ? pack_keys<T, AmxLayout> : pack_keys<T, VecLayout>;
  pack(kv_cache.data_ptr<T>(), block_row.data_ptr<int32_t>(), kt.data_ptr<float>(), kt16_d, v.data_ptr<float>(),
       v16_d, Hkv, block_size, D, num_keys, L, sinks, first_position - window + 1);
  const int64_t group = H / Hkv;
  const int64_t tiles = (N + ROWS_PER_TILE - 1) / ROWS_PER_TILE;
  const bool amx = amx_tiles && AMX_BUILD && bf16_dot && D % 32 == 0 && amx_permitted();
  const T* qd = query.data_ptr<T>();
  const float* ktd = kt.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  T* od = out.data_ptr<T>();
  at::parallel_for(0, Hkv * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t hk = unit % Hkv, tile = unit / Hkv;
      const int64_t r0 = tile * ROWS_PER_TILE, r1 = std::min(N, r0 + ROWS_PER_TILE);
      if (amx)
        attend_unit<T, 16>(qd, ktd, kt16_d, vd, v16_d, od, H, D, L, group, hk, r0, r1, sinks, window, float(scale),
                           true);
      else
        attend_unit<T, MR>(qd, ktd, kt16_d, vd, v16_d, od, H, D, L, group, hk, r0, r1, sinks, window, float(scale),
                           false);
    }
  });
}

// query/out [N, H, D] (float32, bfloat16 or float16, contiguous), kv_cache [num_blocks, Hkv, block_size, 2 * D]
// (same dtype), block_row int32 [max_blocks]: the request's block-table row. Rows sit at positions
// first_position .. first_position + N - 1 >= sinks + window and see the keys [0, sinks) and (i - W, i].
// amx_layout: the cache was written by vLLM's op with ISA amx (bf16 only), else with vec/vec16 (see VecLayout).
// amx_tiles: bf16 may run on AMX tiles where the build and the CPU have them (the default); false takes the
// VDPBF16PS path that CPUs with AVX512_BF16 but no AMX run (tests and benchmarks of that path on AMX machines).
void sink_window_attention(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_row,
                           at::Tensor& out, int64_t sinks, int64_t window, int64_t first_position, double scale,
                           bool amx_layout, bool amx_tiles) {
  const auto dtype = query.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "sink_window_attention: query must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(kv_cache.scalar_type() == dtype && out.scalar_type() == dtype,
              "sink_window_attention: query, kv_cache and out must share a dtype");
  TORCH_CHECK(block_row.scalar_type() == at::kInt && block_row.dim() == 1, "sink_window_attention: block_row must "
              "be int32 [max_blocks]");
  TORCH_CHECK(query.is_contiguous() && kv_cache.is_contiguous() && out.is_contiguous() && block_row.is_contiguous(),
              "sink_window_attention: query, kv_cache, block_row and out must be contiguous");
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(), "sink_window_attention: query/out must be [N, H, D]");
  const int64_t N = query.size(0), H = query.size(1), D = query.size(2);
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.size(3) == 2 * D,
              "sink_window_attention: kv_cache must be [num_blocks, Hkv, block_size, 2 * D]");
  const int64_t Hkv = kv_cache.size(1), block_size = kv_cache.size(2);
  TORCH_CHECK(D % 16 == 0, "sink_window_attention: head size must be a multiple of 16, got ", D);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0 && H / Hkv <= 16, "sink_window_attention: ", H, " query heads over ", Hkv,
              " KV heads (need a whole group of at most 16)");
  TORCH_CHECK(sinks >= 1 && window >= 1 && first_position >= sinks + window,
              "sink_window_attention: needs sinks >= 1, window >= 1 and first_position >= sinks + window");
  TORCH_CHECK((first_position + N - 1) / block_size < block_row.size(0),
              "sink_window_attention: the block-table row does not cover position ", first_position + N - 1);
  TORCH_CHECK(!amx_layout || (dtype == at::kBFloat16 && block_size % 32 == 0 && D % 32 == 0),
              "sink_window_attention: the AMX cache layout exists for bfloat16 with block size and head size "
              "multiples of 32, got ", dtype, ", block_size=", block_size, ", head_size=", D);
  TORCH_CHECK(scale > 0, "sink_window_attention: scale must be > 0 (the softmax takes the max before scaling), got ",
              scale);
  if (N == 0) return;
  switch (dtype) {
    case at::kFloat:
      run<float>(query, kv_cache, block_row, out, sinks, window, first_position, scale, amx_layout, amx_tiles);
      break;
    case at::kBFloat16:
      run<at::BFloat16>(query, kv_cache, block_row, out, sinks, window, first_position, scale, amx_layout, amx_tiles);
      break;
    default:
      run<at::Half>(query, kv_cache, block_row, out, sinks, window, first_position, scale, amx_layout, amx_tiles);
      break;
  }
}

}  // namespace

TORCH_LIBRARY(swaa_cpu, m) {
  m.def(
      "sink_window_attention(Tensor query, Tensor kv_cache, Tensor block_row, Tensor(a!) out, int sinks, int window, "
      "int first_position, float scale, bool amx_layout=False, bool amx_tiles=True) -> ()");
}

TORCH_LIBRARY_IMPL(swaa_cpu, CPU, m) { m.impl("sink_window_attention", &sink_window_attention); }
