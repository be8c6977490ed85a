// y = x · dequant(w)ᵀ on the CPU, straight from GGUF block bytes (Q4_K, Q6_K, Q8_0), for a few
// activation rows (decode: M = 1..16). Built by tierlm/kernels/cpu_quant.py with the system C++
// compiler into a plain shared library (C ABI, loaded with ctypes); OpenMP threads split the
// weight rows, so each thread streams one contiguous run of weight memory, prefetched in software
// (see prefetch_ahead).
//
// Two ways to compute, chosen per call:
//   MODE_F32: every weight is decoded in registers to float32 (d*sc*q - dmin*m) and multiplied
//             with float32 x by FMA. The result differs from dequantize-then-matmul only by the
//             order of float32 additions (and one fused multiply-add per weight).
//   MODE_Q8:  x is first quantized to int8 with one float scale per 256 elements (per 32 for
//             Q8_0), like llama.cpp's q8_K / q8_0; the inner products are exact integer dot
//             products (AVX-512 VNNI / AVX2 maddubs), scaled to float once per super-block. It
//             adds the activation-rounding error: |x_i - x̂_i| <= max|x of its block| / 254.
//
// Instruction sets: the AVX-512 (BW+VL, VNNI when present) and AVX2 paths are chosen at compile
// time from the compiler's target macros; without them the portable C++ below is used (GCC vector
// extensions, which any target lowers to what it has). Glossary: M activation rows, N weight
// rows (outputs), K inputs, B super-blocks per row (K/256), MT activation rows per tile, NR weight
// rows per tile.
//
// One file, longer than tierlm's other modules, because the wrapper compiles it as a single
// translation unit on first use. Sections: helpers, float32 kernels, int8 kernels, dispatch and
// the C entry points.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TQ_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define TQ_AVX512 1
#endif
#endif

enum { T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };  // GGML type ids, as stored in GGUF files
enum { MODE_F32 = 0, MODE_Q8 = 1 };
enum { QK = 256, Q4K_BYTES = 144, Q6K_BYTES = 210, Q80_BYTES = 34, MT_MAX = 4 };

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

// Software prefetch of the weight bytes TQ_PF_BYTES ahead of the block being decoded, into L2
// (TQ_PF_HINT 2 = prefetcht1). Each thread streams one contiguous run of rows; with decoding work
// between the loads, the hardware prefetchers alone held one core to about 40% of its streaming
// read bandwidth (Q4_K, measured on a 2-core Xeon: 4.2 GB/s vs 7-8 with 1-16 KB of prefetch,
// slightly better into L2 than into L1).
#ifndef TQ_PF_BYTES
#define TQ_PF_BYTES 8192
#endif
#ifndef TQ_PF_HINT
#define TQ_PF_HINT 2
#endif
template <int BYTES>
static inline void prefetch_ahead(const uint8_t* blk) {
  if (TQ_PF_BYTES <= 0) return;
  const uint8_t* p = blk + TQ_PF_BYTES;
  for (int o = 0; o < BYTES; o += 64) __builtin_prefetch(p + o, 0, TQ_PF_HINT);
  __builtin_prefetch(p + BYTES - 1, 0, TQ_PF_HINT);
}

static inline f32x16 ldf(const float* p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline u8x16 ldu8(const uint8_t* p) { u8x16 v; memcpy(&v, p, sizeof v); return v; }
static inline i8x16 ldi8(const uint8_t* p) { i8x16 v; memcpy(&v, p, sizeof v); return v; }
// 8-bit -> float32, 16 lanes. GCC scalarizes __builtin_convertvector from 8-bit to float (GCC 12),
// so widen with the instruction set's zero/sign extension when there is one.
#if defined(TQ_AVX512)
static inline f32x16 cvt(u8x16 v) { return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)v)); }
static inline f32x16 cvt(i8x16 v) { return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32((__m128i)v)); }
#elif defined(TQ_AVX2)
static inline f32x16 join(__m256 lo, __m256 hi) {
  f32x16 r;
  memcpy(&r, &lo, 32);
  memcpy((char*)&r + 32, &hi, 32);
  return r;
}
static inline f32x16 cvt(u8x16 v) {
  const __m128i b = (__m128i)v;
  return join(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))));
}
static inline f32x16 cvt(i8x16 v) {
  const __m128i b = (__m128i)v;
  return join(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))));
}
#else
static inline f32x16 cvt(u8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }
static inline f32x16 cvt(i8x16 v) { return __builtin_convertvector(__builtin_convertvector(v, i32x16), f32x16); }
#endif
static inline float hsum(f32x16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}

static inline float h2f(const uint8_t* p) {  // little-endian IEEE half -> float, exact
  uint16_t h;
  memcpy(&h, p, 2);
#if defined(TQ_AVX2)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  uint32_t bits;
  if (e == 0) {
    const float f = ldexpf((float)m, -24);  // zero or subnormal
    return sign ? -f : f;
  }
  bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
  float f;
  memcpy(&f, &bits, 4);
  return f;
#endif
}

// Q4_K's 12 packed bytes -> byte j of *sc = 6-bit scale j, byte j of *mn = 6-bit min j (llama.cpp's
// 32-bit unpacking of get_scale_min_k4). Kept in registers: writing the words to memory and reading
// them back as bytes or wider words stalls on store forwarding.
static inline void q4k_scales(const uint8_t* p, uint64_t* sc, uint64_t* mn) {
  const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
  uint32_t u0, u1, u2;
  memcpy(&u0, p, 4), memcpy(&u1, p + 4, 4), memcpy(&u2, p + 8, 4);
  const uint32_t sc_hi = (u2 & k2) | (((u0 >> 6) & k3) << 4), mn_hi = ((u2 >> 4) & k2) | (((u1 >> 6) & k3) << 4);
  *sc = (u0 & k1) | (uint64_t)sc_hi << 32;
  *mn = (u1 & k1) | (uint64_t)mn_hi << 32;
}
static inline int byte_of(uint64_t v, int j) { return (int)((v >> (8 * j)) & 0xff); }

// ---------------------------------------------------------------------------------------------
// MODE_F32: decode in registers, float32 FMA, written once with vector extensions. A tile is NR
// weight rows x MT activation rows: with several activation rows, each float32 x load (from L2:
// 4 rows of K = 7168 are 115 KB) serves NR weight rows. NA independent accumulators per (row,
// activation) pair hide the FMA latency when the tile is small.

constexpr int n_acc(int pairs) { return pairs >= 4 ? 1 : (pairs == 1 ? 4 : 2); }

template <int NA>
static inline float reduce(const f32x16 (&acc)[NA]) {
  f32x16 t = acc[0];
  for (int a = 1; a < NA; ++a) t += acc[a];
  return hsum(t);
}

template <int MT, int NR>
static void q4k_f32(const uint8_t* w, int64_t ldw, int64_t B, const float* x, int64_t ldx, float* out) {
  constexpr int NA = n_acc(MT * NR);
  f32x16 acc[NR][MT][NA] = {};
  for (int64_t b = 0; b < B; ++b) {
    float dl[NR][8], ml[NR][8];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w + r * ldw + b * Q4K_BYTES;
      prefetch_ahead<Q4K_BYTES>(blk);
      const float d = h2f(blk), dmin = h2f(blk + 2);
      uint64_t sc, mn;
      q4k_scales(blk + 4, &sc, &mn);
      for (int j = 0; j < 8; ++j) dl[r][j] = d * byte_of(sc, j), ml[r][j] = dmin * byte_of(mn, j);
    }
    const float* xb = x + b * QK;
    for (int c = 0; c < 4; ++c) {  // chunk c: 32 bytes, sub-block 2c in low nibbles, 2c+1 in high
      for (int h = 0; h < 2; ++h) {
        f32x16 wl[NR], wh[NR];
        for (int r = 0; r < NR; ++r) {
          const u8x16 q = ldu8(w + r * ldw + b * Q4K_BYTES + 16 + 32 * c + 16 * h);
          wl[r] = cvt((u8x16)(q & 15)) * dl[r][2 * c] - ml[r][2 * c];
          wh[r] = cvt((u8x16)(q >> 4)) * dl[r][2 * c + 1] - ml[r][2 * c + 1];
        }
        for (int m = 0; m < MT; ++m) {
          const f32x16 xl = ldf(xb + m * ldx + 64 * c + 16 * h), xh = ldf(xb + m * ldx + 64 * c + 32 + 16 * h);
          for (int r = 0; r < NR; ++r) {
            acc[r][m][(2 * h) % NA] += wl[r] * xl;
            acc[r][m][(2 * h + 1) % NA] += wh[r] * xh;
          }
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[r * MT_MAX + m] = reduce(acc[r][m]);
}

template <int MT, int NR>
static void q6k_f32(const uint8_t* w, int64_t ldw, int64_t B, const float* x, int64_t ldx, float* out) {
  constexpr int NA = n_acc(MT * NR);
  f32x16 acc[NR][MT][NA] = {};
  for (int64_t b = 0; b < B; ++b) {
    float dl[NR][16];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w + r * ldw + b * Q6K_BYTES;
      prefetch_ahead<Q6K_BYTES>(blk);
      const float d = h2f(blk + 208);
      for (int j = 0; j < 16; ++j) dl[r][j] = d * (int8_t)blk[192 + j];
    }
    for (int n = 0; n < 2; ++n) {  // halves of 128: ql + 64n, qh + 32n, scales + 8n
      const float* xb = x + b * QK + 128 * n;
      for (int h = 0; h < 2; ++h) {  // lanes l = 16h .. 16h+15; part p (elements 32p + l) uses sc[8n + 2p + h]
        f32x16 wv[NR][4];
        for (int r = 0; r < NR; ++r) {
          const uint8_t* blk = w + r * ldw + b * Q6K_BYTES;
          const u8x16 a = ldu8(blk + 64 * n + 16 * h), c = ldu8(blk + 64 * n + 32 + 16 * h);
          const u8x16 e = ldu8(blk + 128 + 32 * n + 16 * h);
          const u8x16 q[4] = {(u8x16)((a & 15) | ((e & 3) << 4)), (u8x16)((c & 15) | (((e >> 2) & 3) << 4)),
                              (u8x16)((a >> 4) | (((e >> 4) & 3) << 4)), (u8x16)((c >> 4) | ((e >> 6) << 4))};
          for (int p = 0; p < 4; ++p) {
            const float dp = dl[r][8 * n + 2 * p + h];
            wv[r][p] = cvt(q[p]) * dp - 32.f * dp;
          }
        }
        for (int m = 0; m < MT; ++m)
          for (int p = 0; p < 4; ++p) {
            const f32x16 xv = ldf(xb + m * ldx + 32 * p + 16 * h);
            for (int r = 0; r < NR; ++r) acc[r][m][p % NA] += wv[r][p] * xv;
          }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[r * MT_MAX + m] = reduce(acc[r][m]);
}

template <int MT, int NR>
static void q80_f32(const uint8_t* w, int64_t ldw, int64_t nblk, const float* x, int64_t ldx, float* out) {
  constexpr int NA = n_acc(MT * NR);
  f32x16 acc[NR][MT][NA] = {};
  for (int64_t b = 0; b < nblk; ++b) {
    f32x16 w0[NR], w1[NR];
    for (int r = 0; r < NR; ++r) {
      const uint8_t* blk = w + r * ldw + b * Q80_BYTES;
      prefetch_ahead<Q80_BYTES>(blk);
      const float d = h2f(blk);
      w0[r] = cvt(ldi8(blk + 2)) * d, w1[r] = cvt(ldi8(blk + 18)) * d;
    }
    const int a = NA == 4 ? 2 * (int)(b & 1) : 0;
    for (int m = 0; m < MT; ++m) {
      const f32x16 x0 = ldf(x + m * ldx + 32 * b), x1 = ldf(x + m * ldx + 32 * b + 16);
      for (int r = 0; r < NR; ++r) {
        acc[r][m][a % NA] += w0[r] * x0;
        acc[r][m][(a + 1) % NA] += w1[r] * x1;
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MT; ++m) out[r * MT_MAX + m] = reduce(acc[r][m]);
}

// ---------------------------------------------------------------------------------------------
// MODE_Q8: activations as int8. Per activation row: xq (K int8), xd (one float per 256, or per 32
// for Q8_0), bs (sums of xq over each 16 elements, int16; K-quants only).

struct QX {
  const int8_t* q;
  const float* d;
  const int16_t* bs;
  int64_t ldq, ldd, ldbs;  // per-row strides of q, d, bs
};

// One block of `len` floats -> int8 with scale amax/127 (round to nearest even); returns the scale.
static inline float quant_block(const float* x, int len, int8_t* q) {
  float amax = 0.f;
  for (int i = 0; i < len; ++i) amax = fmaxf(amax, fabsf(x[i]));
  const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
  for (int i = 0; i < len; ++i) {
    float v = rintf(x[i] * id);
    v = v > 127.f ? 127.f : (v < -127.f ? -127.f : v);
    q[i] = (int8_t)v;
  }
  return d;
}

#if defined(TQ_AVX512)
static inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
#if defined(__AVX512VNNI__)
  return _mm512_dpwssd_epi32(acc, a, b);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
static inline __m512i dpbusd(__m512i acc, __m512i u, __m512i s) {  // u unsigned, s signed, no overflow
#if defined(__AVX512VNNI__)
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}
static inline float hsum512(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

#if defined(TQ_AVX2)
static inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

template <int MT>
static void q4k_q8(const uint8_t* row, int64_t B, const QX& x, float* out) {
#if defined(TQ_AVX512)
  // idx[c]: word lanes 0..15 take scale 2c, lanes 16..31 take scale 2c+1
  const __m512i m4 = _mm512_set1_epi8(0x0f);
  const __m128i dup = _mm_set_epi8(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  __m512 acc[MT];
  __m256 macc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps(), macc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = row + b * Q4K_BYTES;
    prefetch_ahead<Q4K_BYTES>(blk);
    const float d = h2f(blk), dmin = h2f(blk + 2);
    uint64_t sc, mn;
    q4k_scales(blk + 4, &sc, &mn);
    const __m128i sm8 = _mm_set_epi64x((long long)mn, (long long)sc);
    const __m512i sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(sm8));
    const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_srli_si128(sm8, 8), dup));
    __m512i q[4], s[4];
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 16 + 32 * c)));
      q[c] = _mm512_and_si512(_mm512_mask_srli_epi16(v, 0xFFFF0000u, v, 4), m4);  // 64 elements, in order
      s[c] = _mm512_permutexvar_epi16(
          _mm512_inserti64x4(_mm512_set1_epi16(2 * c), _mm256_set1_epi16(2 * c + 1), 1), sc16);
    }
    for (int m = 0; m < MT; ++m) {
      const int8_t* xq = x.q + m * x.ldq + b * QK;
      __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();  // two chains: half the latency
      for (int c = 0; c < 4; c += 2) {
        i0 = dpwssd(i0, _mm512_maddubs_epi16(q[c], _mm512_loadu_si512(xq + 64 * c)), s[c]);
        i1 = dpwssd(i1, _mm512_maddubs_epi16(q[c + 1], _mm512_loadu_si512(xq + 64 * c + 64)), s[c + 1]);
      }
      const __m512i isum = _mm512_add_epi32(i0, i1);
      const float dx = x.d[m * x.ldd + b];
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * dx), acc[m]);
      const __m256i mins = _mm256_madd_epi16(mn16, _mm256_loadu_si256((const __m256i*)(x.bs + m * x.ldbs + 16 * b)));
      macc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(dmin * dx), macc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum512(acc[m]) - hsum256(macc[m]);
#elif defined(TQ_AVX2)
  const __m256i m4 = _mm256_set1_epi8(0x0f);
  const __m128i dup = _mm_set_epi8(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  __m256 acc[MT], macc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = macc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = row + b * Q4K_BYTES;
    prefetch_ahead<Q4K_BYTES>(blk);
    const float d = h2f(blk), dmin = h2f(blk + 2);
    uint64_t sc, mn;
    q4k_scales(blk + 4, &sc, &mn);
    const __m128i sm8 = _mm_set_epi64x((long long)mn, (long long)sc);
    const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_shuffle_epi8(_mm_srli_si128(sm8, 8), dup));
    __m256i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
    for (int c = 0; c < 4; ++c) {
      const __m256i v = _mm256_loadu_si256((const __m256i*)(blk + 16 + 32 * c));
      const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
      const __m256i s0 = _mm256_set1_epi16(byte_of(sc, 2 * c)), s1 = _mm256_set1_epi16(byte_of(sc, 2 * c + 1));
      for (int m = 0; m < MT; ++m) {
        const int8_t* xq = x.q + m * x.ldq + b * QK + 64 * c;
        const __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)xq));
        const __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + 32)));
        isum[m] = _mm256_add_epi32(isum[m], _mm256_add_epi32(_mm256_madd_epi16(p0, s0), _mm256_madd_epi16(p1, s1)));
      }
    }
    for (int m = 0; m < MT; ++m) {
      const float dx = x.d[m * x.ldd + b];
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[m]), _mm256_set1_ps(d * dx), acc[m]);
      const __m256i mins = _mm256_madd_epi16(mn16, _mm256_loadu_si256((const __m256i*)(x.bs + m * x.ldbs + 16 * b)));
      macc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(dmin * dx), macc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum256(acc[m]) - hsum256(macc[m]);
#else
  float acc[MT] = {};
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = row + b * Q4K_BYTES;
    prefetch_ahead<Q4K_BYTES>(blk);
    const float d = h2f(blk), dmin = h2f(blk + 2);
    uint64_t sc, mn;
    q4k_scales(blk + 4, &sc, &mn);
    for (int m = 0; m < MT; ++m) {
      const int8_t* xq = x.q + m * x.ldq + b * QK;
      const int16_t* bs = x.bs + m * x.ldbs + 16 * b;
      int32_t isum = 0, msum = 0;
      for (int c = 0; c < 4; ++c) {
        int32_t s0 = 0, s1 = 0;
        for (int l = 0; l < 32; ++l) {
          const uint8_t v = blk[16 + 32 * c + l];
          s0 += (v & 15) * xq[64 * c + l];
          s1 += (v >> 4) * xq[64 * c + 32 + l];
        }
        isum += s0 * byte_of(sc, 2 * c) + s1 * byte_of(sc, 2 * c + 1);
        msum += byte_of(mn, 2 * c) * (bs[4 * c] + bs[4 * c + 1]) + byte_of(mn, 2 * c + 1) * (bs[4 * c + 2] + bs[4 * c + 3]);
      }
      const float dx = x.d[m * x.ldd + b];
      acc[m] += d * dx * (float)isum - dmin * dx * (float)msum;
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = acc[m];
#endif
}

template <int MT>
static void q6k_q8(const uint8_t* row, int64_t B, const QX& x, float* out) {
#if defined(TQ_AVX512)
  const __m512i m4 = _mm512_set1_epi8(0x0f), m30 = _mm512_set1_epi8(0x30);
  // word lane 8g..8g+7 takes scale g (lo vector) or 4+g (hi vector)
  const __m512i idx_lo = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2,
                                          1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(4));
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = row + b * Q6K_BYTES;
    prefetch_ahead<Q6K_BYTES>(blk);
    const float d = h2f(blk + 208);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(blk + 192)));
    __m512i q[4], s[4];
    for (int n = 0; n < 2; ++n) {
      const __m512i ql = _mm512_loadu_si512(blk + 64 * n);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * n)));
      const __m512i h_lo = _mm512_mask_srli_epi16(qh, 0xFFFF0000u, qh, 2);  // bits 0-1 | bits 2-3
      const __m512i h_hi = _mm512_mask_srli_epi16(_mm512_srli_epi16(qh, 4), 0xFFFF0000u, qh, 6);
      q[2 * n] = _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(_mm512_slli_epi16(h_lo, 4), m30));
      q[2 * n + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                                     _mm512_and_si512(_mm512_slli_epi16(h_hi, 4), m30));
      const __m512i sn = _mm512_castsi256_si512(n ? _mm256_permute4x64_epi64(sc16, 0x0e) : sc16);
      s[2 * n] = _mm512_permutexvar_epi16(idx_lo, sn);
      s[2 * n + 1] = _mm512_permutexvar_epi16(idx_hi, sn);
    }
    for (int m = 0; m < MT; ++m) {
      const int8_t* xq = x.q + m * x.ldq + b * QK;
      __m512i i0 = _mm512_setzero_si512(), i1 = _mm512_setzero_si512();
      for (int v = 0; v < 4; v += 2) {
        i0 = dpwssd(i0, _mm512_maddubs_epi16(q[v], _mm512_loadu_si512(xq + 64 * v)), s[v]);
        i1 = dpwssd(i1, _mm512_maddubs_epi16(q[v + 1], _mm512_loadu_si512(xq + 64 * v + 64)), s[v + 1]);
      }
      __m512i isum = _mm512_add_epi32(i0, i1);
      // q is stored +32: subtract 32 * sum_g sc_g * bs_g
      const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)(x.bs + m * x.ldbs + 16 * b)));
      isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32(off, 5)));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(d * x.d[m * x.ldd + b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum512(acc[m]);
#elif defined(TQ_AVX2)
  const __m256i m4 = _mm256_set1_epi8(0x0f), m30 = _mm256_set1_epi8(0x30);
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = row + b * Q6K_BYTES;
    prefetch_ahead<Q6K_BYTES>(blk);
    const float d = h2f(blk + 208);
    const int8_t* sc = (const int8_t*)(blk + 192);
    const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)sc));
    __m256i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm256_setzero_si256();
    for (int n = 0; n < 2; ++n) {
      const __m256i a = _mm256_loadu_si256((const __m256i*)(blk + 64 * n));
      const __m256i c = _mm256_loadu_si256((const __m256i*)(blk + 64 * n + 32));
      const __m256i e = _mm256_loadu_si256((const __m256i*)(blk + 128 + 32 * n));
      __m256i q[4];  // elements 128n + 32g + l, g = 0..3
      q[0] = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi16(e, 4), m30));
      q[1] = _mm256_or_si256(_mm256_and_si256(c, m4), _mm256_and_si256(_mm256_slli_epi16(e, 2), m30));
      q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), _mm256_and_si256(e, m30));
      q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), m4),
                             _mm256_and_si256(_mm256_srli_epi16(e, 2), m30));
      for (int g = 0; g < 4; ++g) {
        // words 0..7 (l < 16) take sc[8n + 2g], words 8..15 take sc[8n + 2g + 1]
        const __m256i s = _mm256_setr_m128i(_mm_set1_epi16(sc[8 * n + 2 * g]), _mm_set1_epi16(sc[8 * n + 2 * g + 1]));
        for (int m = 0; m < MT; ++m) {
          const int8_t* xq = x.q + m * x.ldq + b * QK + 128 * n + 32 * g;
          const __m256i p = _mm256_maddubs_epi16(q[g], _mm256_loadu_si256((const __m256i*)xq));
          isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(p, s));
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const __m256i off = _mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i*)(x.bs + m * x.ldbs + 16 * b)));
      const __m256i tot = _mm256_sub_epi32(isum[m], _mm256_slli_epi32(off, 5));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_set1_ps(d * x.d[m * x.ldd + b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum256(acc[m]);
#else
  float acc[MT] = {};
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = row + b * Q6K_BYTES;
    prefetch_ahead<Q6K_BYTES>(blk);
    const float d = h2f(blk + 208);
    const int8_t* sc = (const int8_t*)(blk + 192);
    for (int m = 0; m < MT; ++m) {
      const int8_t* xq = x.q + m * x.ldq + b * QK;
      int32_t isum = 0;
      for (int n = 0; n < 2; ++n) {
        const uint8_t *ql = blk + 64 * n, *qh = blk + 128 + 32 * n;
        const int8_t* xn = xq + 128 * n;
        for (int g = 0; g < 8; ++g) {  // 16-element groups of this half: l = 16(g%2).., part g/2
          int32_t s = 0;
          const int part = g / 2, l0 = 16 * (g % 2);
          for (int l = l0; l < l0 + 16; ++l) {
            const uint8_t lo = part & 1 ? ql[l + 32] : ql[l];
            const int q = ((part < 2 ? lo & 15 : lo >> 4) | (((qh[l] >> (2 * part)) & 3) << 4)) - 32;
            s += q * xn[32 * part + l];
          }
          isum += s * sc[8 * n + 2 * part + g % 2];
        }
      }
      acc[m] += d * x.d[m * x.ldd + b] * (float)isum;
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = acc[m];
#endif
}

template <int MT>
static void q80_q8(const uint8_t* row, int64_t nblk, const QX& x, float* out) {
  int64_t b = 0;
#if defined(TQ_AVX512)
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (; b + 2 <= nblk; b += 2) {  // two blocks per 512-bit vector: lanes 0..7 block b, 8..15 block b+1
    const uint8_t* blk = row + b * Q80_BYTES;
    prefetch_ahead<2 * Q80_BYTES>(blk);
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)(blk + 2))),
                                         _mm256_loadu_si256((const __m256i*)(blk + Q80_BYTES + 2)), 1);
    const __m512i aw = _mm512_abs_epi8(w);
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512 dw = _mm512_insertf32x8(_mm512_set1_ps(h2f(blk)), _mm256_set1_ps(h2f(blk + Q80_BYTES)), 1);
    for (int m = 0; m < MT; ++m) {
      const __m512i xv = _mm512_loadu_si512(x.q + m * x.ldq + 32 * b);
      const __m512i sx = _mm512_mask_sub_epi8(xv, neg, _mm512_setzero_si512(), xv);  // x * sign(w)
      const __m512i dot = dpbusd(_mm512_setzero_si512(), aw, sx);
      const float* dx = x.d + m * x.ldd + b;
      const __m512 s = _mm512_mul_ps(dw, _mm512_insertf32x8(_mm512_set1_ps(dx[0]), _mm256_set1_ps(dx[1]), 1));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum512(acc[m]);
#elif defined(TQ_AVX2)
  __m256 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (; b < nblk; ++b) {
    const uint8_t* blk = row + b * Q80_BYTES;
    prefetch_ahead<Q80_BYTES>(blk);
    const __m256i w = _mm256_loadu_si256((const __m256i*)(blk + 2));
    const __m256i aw = _mm256_sign_epi8(w, w);
    const float dw = h2f(blk);
    for (int m = 0; m < MT; ++m) {
      const __m256i sx = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(x.q + m * x.ldq + 32 * b)), w);
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * x.d[m * x.ldd + b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) out[m] = hsum256(acc[m]);
#else
  for (int m = 0; m < MT; ++m) out[m] = 0.f;
#endif
  for (; b < nblk; ++b) {  // the portable path, and an odd last block on AVX-512
    const uint8_t* blk = row + b * Q80_BYTES;
    prefetch_ahead<Q80_BYTES>(blk);
    const float dw = h2f(blk);
    for (int m = 0; m < MT; ++m) {
      const int8_t* xq = x.q + m * x.ldq + 32 * b;
      // Read the weights through an int8_t pointer: GCC 12 vectorizes `(int8_t)u8[l] * xq[l]` as an
      // unsigned x signed dot product and gets negative weights wrong (seen with -march=native).
      const int8_t* wq = (const int8_t*)(blk + 2);
      int32_t s = 0;
      for (int l = 0; l < 32; ++l) s += (int32_t)wq[l] * (int32_t)xq[l];
      out[m] += dw * x.d[m * x.ldd + b] * (float)s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Dispatch: rows [n0, n1) of w against all M rows of x, in tiles of at most MT_MAX activation rows.

struct Job {
  int qtype, mode;
  const uint8_t* w;
  int64_t ldw, K, M, ldx, ldy;
  const float* x;
  QX qx;
  float* y;
};

// Weight rows per float32 tile when there are several activation rows: as many as the vector
// registers hold (AVX-512 has 32, AVX2 16 of half the width).
#if defined(TQ_AVX512)
constexpr int NR_F32 = 4;
#else
constexpr int NR_F32 = 2;
#endif

// Weight rows n .. n+NR-1 against activation rows m0 .. m0+MT-1 -> out[r * MT_MAX + m].
template <int MT, int NR>
static void tile(const Job& j, int64_t n, int64_t m0, float* out) {
  const uint8_t* w = j.w + n * j.ldw;
  const float* x = j.x + m0 * j.ldx;
  switch (j.qtype * 2 + j.mode) {
    case T_Q4_K * 2 + MODE_F32: q4k_f32<MT, NR>(w, j.ldw, j.K / QK, x, j.ldx, out); return;
    case T_Q6_K * 2 + MODE_F32: q6k_f32<MT, NR>(w, j.ldw, j.K / QK, x, j.ldx, out); return;
    case T_Q8_0 * 2 + MODE_F32: q80_f32<MT, NR>(w, j.ldw, j.K / 32, x, j.ldx, out); return;
  }
  QX qx = j.qx;  // int8 rows: L1-sized, so one weight row per tile
  qx.q += m0 * qx.ldq, qx.d += m0 * qx.ldd, qx.bs += m0 * qx.ldbs;
  for (int r = 0; r < NR; ++r, w += j.ldw, out += MT_MAX) switch (j.qtype) {
      case T_Q4_K: q4k_q8<MT>(w, j.K / QK, qx, out); break;
      case T_Q6_K: q6k_q8<MT>(w, j.K / QK, qx, out); break;
      case T_Q8_0: q80_q8<MT>(w, j.K / 32, qx, out); break;
    }
}

template <int NR>
static void row_block(const Job& j, int64_t n) {
  float out[NR * MT_MAX];
  for (int64_t m0 = 0; m0 < j.M; m0 += MT_MAX) {
    const int64_t mt = j.M - m0 < MT_MAX ? j.M - m0 : MT_MAX;
    switch (mt) {
      case 1: tile<1, NR>(j, n, m0, out); break;
      case 2: tile<2, NR>(j, n, m0, out); break;
      case 3: tile<3, NR>(j, n, m0, out); break;
      default: tile<4, NR>(j, n, m0, out); break;
    }
    for (int r = 0; r < NR; ++r)
      for (int64_t m = 0; m < mt; ++m) j.y[(m0 + m) * j.ldy + n + r] = out[r * MT_MAX + m];
  }
}

static void rows(const Job& j, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (j.mode == MODE_F32 && j.M > 1)
    for (; n + NR_F32 <= n1; n += NR_F32) row_block<NR_F32>(j, n);
  for (; n < n1; ++n) row_block<1>(j, n);
}

extern "C" {

const char* tq_isa(void) {
#if defined(TQ_AVX512) && defined(__AVX512VNNI__)
  return "avx512vnni";
#elif defined(TQ_AVX512)
  return "avx512";
#elif defined(TQ_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

// y[m, n] = sum_k x[m, k] * w_n[k]. Returns 0, or -1 for an unknown type/mode, -2 for a K that is
// not a multiple of the block, -3 when the int8 activation buffer cannot be allocated.
int tq_matmul(int qtype, int mode, const uint8_t* w, int64_t N, int64_t ldw, int64_t K, const float* x, int64_t M,
              int64_t ldx, float* y, int64_t ldy, int nthreads) {
  if ((qtype != T_Q4_K && qtype != T_Q6_K && qtype != T_Q8_0) || (mode != MODE_F32 && mode != MODE_Q8)) return -1;
  const int64_t blk = qtype == T_Q8_0 ? 32 : QK;
  if (K <= 0 || K % blk) return -2;
  if (N <= 0 || M <= 0) return 0;
  Job j = {qtype, mode, w, ldw, K, M, ldx, ldy, x, {nullptr, nullptr, nullptr, 0, 0, 0}, y};
  void* buf = nullptr;
  if (mode == MODE_Q8) {
    // (M, K) int8 | (M, K/blk) float scales | (M, K/16) int16 sums, each row 64-byte aligned
    const int64_t ldq = (K + 63) / 64 * 64, ldd = (K / blk + 15) / 16 * 16, ldbs = (K / 16 + 31) / 32 * 32;
    buf = aligned_alloc(64, (size_t)M * (ldq + 4 * ldd + 2 * ldbs));
    if (!buf) return -3;
    int8_t* q = (int8_t*)buf;
    float* d = (float*)(q + M * ldq);
    int16_t* bs = (int16_t*)(d + M * ldd);
    j.qx = {q, d, bs, ldq, ldd, ldbs};
  }
  const int64_t nblk = K / blk;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1)
  {
    if (mode == MODE_Q8) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < M * nblk; ++i) {
        const int64_t m = i / nblk, b = i % nblk;
        int8_t* q = (int8_t*)j.qx.q + m * j.qx.ldq + b * blk;
        ((float*)j.qx.d)[m * j.qx.ldd + b] = quant_block(x + m * ldx + b * blk, (int)blk, q);
        if (blk == QK)
          for (int g = 0; g < 16; ++g) {
            int s = 0;
            for (int l = 0; l < 16; ++l) s += q[16 * g + l];
            ((int16_t*)j.qx.bs)[m * j.qx.ldbs + 16 * b + g] = (int16_t)s;
          }
      }  // implicit barrier: every row of x is quantized before any dot product
    }
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    rows(j, N * t / nt, N * (t + 1) / nt);
  }
  free(buf);
  return 0;
}

// Reads nbytes once with nthreads threads (XOR of 64-byte words, so nothing is optimized away; a
// tail under 64 bytes is skipped): the streaming-read ceiling the benchmark compares kernels with.
uint64_t tq_read(const uint8_t* p, int64_t nbytes, int nthreads) {
  uint64_t total = 0;
  const int64_t n = nbytes / 64;
#pragma omp parallel num_threads(nthreads > 0 ? nthreads : 1) reduction(^ : total)
  {
    typedef uint64_t u64x8 __attribute__((vector_size(64)));
    u64x8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t i = n * t / nt;
    const int64_t e = n * (t + 1) / nt;
    for (; i + 4 <= e; i += 4) {
      u64x8 v0, v1, v2, v3;
      memcpy(&v0, p + 64 * i, 64), memcpy(&v1, p + 64 * i + 64, 64);
      memcpy(&v2, p + 64 * i + 128, 64), memcpy(&v3, p + 64 * i + 192, 64);
      a0 ^= v0, a1 ^= v1, a2 ^= v2, a3 ^= v3;
    }
    for (; i < e; ++i) {
      u64x8 v;
      memcpy(&v, p + 64 * i, 64);
      a0 ^= v;
    }
    a0 ^= a1 ^ a2 ^ a3;
    for (int k = 0; k < 8; ++k) total ^= a0[k];
  }
  return total;
}

}  // extern "C"
