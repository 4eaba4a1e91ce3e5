// rerankd's CPU kernels for x86 CPUs with AVX-512 (built and loaded by cpu_kernels.py), on fp32 or bf16 tensors: the
// packed attention below (fp32 arithmetic), and at the end of the file the element-wise work of the decoder layers
// (RMSNorm with its residual add, rotary embedding, SiLU-gated product) and of the cross-encoder layers (bias + GELU,
// bias + residual + LayerNorm).
//
// Packed attention: softmax(q k^T * scale) v within each packed sequence, for all sequences and heads of a batch in one
// call. Why: torch's CPU flash kernel, called once per sequence, runs short sequences (tens to hundreds of tokens, what
// rerankers see) at a third to a half of the matmul rate, on tiny per-block products. Here one OpenMP region walks work
// units of (sequence, key/value head, up to UNIT_ROWS query rows), longest first, each taken by the next free thread. A
// unit copies its keys (transposed, [head_dim, keys]) and values ([keys, head_dim]) into thread-local buffers that stay
// in cache, then, for every query head of the group and block of QB query rows: the scores [rows, keys] with register-
// blocked FMAs, an exact softmax (max, exp, sum; 1/sum applied to the output), and the weighted sum of the values. A
// unit with more keys than key_block takes them a block at a time instead, carrying each row's running max, sum and
// output across the blocks (flash attention's online softmax), so that its keys and values stay in cache at any length.
// Nothing depends on the other sequences of the batch: a sequence's result is the same bit for bit whatever it is
// batched with.
//
// Layouts (fp32, or bf16 with bf16 = 1; row-major): q [q_rows, Hq, D] with row stride q_stride; k, v [tokens, Hk,
// D] with row strides k_stride, v_stride; out [q_rows, Hq, D] contiguous. Sequence s: keys k[key_start[s] ..
// + key_len[s]), query rows q[q_start[s] .. + q_len[s]) at positions q_pos[s] .. of the sequence (causal: row at
// position p sees keys 0..p).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int QB = 64;               // query rows per block (the scores of a block stay in L2)
constexpr int64_t UNIT_ROWS = 256;   // query rows per work unit (one copy of its keys and values)
constexpr int MR = 6;                // query rows per micro_gemm: 6 x 32 keys or 6 x 64 columns of accumulators

struct Args {
  const void *k, *v;  // fp32, or bf16 when bf16
  int64_t q_stride, k_stride, v_stride, Hq, D;
  float scale;
  int causal;
  bool bf16;
};

inline __mmask16 first_n(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n > 0 ? n : 0)) - 1); }

// bf16 tensors (bf16 = 1): widened to fp32 as they are read; results rounded to nearest even as they are written
inline __m512 load(const void* p, int64_t i, __mmask16 m, bool bf16) {
  if (!bf16) return _mm512_maskz_loadu_ps(m, (const float*)p + i);
  const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// x's bits rounded to bf16 (in the upper 16 bits), to nearest even; a NaN becomes bf16's quiet NaN, as in c10
inline __m512i bf16_bits(__m512 x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// x rounded to bf16 when bf16 (a torch op's result in a bf16 model), else x
inline __m512 rnd(__m512 x, bool bf16) {
  return bf16 ? _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(x), _mm512_set1_epi32((int)0xFFFF0000u))) : x;
}

inline void store(void* p, int64_t i, __mmask16 m, __m512 x, bool bf16) {
  if (!bf16) {
    _mm512_mask_storeu_ps((float*)p + i, m, x);
  } else {
    _mm256_mask_storeu_epi16((uint16_t*)p + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(x), 16)));
  }
}

// exp(x): Cephes' expf polynomial after range reduction (about 1 ulp); exp(-88) below -88, inf above 88.8 (2^n
// with n = 128 or more overflows in scalef)
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(100.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// r[i] = row i of a 16 x 16 tile, turned into r[i] = column i (t: scratch)
inline void transpose16(__m512* r, __m512* t) {
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}

// n elements from element `at` of p into dst, widened to fp32 when bf16
inline void row_to_fp32(const void* p, int64_t at, float* dst, int64_t n, bool bf16) {
  if (!bf16) {
    memcpy(dst, (const float*)p + at, sizeof(float) * n);
    return;
  }
  for (int64_t d = 0; d < n; d += 16) {
    const __mmask16 m = first_n(n - d);
    _mm512_mask_storeu_ps(dst + d, m, load(p, at + d, m, true));
  }
}

// keys [0, nk) of one sequence and kv head into kt ([D, ldk], transposed) and vt ([nk, D]), in fp32
void pack_kv(const Args& a, int64_t key_start, int64_t nk, int64_t hk, float* kt, int64_t ldk, float* vt) {
  const int64_t D = a.D;
  for (int64_t t0 = 0; t0 < nk; t0 += 16) {
    const int64_t tn = std::min<int64_t>(16, nk - t0);
    for (int64_t t = 0; t < tn; ++t)
      row_to_fp32(a.v, (key_start + t0 + t) * a.v_stride + hk * D, vt + (t0 + t) * D, D, a.bf16);
    const __mmask16 keys = first_n(tn);
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      const __mmask16 dims = first_n(D - d0);
      __m512 r[16], t[16];
      for (int i = 0; i < 16; ++i)
        r[i] = i < tn ? load(a.k, (key_start + t0 + i) * a.k_stride + hk * D + d0, dims, a.bf16)
                      : _mm512_setzero_ps();
      transpose16(r, t);
      for (int64_t d = 0; d < std::min<int64_t>(16, D - d0); ++d)
        _mm512_mask_storeu_ps(kt + (d0 + d) * ldk + t0, keys, r[d]);
    }
  }
}

// The one register-blocked product of the kernel, for the scores and for the weighted values alike:
// out[r][16 c + i] = scale[r * scale_step] * sum_k a[r * lda + k] * b[k * ldb + 16 c + i], r < ROWS, c < NC (the
// last 16 columns masked by `last`): ROWS x NC accumulators in registers, a broadcast of `a` times NC loads of `b`.
template <int ROWS, int NC>
inline void micro_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, __mmask16 last,
                       float* out, int64_t ldo, const float* scale, int scale_step) {
  __m512 acc[ROWS][NC];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c)
      bv[c] = _mm512_maskz_loadu_ps(c == NC - 1 ? last : (__mmask16)0xFFFF, b + k * ldb + 16 * c);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) acc[r][c] = _mm512_fmadd_ps(av, bv[c], acc[r][c]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r) {
    const __m512 sv = _mm512_set1_ps(scale[r * scale_step]);
#pragma GCC unroll 4
    for (int c = 0; c < NC; ++c)
      _mm512_mask_storeu_ps(out + r * ldo + 16 * c, c == NC - 1 ? last : (__mmask16)0xFFFF,
                            _mm512_mul_ps(acc[r][c], sv));
  }
}

// micro_gemm for `mr` (1..MR) rows
static_assert(MR == 6, "micro_rows dispatches 1..6 rows");
template <int NC>
inline void micro_rows(int mr, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t K, __mmask16 last,
                       float* out, int64_t ldo, const float* scale, int scale_step) {
  switch (mr) {
    case 6: micro_gemm<6, NC>(a, lda, b, ldb, K, last, out, ldo, scale, scale_step); break;
    case 5: micro_gemm<5, NC>(a, lda, b, ldb, K, last, out, ldo, scale, scale_step); break;
    case 4: micro_gemm<4, NC>(a, lda, b, ldb, K, last, out, ldo, scale, scale_step); break;
    case 3: micro_gemm<3, NC>(a, lda, b, ldb, K, last, out, ldo, scale, scale_step); break;
    case 2: micro_gemm<2, NC>(a, lda, b, ldb, K, last, out, ldo, scale, scale_step); break;
    default: micro_gemm<1, NC>(a, lda, b, ldb, K, last, out, ldo, scale, scale_step); break;
  }
}

// scores of query rows [r0, r1) (positions pos0 + r) against keys [0, nk); q: row r0 of one head (fp32), rows qs apart
void scores(const Args& a, const float* q, int64_t qs, const float* kt, int64_t ldk, int64_t r0, int64_t r1,
            int64_t pos0, int64_t nk, float* S, int64_t ld) {
  for (int64_t j = 0; j < nk; j += 32) {
    int64_t rb = r0;
    if (a.causal && pos0 + r0 < j)  // rows at positions before key j see none of these keys
      rb = r0 + (std::min(j - pos0, r1) - r0) / MR * MR;
    const bool two = nk - j > 16;
    const __mmask16 last = first_n(two ? nk - j - 16 : nk - j);
    for (; rb < r1; rb += MR) {
      const int mr = (int)std::min<int64_t>(MR, r1 - rb);
      const float* qrow = q + (rb - r0) * qs;
      float* srow = S + (rb - r0) * ld;
      if (two)
        micro_rows<2>(mr, qrow, qs, kt + j, ldk, a.D, last, srow + j, ld, &a.scale, 0);
      else
        micro_rows<1>(mr, qrow, qs, kt + j, ldk, a.D, last, srow + j, ld, &a.scale, 0);
    }
  }
}

// rows [r0, r1) of head h of the query block starting at q (the query rows' dtype, rows a.q_stride apart), as the
// scores read them: the fp32 rows in place (their stride in *qs), or bf16 rows widened into Qb ([rows, D])
const float* query_rows(const Args& a, const void* q, int64_t h, int64_t r0, int64_t r1, float* Qb, int64_t* qs) {
  if (!a.bf16) {
    *qs = a.q_stride;
    return (const float*)q + r0 * a.q_stride + h * a.D;
  }
  for (int64_t r = r0; r < r1; ++r) row_to_fp32(q, r * a.q_stride + h * a.D, Qb + (r - r0) * a.D, a.D, true);
  *qs = a.D;
  return Qb;
}

// rows [r0, r1) of S times the values, each row times scale[(r - r0) * step], into out (row r0 first, stride ldo), in
// panels of up to 64 columns (4 registers x 6 rows = 24 accumulators)
void weighted(const Args& a, float* out, int64_t ldo, const float* vt, int64_t r0, int64_t r1, int64_t pos0,
              int64_t nk, const float* S, int64_t ld, const float* scale, int step) {
  const int64_t D = a.D;
  for (int64_t rb = r0; rb < r1; rb += MR) {
    const int mr = (int)std::min<int64_t>(MR, r1 - rb);
    const int64_t jn = a.causal ? std::min(pos0 + rb + mr, nk) : nk;
    const float* srow = S + (rb - r0) * ld;
    float* orow = out + (rb - r0) * ldo;
    const float* rs = scale + (rb - r0) * step;
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      const int64_t cols = std::min<int64_t>(64, D - c0);
      const __mmask16 last = first_n(cols - (cols - 1) / 16 * 16);
      switch ((cols + 15) / 16) {
        case 4: micro_rows<4>(mr, srow, ld, vt + c0, D, jn, last, orow + c0, ldo, rs, step); break;
        case 3: micro_rows<3>(mr, srow, ld, vt + c0, D, jn, last, orow + c0, ldo, rs, step); break;
        case 2: micro_rows<2>(mr, srow, ld, vt + c0, D, jn, last, orow + c0, ldo, rs, step); break;
        default: micro_rows<1>(mr, srow, ld, vt + c0, D, jn, last, orow + c0, ldo, rs, step); break;
      }
    }
  }
}

// One block of keys for rows whose keys do not fit one block (flash attention's online softmax): each row's scores
// in S become its numerators against the running max m[i] (updated), l[i] (the running sum) is rescaled and grown,
// and alpha[i] is what the row's output so far is to be multiplied by. pos: position of row 0 relative to the
// block's first key (causal: negative for rows before the block, which see none of it: alpha 1, numerators 0).
void softmax_block(const Args& a, float* S, int64_t ld, int64_t rows, int64_t pos, int64_t nk, float* m, float* l,
                   float* alpha) {
  const int64_t padded = (nk + 31) / 32 * 32;
  for (int64_t i = 0; i < rows; ++i) {
    float* s = S + i * ld;
    const int64_t n = a.causal ? std::max<int64_t>(0, std::min(pos + i + 1, nk)) : nk;
    if (n == 0) {
      alpha[i] = 1.0f;
      for (int64_t j = 0; j < padded; j += 16) _mm512_storeu_ps(s + j, _mm512_setzero_ps());
      continue;
    }
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n; j += 16) mx = _mm512_mask_max_ps(mx, first_n(n - j), mx, _mm512_loadu_ps(s + j));
    const float m_new = std::max(m[i], _mm512_reduce_max_ps(mx));
    alpha[i] = m[i] == -INFINITY ? 0.0f : expf(m[i] - m_new);
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < padded; j += 16) {
      const __m512 e = _mm512_maskz_mov_ps(first_n(n - j), exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv)));
      sum = _mm512_add_ps(sum, e);
      _mm512_storeu_ps(s + j, e);
    }
    m[i] = m_new;
    l[i] = l[i] * alpha[i] + _mm512_reduce_add_ps(sum);
  }
}

// the exact softmax of rows that see all their keys at once (rows <= QB): softmax_block from an empty start, the
// numerators in place, zeros up to the key count rounded to 32 (what the weighted sum reads); inv[i] = 1 / the sum
void softmax_rows(const Args& a, float* S, int64_t ld, int64_t rows, int64_t pos, int64_t nk, float* inv) {
  float m[QB], l[QB], alpha[QB];
  std::fill(m, m + rows, -INFINITY);
  std::fill(l, l + rows, 0.0f);
  softmax_block(a, S, ld, rows, pos, nk, m, l, alpha);
  for (int64_t i = 0; i < rows; ++i) inv[i] = 1.0f / l[i];
}

// out's row at element `at` = src * f (D values), rounded when bf16
inline void put_row(const Args& a, void* out, int64_t at, const float* src, __m512 f) {
  for (int64_t d = 0; d < a.D; d += 16) {
    const __mmask16 m = first_n(a.D - d);
    store(out, at + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src + d), f), a.bf16);
  }
}

}  // namespace

// q, k, v and out all fp32 (bf16 = 0) or all bf16 (bf16 = 1: widened as they are read, the fp32 result rounded to
// nearest even as it is written: the fp32 kernel's result on the widened values, rounded as torch's .to() rounds)
extern "C" int rerankd_attention(const void* q, const void* k, const void* v, void* out, int64_t q_stride,
                                 int64_t k_stride, int64_t v_stride, int64_t Hq, int64_t Hk, int64_t D,
                                 const int64_t* key_start, const int64_t* key_len, const int64_t* q_start,
                                 const int64_t* q_len, const int64_t* q_pos, int64_t n, float scale, int causal,
                                 int threads, int64_t key_block, int bf16) {
  if (Hk <= 0 || Hq % Hk != 0 || D <= 0 || threads <= 0 || key_block < 32 || key_block % 32 != 0) return 1;
  const Args a{k, v, q_stride, k_stride, v_stride, Hq, D, scale, causal, bf16 != 0};
  struct Unit {
    int64_t s, hk, r0, r1;
    double cost;
  };
  std::vector<Unit> units;
  int64_t most_keys = 0;
  for (int64_t s = 0; s < n; ++s) {
    if (q_len[s] <= 0 || key_len[s] <= 0) continue;
    if (causal && q_pos[s] + q_len[s] > key_len[s]) return 2;  // a query row without its key
    most_keys = std::max(most_keys, key_len[s]);
    for (int64_t hk = 0; hk < Hk; ++hk)
      for (int64_t r0 = 0; r0 < q_len[s]; r0 += UNIT_ROWS) {
        const int64_t r1 = std::min(r0 + UNIT_ROWS, q_len[s]);
        const double keys = causal ? q_pos[s] + 0.5 * (r0 + r1) : (double)key_len[s];
        units.push_back({s, hk, r0, r1, (double)(r1 - r0) * keys});
      }
  }
  std::stable_sort(units.begin(), units.end(), [](const Unit& x, const Unit& y) { return x.cost > y.cost; });
  const int64_t count = (int64_t)units.size(), group = Hq / Hk, os = Hq * D;
  const int64_t ld = (std::min(most_keys, key_block) + 31) / 32 * 32, ldk = ld + 16;  // + 16: kt's rows not 4 KiB apart
  const int64_t state = group * UNIT_ROWS;  // rows of a unit whose keys come in blocks: their outputs, maxes and sums
  const float one = 1.0f;
  int64_t next = 0;
  int failed = 0;
#pragma omp parallel num_threads(threads)
  {
    const int64_t floats = QB * ld + QB + 16 + D * ldk + ld * D + state * (D + 2) + QB * D + QB + 16 + QB * D;
    float* buf = (float*)aligned_alloc(64, sizeof(float) * ((floats + 15) / 16 * 16));
    if (buf == nullptr) {
      __atomic_store_n(&failed, 3, __ATOMIC_RELAXED);
    } else {
      float *S = buf, *inv = S + QB * ld, *kt = inv + QB + 16, *vt = kt + D * ldk, *O = vt + ld * D;
      float *m = O + state * D, *l = m + state, *T = l + state, *alpha = T + QB * D, *Qb = alpha + QB + 16;
      for (;;) {
        const int64_t i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
        if (i >= count) break;
        const Unit& u = units[i];
        const int64_t pos0 = causal ? q_pos[u.s] : 0;
        const int64_t keys = causal ? pos0 + u.r1 : key_len[u.s];
        const int64_t q0 = q_start[u.s] * q_stride, ob = q_start[u.s] * os;  // element offsets of the first rows
        const void* qs = bf16 ? (const void*)((const uint16_t*)q + q0) : (const void*)((const float*)q + q0);
        if (keys <= key_block) {  // all keys at once: an exact softmax over each row
          pack_kv(a, key_start[u.s], keys, u.hk, kt, ldk, vt);
          for (int64_t h = u.hk * group; h < (u.hk + 1) * group; ++h)
            for (int64_t r0 = u.r0; r0 < u.r1; r0 += QB) {
              const int64_t r1 = std::min<int64_t>(r0 + QB, u.r1);
              const int64_t nk = causal ? pos0 + r1 : keys;
              int64_t qstr;
              const float* qr = query_rows(a, qs, h, r0, r1, Qb, &qstr);
              scores(a, qr, qstr, kt, ldk, r0, r1, pos0, nk, S, ld);
              softmax_rows(a, S, ld, r1 - r0, pos0 + r0, nk, inv);
              if (!bf16) {
                weighted(a, (float*)out + ob + r0 * os + h * D, os, vt, r0, r1, pos0, nk, S, ld, inv, 1);
                continue;
              }
              weighted(a, T, D, vt, r0, r1, pos0, nk, S, ld, inv, 1);
              for (int64_t r = r0; r < r1; ++r)
                put_row(a, out, ob + r * os + h * D, T + (r - r0) * D, _mm512_set1_ps(1.0f));
            }
          continue;
        }
        // keys in blocks of key_block (they stay in cache), each row's output and softmax carried across them
        const int64_t rows = u.r1 - u.r0;
        for (int64_t g = 0; g < group; ++g)
          for (int64_t r = 0; r < rows; ++r) {
            m[g * rows + r] = -INFINITY;
            l[g * rows + r] = 0.0f;
            memset(O + (g * rows + r) * D, 0, sizeof(float) * D);
          }
        for (int64_t j0 = 0; j0 < keys; j0 += key_block) {
          const int64_t nb = std::min(key_block, keys - j0), rel = pos0 - j0;  // rel: row 0's position in the block
          pack_kv(a, key_start[u.s] + j0, nb, u.hk, kt, ldk, vt);
          for (int64_t g = 0; g < group; ++g)
            for (int64_t r0 = u.r0; r0 < u.r1; r0 += QB) {
              const int64_t r1 = std::min<int64_t>(r0 + QB, u.r1);
              if (causal && rel + r1 <= 0) continue;  // these rows come before the block's keys
              const int64_t nk = causal ? std::min(nb, rel + r1) : nb, at = g * rows + (r0 - u.r0);
              int64_t qstr;
              const float* qr = query_rows(a, qs, u.hk * group + g, r0, r1, Qb, &qstr);
              scores(a, qr, qstr, kt, ldk, r0, r1, rel, nk, S, ld);
              softmax_block(a, S, ld, r1 - r0, rel + r0, nk, m + at, l + at, alpha);
              weighted(a, T, D, vt, r0, r1, rel, nk, S, ld, &one, 0);
              for (int64_t r = 0; r < r1 - r0; ++r) {
                float* o = O + (at + r) * D;
                const __m512 f = _mm512_set1_ps(alpha[r]);
                for (int64_t d = 0; d < D; d += 16) {
                  const __mmask16 k16 = first_n(D - d);
                  const __m512 t = _mm512_maskz_loadu_ps(k16, T + r * D + d);
                  _mm512_mask_storeu_ps(o + d, k16, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k16, o + d), f, t));
                }
              }
            }
        }
        for (int64_t g = 0; g < group; ++g)
          for (int64_t r = 0; r < rows; ++r)
            put_row(a, out, ob + (u.r0 + r) * os + (u.hk * group + g) * D, O + (g * rows + r) * D,
                    _mm512_set1_ps(1.0f / l[g * rows + r]));
      }
      free(buf);
    }
  }
  return failed;
}

// ------------------------------------------------------------------------------------------------- element-wise
// Each is one pass over its rows, OpenMP over rows, in the order of the torch ops it replaces (the build turns off
// FMA contraction, so that a product and a sum round as torch's separate ops do); row strides in elements, each row's
// elements contiguous. Only the sums inside the norms are taken in another order (lanes, then across them).
// Every tensor of a call is fp32 (bf16 = 0) or every one bf16 (bf16 = 1: a model computing in bf16). In bf16 the
// arithmetic is fp32 and each result that a torch op of the bf16 model rounds to bf16 is rounded here too, to nearest
// even as torch rounds (`rnd`): the kernel returns what the torch ops it replaces return, up to their fp32 math.

// RMSNorm as Qwen2 computes it: out[r] = weight * (s * (1 / sqrt(sum(s^2) / dim + eps))) with s = x[r] + add[r]
// (add may be null: s = x[r]); s is written to sum[r] when sum is not null. out may be x (in place). In bf16: s, the
// normalized row and the product with the weight are each rounded, as the bf16 model's three torch ops round them.
extern "C" int rerankd_rms_norm(const void* x, int64_t x_stride, const void* add, int64_t add_stride, void* sum,
                                int64_t sum_stride, void* out, int64_t out_stride, const void* weight, int64_t rows,
                                int64_t dim, float eps, int bf16, int threads) {
  if (dim <= 0 || threads <= 0) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dim; j += 16) {
      const __mmask16 m = first_n(dim - j);
      __m512 s = load(x, r * x_stride + j, m, bf16);
      if (add) s = rnd(_mm512_add_ps(s, load(add, r * add_stride + j, m, bf16)), bf16);
      if (sum) store(sum, r * sum_stride + j, m, s, bf16);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(s, s));
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps));
    for (int64_t j = 0; j < dim; j += 16) {
      const __mmask16 m = first_n(dim - j);
      __m512 s;
      if (sum) {
        s = load(sum, r * sum_stride + j, m, bf16);
      } else {
        s = load(x, r * x_stride + j, m, bf16);
        if (add) s = rnd(_mm512_add_ps(s, load(add, r * add_stride + j, m, bf16)), bf16);
      }
      const __m512 n = rnd(_mm512_mul_ps(s, inv), bf16);
      store(out, r * out_stride + j, m, _mm512_mul_ps(load(weight, j, m, bf16), n), bf16);
    }
  }
  return 0;
}

// Rotary embedding in place: x[r, h] = x * cos[r] + rotate_half(x) * sin[r] for `heads` heads of head_dim D (even),
// rotate_half(x) = (-x[D/2:], x[:D/2]); heads at x + r * x_stride + h * D; cos, sin [rows, D] at row stride cs_stride.
// In bf16 the two products and their sum are each rounded.
extern "C" int rerankd_rotary(void* x, int64_t x_stride, int64_t rows, int64_t heads, int64_t D, const void* cos,
                              const void* sin, int64_t cs_stride, int bf16, int threads) {
  if (D <= 0 || D % 2 != 0 || threads <= 0) return 1;
  const int64_t half = D / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t cs = r * cs_stride;
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t p = r * x_stride + h * D;
      for (int64_t j = 0; j < half; j += 16) {
        const __mmask16 m = first_n(half - j);
        const __m512 x1 = load(x, p + j, m, bf16), x2 = load(x, p + half + j, m, bf16);
        const __m512 lo = _mm512_sub_ps(rnd(_mm512_mul_ps(x1, load(cos, cs + j, m, bf16)), bf16),
                                        rnd(_mm512_mul_ps(x2, load(sin, cs + j, m, bf16)), bf16));
        const __m512 hi = _mm512_add_ps(rnd(_mm512_mul_ps(x2, load(cos, cs + half + j, m, bf16)), bf16),
                                        rnd(_mm512_mul_ps(x1, load(sin, cs + half + j, m, bf16)), bf16));
        store(x, p + j, m, lo, bf16);
        store(x, p + half + j, m, hi, bf16);
      }
    }
  }
  return 0;
}

// The SiLU-gated product of a gated MLP: out[r] = silu(gate[r]) * up[r], silu(a) = a / (1 + exp(-a)) as torch has it
// (in bf16, rounded before the product). out may be gate or up (in place).
extern "C" int rerankd_silu_mul(const void* gate, int64_t gate_stride, const void* up, int64_t up_stride, void* out,
                                int64_t out_stride, int64_t rows, int64_t dim, int bf16, int threads) {
  if (dim <= 0 || threads <= 0) return 1;
  const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < dim; j += 16) {
      const __mmask16 m = first_n(dim - j);
      const __m512 a = load(gate, r * gate_stride + j, m, bf16);
      const __m512 silu = _mm512_div_ps(a, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), a))));
      store(out, r * out_stride + j, m, _mm512_mul_ps(rnd(silu, bf16), load(up, r * up_stride + j, m, bf16)), bf16);
    }
  }
  return 0;
}

namespace {

// 1 + erf(z) = 2 Phi(z sqrt 2), from erfc(|z|) by Numerical Recipes' Chebyshev fit (relative error below 1.2e-7
// everywhere, the far tail included, where 1 + erf(z) is tiny and erf's absolute error would be all of it)
inline __m512 one_plus_erf512(__m512 z) {
  const __m512 a = _mm512_abs_ps(z), one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(one, _mm512_add_ps(one, _mm512_mul_ps(_mm512_set1_ps(0.5f), a)));
  static const float c[] = {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f,
                            -0.18628806f, 0.09678418f, 0.37409196f, 1.00002368f, -1.26551223f};
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < 10; ++i) p = _mm512_add_ps(_mm512_mul_ps(p, t), _mm512_set1_ps(c[i]));
  const __m512 erfc = _mm512_mul_ps(t, exp512(_mm512_sub_ps(p, _mm512_mul_ps(a, a))));
  const __mmask16 negative = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(2.0f), erfc), erfc);
}

}  // namespace

// The bias and GELU of an MLP's first product, in place: x[r] = gelu(x[r] + bias); bias may be null (already
// added). quick 0: gelu(a) = a * 0.5 * (1 + erf(a / sqrt(2))) as torch has it (approximate="none"); quick 1: Qwen2-VL's
// quick_gelu, a * sigmoid(1.702 * a) with sigmoid(t) = 1 / (1 + exp(-t)). In bf16 the sum with the bias, GELU's
// result, and quick GELU's 1.702 * a, sigmoid and product are each rounded, as the bf16 model's torch ops round them.
extern "C" int rerankd_bias_gelu(void* x, int64_t x_stride, const void* bias, int64_t rows, int64_t dim, int quick,
                                 int bf16, int threads) {
  if (dim <= 0 || threads <= 0) return 1;
  const __m512 half = _mm512_set1_ps(0.5f), alpha = _mm512_set1_ps(0.70710678118654752f);
  const __m512 one = _mm512_set1_ps(1.0f), k = _mm512_set1_ps(1.702f);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < dim; j += 16) {
      const __mmask16 m = first_n(dim - j);
      __m512 a = load(x, r * x_stride + j, m, bf16);
      if (bias) a = rnd(_mm512_add_ps(a, load(bias, j, m, bf16)), bf16);
      __m512 g;
      if (quick) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), rnd(_mm512_mul_ps(k, a), bf16)));
        g = _mm512_mul_ps(a, rnd(_mm512_div_ps(one, _mm512_add_ps(one, e)), bf16));
      } else {
        g = _mm512_mul_ps(_mm512_mul_ps(a, half), one_plus_erf512(_mm512_mul_ps(a, alpha)));
      }
      store(x, r * x_stride + j, m, g, bf16);
    }
  }
  return 0;
}

// LayerNorm of a residual sum: out[r] = LayerNorm(s) * gamma + beta with s = residual[r] + (x[r] + bias), statistics
// over the row in two passes (mean, then the mean square of the deviations); bias and residual may be null. s is
// written to sum[r] when sum is not null (a pre-norm block's residual stream). out may be x. In bf16 each of the two
// sums is rounded, and the norm's result once, as torch's bf16 LayerNorm computes in fp32 and rounds at the end.
extern "C" int rerankd_layer_norm(const void* x, int64_t x_stride, const void* bias, const void* residual,
                                  int64_t residual_stride, const void* gamma, const void* beta, void* sum,
                                  int64_t sum_stride, void* out, int64_t out_stride, int64_t rows, int64_t dim,
                                  float eps, int bf16, int threads) {
  if (dim <= 0 || threads <= 0) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t o = r * out_stride;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dim; j += 16) {  // the sum, kept in out (exactly: in bf16 it is rounded already)
      const __mmask16 m = first_n(dim - j);
      __m512 s = load(x, r * x_stride + j, m, bf16);
      if (bias) s = rnd(_mm512_add_ps(s, load(bias, j, m, bf16)), bf16);
      if (residual) s = rnd(_mm512_add_ps(load(residual, r * residual_stride + j, m, bf16), s), bf16);
      store(out, o + j, m, s, bf16);
      if (sum) store(sum, r * sum_stride + j, m, s, bf16);
      acc = _mm512_add_ps(acc, s);
    }
    const float mean = _mm512_reduce_add_ps(acc) / (float)dim;
    const __m512 mv = _mm512_set1_ps(mean);
    acc = _mm512_setzero_ps();
    for (int64_t j = 0; j < dim; j += 16) {
      const __mmask16 m = first_n(dim - j);
      const __m512 d = _mm512_maskz_sub_ps(m, load(out, o + j, m, bf16), mv);
      acc = _mm512_add_ps(acc, _mm512_mul_ps(d, d));
    }
    const float rstd = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)dim + eps);
    const __m512 scale = _mm512_set1_ps(rstd), shift = _mm512_set1_ps(-mean * rstd);
    for (int64_t j = 0; j < dim; j += 16) {
      const __mmask16 m = first_n(dim - j);
      const __m512 n = _mm512_add_ps(_mm512_mul_ps(load(out, o + j, m, bf16), scale), shift);
      store(out, o + j, m, _mm512_add_ps(_mm512_mul_ps(n, load(gamma, j, m, bf16)), load(beta, j, m, bf16)), bf16);
    }
  }
  return 0;
}
