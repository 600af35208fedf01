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
//
// The scores are computed by the same inline functions in both ops, so a threshold chosen on
// `confidence` (calibration) splits the samples exactly as `rows_where` does.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the casters of at::Tensor and the STL

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

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
at::Tensor rows_where_impl(const at::Tensor& t, int64_t rule, double threshold, double a) {
  const int64_t b = t.size(0);
  const int64_t width = b ? t.numel() / b : 0;
  const T* p = t.data_ptr<T>();
  const T thr = static_cast<T>(threshold), arg = static_cast<T>(a);
  const int64_t col = rule == kAtLeast ? static_cast<int64_t>(a) : 0;
  auto out = at::empty({b}, t.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < b; ++i) {
    const T* r = p + i * width;
    bool keep = false;
    switch (rule) {
      case kMaxProbBelow: keep = max_prob(r, width, arg) < thr; break;
      case kEntropyAbove: keep = entropy(r, width, arg) > thr; break;
      case kDrawAtLeast: keep = draw(r[0], arg) >= thr; break;
      case kDrawBelow: keep = draw(r[0], arg) < thr; break;
      case kAtLeast: keep = r[col] >= thr; break;
      default: TORCH_CHECK(false, "dyngraph::rows_where: unknown rule ", rule);
    }
    if (keep) o[n++] = i;
  }
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
              "dyngraph::copy_rows_: ", what, " are int64 positions");
  const int64_t* p = r.data_ptr<int64_t>();
  for (int64_t i = 0; i < r.size(0); ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < b, "dyngraph::copy_rows_: ", what, " ", p[i], " out of ", b);
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
  TORCH_CHECK(active_in.dim() == 2 && active_in.scalar_type() == at::kBool,
              "dyngraph::query_grid: a bool tensor [b, L]");
  const at::Tensor active = active_in.contiguous();
  const int64_t b = active.size(0), n = active.size(1);
  const bool* a = active.data_ptr<bool>();
  int64_t total = 0, width = 0;
  for (int64_t i = 0; i < b; ++i) {
    int64_t c = 0;
    for (int64_t j = 0; j < n; ++j) c += a[i * n + j];
    total += c;
    width = std::max(width, c);
  }
  auto rows = at::empty({total}, active.options().dtype(at::kLong));
  auto slots = at::empty({total}, rows.options());
  auto mask = at::empty({b, 1, width, n}, active.options().dtype(at::kFloat));
  int64_t* r = rows.data_ptr<int64_t>();
  int64_t* s = slots.data_ptr<int64_t>();
  float* m = mask.data_ptr<float>();
  const float inf = std::numeric_limits<float>::infinity();
  int64_t k = 0;
  for (int64_t i = 0; i < b; ++i) {
    int64_t q = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (!a[i * n + j]) continue;
      r[k] = i * n + j;
      s[k++] = i * width + q;
      float* row = m + (i * width + q++) * n;
      for (int64_t key = 0; key < n; ++key) row[key] = key <= j ? 0.0f : -inf;
    }
    for (; q < width; ++q) {  // padding: reads position 0 only
      float* row = m + (i * width + q) * n;
      for (int64_t key = 0; key < n; ++key) row[key] = key == 0 ? 0.0f : -inf;
    }
  }
  return {rows, slots, mask, width};
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
}
