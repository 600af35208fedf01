// dyngraph's fused decision kernels (CPU): what a decision point of the infer runtime does
// between two units, in one call instead of 5 to 10 ATen ops from Python. On this kind of CPU
// each ATen op costs 2-5 us of dispatch and allocation whatever its size, which at batch 64 or 1
// is as much as the unit it decides about (docs/performance.md). Built on first use by
// dyngraph/runtime/kernels.py; without them the runtime runs the same rules as ATen ops.
//
//   rows_where(t, rule, threshold, a) -> int64 positions of the rows that meet `rule`
//   confidence(logits, kind, temperature) -> [B] the score an exit criterion thresholds
//   gather_rows(tensors, rows) -> each tensor's rows at `rows` (index_select, all in one call)
//   copy_rows_(dst, dst_rows, src, src_rows) -> dst[dst_rows] = src[src_rows] (index_copy_)
//   choose(t, rule, edges, a) -> (choice per row, rows grouped by choice, count per choice)
//   query_grid(active) -> (rows, slots, mask, width): the running tokens' query grid
//   token_exit(t, rule, threshold, a, flat, active, exit_at, out, z, where) -> (go, active,
//       exit_at, alive): a per-token exit's decision, its outputs and its bookkeeping
//   top_tokens(p, k) -> (idx, route, flat, w): Mixture-of-Depths routing by capacity
//   id_range(ids) -> (smallest, largest); pad_lengths(ids, pad) -> (lengths, well formed, whole):
//       the checks of a batch of token ids (runtime/model.py, runtime/lengths.py)
//   query_rows, rows_attention, blas: the running tokens' attention (attention.cpp)
//
// The scores are computed by the same inline functions in both ops, so a threshold chosen on
// `confidence` (calibration) splits the samples exactly as `rows_where` does.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the casters of at::Tensor and the STL

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

// attention.cpp
bool blas();
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> query_rows(const at::Tensor& active);
at::Tensor rows_attention(const at::Tensor& q, const at::Tensor& kv, const at::Tensor& pos,
                          const at::Tensor& offsets, int64_t heads, int64_t block, bool causal);

namespace {

enum Choice : int64_t {
  kArgmax = 0,  // metalayer: the controller's top choice (the first one on ties, as argmax)
  kDrawBucket = 1,  // forced: the bucket of the sample's draw among the edges (bucketize right)
};

enum Rule : int64_t {
  kMaxProbBelow = 0,  // exit max_prob: stays while the top probability < threshold
  kEntropyAbove = 1,  // exit entropy: stays while the entropy > threshold
  kDrawAtLeast = 2,   // forced: the sample's pseudo-uniform draw >= threshold
  kDrawBelow = 3,     // forced: the draw < threshold
  kAtLeast = 4,       // gate: the probability in column `a` of the row >= threshold
  kTrue = 5,          // token_exit: a bool per row, decided before (a criterion's own rule)
  kNever = 6,         // token_exit: no row stays (the last exit)
};

// sum(exp(z - max z)) with z = logits / temperature (the softmax's denominator); sets `m`.
template <typename T>
inline T exp_sum(const T* r, int64_t c, T temperature, T& m) {
  m = r[0] / temperature;
  for (int64_t j = 1; j < c; ++j) m = std::max(m, r[j] / temperature);
  T s = 0;
  for (int64_t j = 0; j < c; ++j) s += std::exp(r[j] / temperature - m);
  return s;
}

// The softmax's top probability: 1 / sum(exp(z - max z)).
template <typename T>
inline T max_prob(const T* r, int64_t c, T temperature) {
  T m;
  return T(1) / exp_sum(r, c, temperature, m);
}

// The softmax's entropy in nats (probabilities clamped at 1e-12 inside the log).
template <typename T>
inline T entropy(const T* r, int64_t c, T temperature) {
  T m;
  const T s = exp_sum(r, c, temperature, m);
  T h = 0;
  for (int64_t j = 0; j < c; ++j) {
    T p = std::exp(r[j] / temperature - m) / s;
    h -= p * std::log(std::max(p, T(1e-12)));
  }
  return h;
}

// dyngraph.runtime.context.pseudo_uniform, bit for bit: frac(|first value| * scale).
template <typename T>
inline T draw(T v, T scale) {
  T a = std::abs(v) * scale;
  return a - std::trunc(a);
}

template <typename T>
inline bool meets(const T* r, int64_t width, int64_t rule, T thr, T arg, int64_t col) {
  switch (rule) {
    case kMaxProbBelow: return max_prob(r, width, arg) < thr;
    case kEntropyAbove: return entropy(r, width, arg) > thr;
    case kDrawAtLeast: return draw(r[0], arg) >= thr;
    case kDrawBelow: return draw(r[0], arg) < thr;
    case kAtLeast: return r[col] >= thr;
    default: TORCH_CHECK(false, "dyngraph: unknown rule ", rule);
  }
  return false;
}

template <typename T>
at::Tensor rows_where_impl(const at::Tensor& t, int64_t rule, double threshold, double a) {
  const int64_t b = t.size(0);
  const int64_t width = b ? t.numel() / b : 0;
  const T* p = t.data_ptr<T>();
  const T thr = static_cast<T>(threshold), arg = static_cast<T>(a);
  const int64_t col = rule == kAtLeast ? static_cast<int64_t>(a) : 0;
  auto out = at::empty({b}, t.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < b; ++i)
    if (meets(p + i * width, width, rule, thr, arg, col)) o[n++] = i;
  return out.resize_({n});
}

at::Tensor rows_where(const at::Tensor& t, int64_t rule, double threshold, double a) {
  TORCH_CHECK(t.dim() >= 1 && t.is_contiguous(), "dyngraph::rows_where: a contiguous tensor");
  TORCH_CHECK(rule != kAtLeast || (a >= 0 && a * t.size(0) < t.numel()),
              "dyngraph::rows_where: column ", a, " out of range");
  TORCH_CHECK(rule > kEntropyAbove || (t.dim() == 2 && t.size(1) > 0),
              "dyngraph::rows_where: logits [B, C]");
  if (t.scalar_type() == at::kDouble) return rows_where_impl<double>(t, rule, threshold, a);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dyngraph::rows_where: float32 or float64");
  return rows_where_impl<float>(t, rule, threshold, a);
}

template <typename T>
at::Tensor confidence_impl(const at::Tensor& z, int64_t kind, double temperature) {
  const int64_t b = z.size(0), c = z.size(1);
  const T* p = z.data_ptr<T>();
  const T temp = static_cast<T>(temperature);
  auto out = at::empty({b}, z.options());
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < b; ++i)
    o[i] = kind == kMaxProbBelow ? max_prob(p + i * c, c, temp) : entropy(p + i * c, c, temp);
  return out;
}

at::Tensor confidence(const at::Tensor& logits, int64_t kind, double temperature) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.is_contiguous(),
              "dyngraph::confidence: contiguous logits [B, C]");
  TORCH_CHECK(kind == kMaxProbBelow || kind == kEntropyAbove, "dyngraph::confidence: kind 0 or 1");
  if (logits.scalar_type() == at::kDouble) return confidence_impl<double>(logits, kind, temperature);
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "dyngraph::confidence: float32 or float64");
  return confidence_impl<float>(logits, kind, temperature);
}

std::vector<at::Tensor> gather_rows(const std::vector<at::Tensor>& tensors, const at::Tensor& rows) {
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous(),
              "dyngraph::gather_rows: rows are int64 positions");
  const int64_t n = rows.size(0);
  const int64_t* r = rows.data_ptr<int64_t>();
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    TORCH_CHECK(t.dim() >= 1, "dyngraph::gather_rows: tensors with a batch dimension");
    const int64_t b = t.size(0);
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < b, "dyngraph::gather_rows: row ", r[i], " out of ", b);
    if (!t.is_contiguous()) {
      out.push_back(t.index_select(0, rows));
      continue;
    }
    auto sizes = t.sizes().vec();
    sizes[0] = n;
    at::Tensor g = at::empty(sizes, t.options());
    const int64_t bytes = b ? t.nbytes() / b : 0;
    const char* src = static_cast<const char*>(t.data_ptr());
    char* dst = static_cast<char*>(g.data_ptr());
    for (int64_t i = 0; i < n; ++i) std::memcpy(dst + i * bytes, src + r[i] * bytes, bytes);
    out.push_back(std::move(g));
  }
  return out;
}

// A 1-d int64 row index of `n` positions into a tensor of `b` rows (or none: 0 .. n - 1).
const int64_t* row_index(const std::optional<at::Tensor>& rows, int64_t b, const char* what) {
  if (!rows.has_value()) return nullptr;
  const at::Tensor& r = *rows;
  TORCH_CHECK(r.dim() == 1 && r.scalar_type() == at::kLong && r.is_contiguous(),
              "dyngraph: ", what, " are int64 positions");
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < r.size(0); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < b, "dyngraph: ", what, " ", p[i], " out of ", b);
  return p;
}

// ATen's index_copy_ walks the elements (8 us for 35 rows of 512 floats); whole rows are
// contiguous in both tensors here, so each is one memcpy (any dtype: rows are bytes).
void copy_rows_(const at::Tensor& dst, const std::optional<at::Tensor>& dst_rows,
                const at::Tensor& src, const std::optional<at::Tensor>& src_rows) {
  TORCH_CHECK(dst.dim() >= 1 && dst.is_contiguous() && src.is_contiguous() &&
                  dst.scalar_type() == src.scalar_type() && dst.dim() == src.dim() &&
                  dst.sizes().slice(1) == src.sizes().slice(1),
              "dyngraph::copy_rows_: contiguous tensors of one dtype and row shape");
  const int64_t n = dst_rows ? dst_rows->size(0) : src_rows ? src_rows->size(0) : src.size(0);
  TORCH_CHECK((!dst_rows || dst_rows->size(0) == n) && (!src_rows || src_rows->size(0) == n) &&
                  (dst_rows || dst.size(0) == n) && (src_rows || src.size(0) == n),
              "dyngraph::copy_rows_: as many rows to write as to read");
  const int64_t* d = row_index(dst_rows, dst.size(0), "dst_rows");
  const int64_t* s = row_index(src_rows, src.size(0), "src_rows");
  const int64_t bytes = dst.size(0) ? dst.nbytes() / dst.size(0) : 0;
  char* out = static_cast<char*>(dst.data_ptr());
  const char* in = static_cast<const char*>(src.data_ptr());
  for (int64_t i = 0; i < n; ++i)
    std::memcpy(out + (d ? d[i] : i) * bytes, in + (s ? s[i] : i) * bytes, bytes);
}

template <typename T>
void choose_impl(const at::Tensor& t, int64_t rule, const at::Tensor& edges, double a,
                 int64_t* c) {
  const int64_t b = t.size(0);
  const int64_t width = b ? t.numel() / b : 0;
  const T* p = t.data_ptr<T>();
  const T* e = edges.data_ptr<T>();
  const int64_t ne = edges.numel();
  const T scale = static_cast<T>(a);
  for (int64_t i = 0; i < b; ++i) {
    const T* r = p + i * width;
    int64_t j = 0;
    if (rule == kArgmax) {
      for (int64_t k = 1; k < width; ++k)
        if (r[k] > r[j] || (std::isnan(r[k]) && !std::isnan(r[j]))) j = k;
    } else {
      const T u = draw(r[0], scale);
      while (j < ne && e[j] <= u) ++j;
    }
    c[i] = j;
  }
}

std::tuple<at::Tensor, at::Tensor, std::vector<int64_t>> choose(const at::Tensor& t, int64_t rule,
                                                                const at::Tensor& edges,
                                                                double a) {
  TORCH_CHECK(t.dim() >= 1 && t.is_contiguous(), "dyngraph::choose: a contiguous tensor");
  TORCH_CHECK(rule == kArgmax || rule == kDrawBucket, "dyngraph::choose: unknown rule ", rule);
  TORCH_CHECK(rule != kArgmax || (t.dim() == 2 && t.size(1) > 0), "dyngraph::choose: scores [B, K]");
  TORCH_CHECK(edges.dim() == 1 && edges.is_contiguous() && edges.scalar_type() == t.scalar_type(),
              "dyngraph::choose: edges, 1-d, of the tensor's dtype");
  const int64_t b = t.size(0);
  const int64_t k = rule == kArgmax ? t.size(1) : edges.numel() + 1;
  auto c = at::empty({b}, t.options().dtype(at::kLong));
  int64_t* cp = c.data_ptr<int64_t>();
  if (t.scalar_type() == at::kDouble) {
    choose_impl<double>(t, rule, edges, a, cp);
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "dyngraph::choose: float32 or float64");
    choose_impl<float>(t, rule, edges, a, cp);
  }
  std::vector<int64_t> counts(k, 0), start(k, 0);
  for (int64_t i = 0; i < b; ++i) ++counts[cp[i]];
  for (int64_t j = 1; j < k; ++j) start[j] = start[j - 1] + counts[j - 1];
  auto order = at::empty({b}, c.options());
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) o[start[cp[i]]++] = i;  // stable: rows in order per choice
  return {c, order, counts};
}

// The query grid of the running tokens `active` [b, L] (bool), as blocks/sequence.py's
// `query_grid` builds it in ~15 ATen ops: their flat positions `rows` (sample x L + position,
// in order), their `slots` in a [b, width] grid (width: the most any sample runs), and the
// additive causal mask [b, 1, width, L] (float32) by original position: 0 where a query reads
// a key (key <= its position), -inf elsewhere; a padded query reads position 0.
std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t> query_grid(const at::Tensor& active_in) {
  auto [rows, pos, offsets, width] = query_rows(active_in);  // (attention.cpp; checks `active`)
  const int64_t b = offsets.numel() - 1, n = active_in.size(1);
  auto slots = at::empty_like(rows);
  auto mask = at::empty({b, 1, width, n}, active_in.options().dtype(at::kFloat));
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* o = offsets.data_ptr<int64_t>();
  int64_t* s = slots.data_ptr<int64_t>();
  float* m = mask.data_ptr<float>();
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < b; ++i) {
    int64_t q = 0;
    for (int64_t k = o[i]; k < o[i + 1]; ++k, ++q) {
      s[k] = i * width + q;
      float* row = m + (i * width + q) * n;  // (two fills: they vectorize, a test does not)
      std::fill(row, row + p[k] + 1, 0.0f);
      std::fill(row + p[k] + 1, row + n, -inf);
    }
    for (; q < width; ++q) {  // padding: reads position 0 only
      float* row = m + (i * width + q) * n;
      row[0] = 0.0f;
      std::fill(row + 1, row + n, -inf);
    }
  }
  return {rows, slots, mask, width};
}

// The running tokens (rows of `t`, at flat positions `flat` of a [b, L] batch; none: every
// token, in order) that do not meet `rule` (the rows that stay, as rows_where; kTrue: `t` is
// bool; kNever: none stays) leave at exit `where`: each one's row of `z` is written to `out`
// [b·L, ...] at its flat position, and copies of `active` / `exit_at` [b, L] mark it (the old
// tensors are left as they were: the trace's log holds them; returned as they are when nobody
// leaves).
// Returns (go: positions among the running tokens of those leaving, active, exit_at, alive:
// the samples that keep a running token). constructs/token_exit.py's decide, in one call.
template <typename T>
void leaving(const at::Tensor& t, int64_t rule, double threshold, double a, int64_t n,
             std::vector<int64_t>& go) {
  const int64_t width = n ? t.numel() / n : 0;
  const T* p = t.data_ptr<T>();
  const T thr = static_cast<T>(threshold), arg = static_cast<T>(a);
  const int64_t col = rule == kAtLeast ? static_cast<int64_t>(a) : 0;
  for (int64_t i = 0; i < n; ++i)
    if (!meets(p + i * width, width, rule, thr, arg, col)) go.push_back(i);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_exit(
    const at::Tensor& t, int64_t rule, double threshold, double a,
    const std::optional<at::Tensor>& flat, const at::Tensor& active, const at::Tensor& exit_at,
    const at::Tensor& out, const at::Tensor& z, int64_t where) {
  TORCH_CHECK(active.dim() == 2 && active.scalar_type() == at::kBool && active.is_contiguous() &&
                  exit_at.sizes() == active.sizes() && exit_at.scalar_type() == at::kLong &&
                  exit_at.is_contiguous(),
              "dyngraph::token_exit: active (bool) and exit_at (int64), contiguous [b, L]");
  const int64_t b = active.size(0), len = active.size(1), n = t.dim() ? t.size(0) : 0;
  TORCH_CHECK(t.dim() >= 1 && t.is_contiguous() && z.is_contiguous() && z.size(0) == n &&
                  out.is_contiguous() && out.dim() == z.dim() && out.size(0) == b * len &&
                  out.scalar_type() == z.scalar_type() && out.sizes().slice(1) == z.sizes().slice(1),
              "dyngraph::token_exit: contiguous t [N, ...], z [N, ...] and out [b*L, ...]");
  const int64_t* f = flat ? row_index(flat, b * len, "flat") : nullptr;
  TORCH_CHECK(flat ? flat->size(0) == n : n == b * len, "dyngraph::token_exit: one row per token");
  std::vector<int64_t> go;
  if (rule == kNever) {
    for (int64_t i = 0; i < n; ++i) go.push_back(i);
  } else if (rule == kTrue) {
    TORCH_CHECK(t.scalar_type() == at::kBool, "dyngraph::token_exit: kTrue reads a bool tensor");
    const bool* s = t.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i)
      if (!s[i]) go.push_back(i);
  } else if (t.scalar_type() == at::kDouble) {
    leaving<double>(t, rule, threshold, a, n, go);
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "dyngraph::token_exit: float32 or float64");
    leaving<float>(t, rule, threshold, a, n, go);
  }
  const int64_t g = static_cast<int64_t>(go.size());
  auto positions = at::empty({g}, exit_at.options());
  std::memcpy(positions.data_ptr<int64_t>(), go.data(), g * sizeof(int64_t));
  at::Tensor act = g ? active.clone() : active, at = g ? exit_at.clone() : exit_at;
  bool* ap = act.data_ptr<bool>();
  int64_t* ep = at.data_ptr<int64_t>();
  const int64_t bytes = z.size(0) ? z.nbytes() / z.size(0) : 0;
  char* o = static_cast<char*>(out.data_ptr());
  const char* zp = static_cast<const char*>(z.data_ptr());
  for (int64_t i : go) {
    const int64_t pos = f ? f[i] : i;
    ap[pos] = false;
    ep[pos] = where;
    std::memcpy(o + pos * bytes, zp + i * bytes, bytes);
  }
  auto alive = at::empty({b}, exit_at.options());
  int64_t* al = alive.data_ptr<int64_t>();
  int64_t k = 0;
  for (int64_t i = 0; i < b; ++i)
    if (std::find(ap + i * len, ap + (i + 1) * len, true) != ap + (i + 1) * len) al[k++] = i;
  return {positions, act, at, alive.resize_({k})};
}

// The smallest and the largest of token ids (int64): the model's range check, one pass.
std::tuple<int64_t, int64_t> id_range(const at::Tensor& ids) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.is_contiguous() && ids.numel(),
              "dyngraph::id_range: contiguous int64 ids");
  const int64_t* p = ids.data_ptr<int64_t>();
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < ids.numel(); ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  return {lo, hi};
}

// Each sequence's length before its trailing `pad` ids, whether every sequence is well formed
// (no pad before a token, not all padding) and whether every one is whole (no padding):
// runtime/lengths.py's lengths_of, one pass.
std::tuple<at::Tensor, bool, bool> pad_lengths(const at::Tensor& ids, int64_t pad) {
  TORCH_CHECK(ids.dim() == 2 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "dyngraph::pad_lengths: contiguous int64 ids [B, L]");
  const int64_t b = ids.size(0), len = ids.size(1);
  const int64_t* p = ids.data_ptr<int64_t>();
  auto lengths = at::empty({b}, ids.options());
  int64_t* out = lengths.data_ptr<int64_t>();
  bool ok = true, whole = true;
  for (int64_t i = 0; i < b; ++i) {
    const int64_t* r = p + i * len;
    int64_t n = 0;
    while (n < len && r[n] != pad) ++n;
    for (int64_t j = n; j < len; ++j) ok &= r[j] == pad;
    ok &= n > 0;
    whole &= n == len;
    out[i] = n;
  }
  return {lengths, ok, whole};
}

// A float's place in a total order of keys, ascending with the value: NaN above every
// number, -0 equal to +0 (the order of a stable descending sort, token_gate.top_positions).
inline uint32_t order_key(float v) {
  if (std::isnan(v)) return 0xFFFFFFFFu;
  v += 0.0f;  // (-0 -> +0)
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline uint64_t order_key(double v) {
  if (std::isnan(v)) return ~uint64_t(0);
  v += 0.0;
  uint64_t u;
  std::memcpy(&u, &v, 8);
  return (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
}

// Mixture-of-Depths routing by capacity (constructs/token_gate.py), in one call: each
// sequence's top `k` tokens by router probability `p` [b, L], in their original order [b, k];
// the route mask [b, L]; their flat rows [b·k] (sample x L + position); their weights [b·k, 1].
// The order is token_gate.top_positions' (a stable descending sort): the higher probability
// first, NaN above all, ties to the earlier position. Each row's selection is one
// nth_element over packed (key, position) integers: no ATen op, whose dispatch on a cache
// that the layers before have evicted cost 60-75 us a call in the pass (at::topk, at::sort).
template <typename T>
void route_rows(const T* pp, int64_t b, int64_t len, int64_t k, int64_t* ip, bool* route,
                int64_t* flat, T* w) {
  using Key = unsigned __int128;  // (order key << 32) | (2^32 - 1 - position)
  std::vector<Key> keys(len);
  const auto position = [](Key key) { return int64_t(0xFFFFFFFFu - uint32_t(key)); };
  for (int64_t i = 0; i < b; ++i) {
    const T* r = pp + i * len;
    for (int64_t j = 0; j < len; ++j)
      keys[j] = (Key(order_key(r[j])) << 32) | Key(0xFFFFFFFFu - uint32_t(j));
    if (k < len)
      std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.end(), std::greater<Key>());
    int64_t* out = ip + i * k;
    for (int64_t j = 0; j < k; ++j) out[j] = position(keys[j]);
    std::sort(out, out + k);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t row = i * len + out[j];
      route[row] = true;
      flat[i * k + j] = row;
      w[i * k + j] = r[out[j]];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> top_tokens(const at::Tensor& p,
                                                                      int64_t k) {
  TORCH_CHECK(p.dim() == 2 && p.is_contiguous() && k >= 1 && k <= p.size(1) &&
                  p.size(1) <= 0xFFFFFFFFll,
              "dyngraph::top_tokens: contiguous probabilities [b, L] and 1 <= k <= L");
  const int64_t b = p.size(0), len = p.size(1);
  auto idx = at::empty({b, k}, p.options().dtype(at::kLong));
  auto route = at::zeros(p.sizes(), p.options().dtype(at::kBool));
  auto flat = at::empty({b * k}, idx.options());
  auto w = at::empty({b * k, 1}, p.options());
  int64_t* ip = idx.data_ptr<int64_t>();
  bool* r = route.data_ptr<bool>();
  int64_t* f = flat.data_ptr<int64_t>();
  if (p.scalar_type() == at::kDouble) {
    route_rows<double>(p.data_ptr<double>(), b, len, k, ip, r, f, w.data_ptr<double>());
  } else {
    TORCH_CHECK(p.scalar_type() == at::kFloat, "dyngraph::top_tokens: float32 or float64");
    route_rows<float>(p.data_ptr<float>(), b, len, k, ip, r, f, w.data_ptr<float>());
  }
  return {idx, route, flat, w};
}

}  // namespace

// A Python module of plain functions (pybind11), not torch.ops: a call through torch.ops
// parses its arguments against the schema and costs 2-4 us here; through pybind11, 1 us. They
// are called from the infer runtime only, outside autograd and torch.compile.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rows_where", &rows_where, "positions of the rows that meet a rule");
  m.def("confidence", &confidence, "the score an exit criterion thresholds");
  m.def("gather_rows", &gather_rows, "each tensor's rows at `rows`");
  m.def("choose", &choose, "choice per row, rows grouped by choice, count per choice");
  m.def("copy_rows_", &copy_rows_, "dst[dst_rows] = src[src_rows], in place");
  m.def("query_grid", &query_grid, "the running tokens' query grid");
  m.def("token_exit", &token_exit, "a per-token exit's decision and bookkeeping");
  m.def("top_tokens", &top_tokens, "Mixture-of-Depths routing by capacity");
  m.def("id_range", &id_range, "the smallest and the largest token id");
  m.def("pad_lengths", &pad_lengths, "lengths before the trailing padding; checks");
  m.def("query_rows", &query_rows, "the running tokens' rows, positions and offsets");
  m.def("rows_attention", &rows_attention, "the running tokens' attention, by sample");
  m.def("blas", &blas, "whether rows_attention's BLAS is there");
}
