// Attention for the running tokens of a batch of sequences (per-token exits, Universal-
// Transformer halting: blocks/sequence.py `QueryGrid.attend`), every token a key and a value,
// without a padded query grid. Built with kernels.cpp into one module (runtime/kernels.py).
//
//   query_rows(active) -> (rows, pos, offsets, width): the running tokens of `active` [b, L]
//       (bool): their flat positions (sample x L + position, in order), their positions, each
//       sample's first row among them [b + 1], and the most any sample runs
//   rows_attention(q, kv, pos, offsets, heads, block, causal) -> [N, D]: softmax(q k^T / sqrt
//       d_head) v per head for the running tokens' queries q [N, D] (rows grouped by sample, in
//       order) over their sample's keys and values kv [b, L, 2D] (keys, then values)
//   blas() -> whether the BLAS that rows_attention calls is there
//
// Why not SDPA on a padded grid: a grid [b, width] pads every sample to the one that runs the
// most, and under a causal mask SDPA computes every (query, key) pair of the grid, though a
// query at position i reads keys 0..i: at L = 256 that was 11-16% more MACs than the layer's
// ideal and its attention the slowest part. Here each sample's queries go in blocks of
// `block` rows, a block reads the keys up to its last query's position (two GEMMs per head),
// and each row's softmax covers its own keys only: the waste is what a block reads past its
// earlier rows' positions (~1-3% of the layer's MACs at block 16), and no query is padded.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

// The Fortran BLAS in torch's own library (MKL or OpenBLAS export these): weak, so that a
// torch without them still loads the kernels, and `blas()` says so.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

// GCC builds one copy per instruction set and picks at load (plain x86-64 elsewhere).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DG_CLONES
#endif

namespace {

constexpr int kLanes = 16;  // independent partial sums and maxima: they vectorize, one does not

// C = alpha op(A) op(B) (+ beta C), column-major (BLAS), as at::native::cpublas::gemm.
void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc) {
  const int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  const float beta = 0.f;
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc) {
  const int M = m, N = n, K = k, LA = lda, LB = ldb, LC = ldc;
  const double beta = 0.0;
  dgemm_(&ta, &tb, &M, &N, &K, &alpha, a, &LA, b, &LB, &beta, c, &LC);
}

DG_CLONES float row_max(const float* x, int64_t n) {
  float acc[kLanes];
  std::fill(acc, acc + kLanes, -std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) acc[u] = x[j + u] > acc[u] ? x[j + u] : acc[u];
  float m = -std::numeric_limits<float>::infinity();
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  for (int u = 0; u < kLanes; ++u) m = acc[u] > m ? acc[u] : m;
  return m;
}

// exp(x - m) of each entry, in place, by range reduction and Cephes' polynomial for expf
// (relative error ~2e-7), written so that GCC vectorizes it; returns their sum. A NaN stays NaN.
DG_CLONES float exp_sum(float* x, int64_t n, float m) {
  for (int64_t j = 0; j < n; ++j) {  // (a loop of its own: GCC vectorizes the clamp only alone)
    const float v = x[j] - m;
    x[j] = v < -87.f ? -87.f : v;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    const float f = (v * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(v / ln 2)
    const float r = v - f * 0.693359375f + f * 2.12194440e-4f;             // v - f ln 2
    float p = 1.9875691500E-4f;
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    p = p * (r * r) + r + 1.0f;
    const int bits = ((int)f + 127) << 23;  // 2^f
    x[j] = p * __builtin_bit_cast(float, bits);
  }
  float acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) acc[u] += x[j + u];
  float s = 0.f;
  for (; j < n; ++j) s += x[j];
  for (int u = 0; u < kLanes; ++u) s += acc[u];
  return s;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

double exp_sum(double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - m));
  return s;
}

// Rows r0..r0+m of one sample, one head: scores S [m, P] = q k^T * scale over its first P keys
// (row-major, in `s`), each row's softmax over its own keys (the rest zeroed), out = S v.
template <typename T>
void attend_block(const T* q, int64_t ldq, const T* k, const T* v, int64_t ldkv, T* out,
                  int64_t ldo, const int64_t* pos, int64_t m, int64_t P, int64_t dh, T scale,
                  bool causal, T* s) {
  gemm('T', 'N', P, m, dh, scale, k, ldkv, q, ldq, s, P);  // S^T = K^T' q^T (column-major)
  for (int64_t r = 0; r < m; ++r) {
    T* row = s + r * P;
    const int64_t reads = causal ? pos[r] + 1 : P;
    const T inv = T(1) / exp_sum(row, reads, row_max(row, reads));
    for (int64_t j = 0; j < reads; ++j) row[j] *= inv;
    std::fill(row + reads, row + P, T(0));
  }
  gemm('N', 'N', dh, m, P, T(1), v, ldkv, s, P, out, ldo);  // out^T = V^T S^T
}

template <typename T>
void rows_attention_impl(const at::Tensor& q, const at::Tensor& kv, const int64_t* pos,
                         const int64_t* off, int64_t heads, int64_t block, bool causal,
                         at::Tensor& out) {
  const int64_t D = q.size(1), b = kv.size(0), L = kv.size(1), dh = D / heads;
  const T* qp = q.data_ptr<T>();
  const T* kvp = kv.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const T scale = T(1) / std::sqrt(T(dh));
  // samples split over torch's intra-op threads (as SDPA splits its grid; one thread: a loop)
  at::parallel_for(0, b, 1, [&](int64_t first, int64_t last) {
    std::vector<T> s(block * L);  // each thread's scores
    for (int64_t i = first; i < last; ++i) {
      const T* keys = kvp + i * L * 2 * D;
      for (int64_t r0 = off[i]; r0 < off[i + 1]; r0 += block) {
        const int64_t m = std::min(block, off[i + 1] - r0);
        const int64_t P = causal ? pos[r0 + m - 1] + 1 : L;  // the keys its last query reads
        for (int64_t h = 0; h < heads; ++h)
          attend_block<T>(qp + r0 * D + h * dh, D, keys + h * dh, keys + D + h * dh, 2 * D,
                          op + r0 * D + h * dh, D, pos + r0, m, P, dh, scale, causal, s.data());
      }
    }
  });
}

}  // namespace

bool blas() { return sgemm_ != nullptr && dgemm_ != nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> query_rows(const at::Tensor& active_in) {
  TORCH_CHECK(active_in.dim() == 2 && active_in.scalar_type() == at::kBool,
              "dyngraph::query_rows: a bool tensor [b, L]");
  const at::Tensor active = active_in.contiguous();
  const int64_t b = active.size(0), n = active.size(1);
  const bool* a = active.data_ptr<bool>();
  auto offsets = at::empty({b + 1}, active.options().dtype(at::kLong));
  int64_t* o = offsets.data_ptr<int64_t>();
  int64_t width = 0;
  o[0] = 0;
  for (int64_t i = 0; i < b; ++i) {
    int64_t c = 0;
    for (int64_t j = 0; j < n; ++j) c += a[i * n + j];
    o[i + 1] = o[i] + c;
    width = std::max(width, c);
  }
  auto rows = at::empty({o[b]}, offsets.options());
  auto pos = at::empty({o[b]}, offsets.options());
  int64_t* r = rows.data_ptr<int64_t>();
  int64_t* p = pos.data_ptr<int64_t>();
  for (int64_t i = 0, k = 0; i < b; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (a[i * n + j]) r[k] = i * n + j, p[k++] = j;
  return {rows, pos, offsets, width};
}

at::Tensor rows_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& pos,
                          const at::Tensor& offsets, int64_t heads, int64_t block, bool causal) {
  TORCH_CHECK(blas(), "dyngraph::rows_attention: no BLAS in this torch");
  TORCH_CHECK(q.dim() == 2 && kv.dim() == 3 && q.is_contiguous() && kv.is_contiguous(),
              "dyngraph::rows_attention: contiguous q [N, D] and kv [b, L, 2D]");
  const int64_t N = q.size(0), D = q.size(1), b = kv.size(0);
  TORCH_CHECK(kv.size(2) == 2 * D && heads > 0 && D % heads == 0 && block > 0,
              "dyngraph::rows_attention: kv [b, L, 2D] with D divisible by heads");
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              "dyngraph::rows_attention: float32 or float64 q and kv");
  TORCH_CHECK(pos.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
                  pos.numel() == N && offsets.numel() == b + 1,
              "dyngraph::rows_attention: int64 pos [N] and offsets [b + 1]");
  const at::Tensor p = pos.contiguous(), o = offsets.contiguous();
  const int64_t* pp = p.data_ptr<int64_t>();
  const int64_t* op = o.data_ptr<int64_t>();
  TORCH_CHECK(op[0] == 0 && op[b] == N, "dyngraph::rows_attention: offsets from 0 to N");
  for (int64_t i = 0; i < b; ++i) {  // (cheap, and a wrong position would read past kv)
    TORCH_CHECK(op[i] <= op[i + 1], "dyngraph::rows_attention: offsets must not decrease");
    for (int64_t r = op[i]; r < op[i + 1]; ++r)
      TORCH_CHECK(pp[r] >= 0 && pp[r] < kv.size(1) && (r == op[i] || pp[r] > pp[r - 1]),
                  "dyngraph::rows_attention: positions in [0, L), increasing per sample");
  }
  auto out = at::empty({N, D}, q.options());
  if (q.scalar_type() == at::kDouble)
    rows_attention_impl<double>(q, kv, pp, op, heads, block, causal, out);
  else
    rows_attention_impl<float>(q, kv, pp, op, heads, block, causal, out);
  return out;
}
