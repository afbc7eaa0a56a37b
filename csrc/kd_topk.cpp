// The KD loss with the teacher as its top k: the teacher's selection, and the sparse student.
//
// Selection (teacher_topk): per chunk of positions the teacher's logits of the slice by one GEMM (always of the
// same padded number of rows, so a position's logits do not depend on its chunk), then per position a bound on
// the k-th largest from block maxima, std::nth_element on the few entries above it, and one pass that takes the
// larger ones and, among those equal to the k-th, the lowest ids: O(V) per position, and the ties rule exactly.
//
// Sparse student (fused_linear_kd_kl_given): per position only the student's logits at the teacher's k ids,
// each a dot product of the hidden state with one gathered row of the weight slice (k H multiply-adds, not V H),
// the row pass of kd_rows.h on those k, and d hidden = sum_j d_j w_{id_j} over the same gathered rows. No
// [P, V] (or [chunk, V]) student tile exists. d weight (trainable weight) is a scatter-add of d_j h into the
// rows id_j, run in parallel over blocks of H columns so that every element is added to in one fixed order
// (deterministic, no atomics).
#include <algorithm>
#include <functional>
#include <tuple>
#include <vector>

#include "common.h"
#include "kd_rows.h"
#include "ops.h"

namespace mode_kernels {

namespace kd_rows {

// A lower bound of the k-th largest value first: cut the row into k or more blocks; each block's maximum is a
// distinct entry, so at least k entries are >= tau, the least of those maxima, and the k largest are all among
// the entries >= tau (the candidates; with logits, a few times k of the n). nth_element then runs on the
// candidates' values only, and one pass over the candidates, in id order, takes those above the k-th largest
// and, of those equal to it, the lowest ids.
template <typename scalar_t>
void select_row(const scalar_t* row, int64_t n, int64_t k, scalar_t* values, int64_t* ids,
                std::vector<scalar_t>& scratch, std::vector<int64_t>& candidates) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int64_t block = std::max<int64_t>(1, n / k);
  scalar_t tau = std::numeric_limits<scalar_t>::infinity();
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = std::min(n, b0 + block);
    if (b1 - b0 < block) break;  // a short last block: its entries are still scanned below
    scalar_t top = row[b0];
    int64_t v = b0;
    if (block >= W) {
      Vec vtop = Vec::loadu(row + b0);
      for (v = b0 + W; v + W <= b1; v += W) vtop = at::vec::maximum(vtop, Vec::loadu(row + v));
      scalar_t lanes[W];
      vtop.store(lanes);
      for (int64_t j = 0; j < W; ++j) top = std::max(top, lanes[j]);
    }
    for (; v < b1; ++v) top = std::max(top, row[v]);
    tau = std::min(tau, top);
  }
  // Branch-free compaction (about a sixth of a row's logits pass the bound: a branch would mispredict often).
  candidates.resize(n);
  scratch.resize(n);
  int64_t count = 0;
  for (int64_t v = 0; v < n; ++v) {
    candidates[count] = v;
    scratch[count] = row[v];
    count += row[v] >= tau;
  }
  candidates.resize(count);
  scratch.resize(count);
  std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<scalar_t>());
  const scalar_t kth = scratch[k - 1];
  int64_t above = 0;
  for (const int64_t v : candidates) above += row[v] > kth;
  int64_t ties = k - above, j = 0;
  for (const int64_t v : candidates) {
    if (row[v] > kth || (row[v] == kth && ties-- > 0)) {
      values[j] = row[v];
      ids[j++] = v;
      if (j == k) break;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> select_topk_rows(const at::Tensor& t, int64_t k) {
  const int64_t rows = t.size(0), n = t.size(1);
  auto values = at::empty({rows, k}, t.options());
  auto index = at::empty({rows, k}, t.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "kd_select_topk", [&] {
    const scalar_t* tp = t.data_ptr<scalar_t>();
    scalar_t* vp = values.data_ptr<scalar_t>();
    int64_t* ip = index.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
      std::vector<scalar_t> scratch;
      std::vector<int64_t> candidates;
      scratch.reserve(n);
      candidates.reserve(n);
      for (int64_t r = a; r < b; ++r) select_row(tp + r * n, n, k, vp + r * k, ip + r * k, scratch, candidates);
    });
  });
  return {values, index};
}

}  // namespace kd_rows

namespace {

using at::vec::Vectorized;

// Positions per selection chunk: the transposed [V, C] logits of kd_kl.cpp, C a power of two in [16, 128].
constexpr int64_t kSelectMinPositions = 16, kSelectMaxPositions = 128;
// Columns of H per task of the d weight scatter-add.
constexpr int64_t kScatterBlock = 64;

template <typename acc_t>
acc_t dot(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec v0(0), v1(0);
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    v0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), v0);
    v1 = at::vec::fmadd(Vec::loadu(a + i + W), Vec::loadu(b + i + W), v1);
  }
  for (; i + W <= n; i += W) v0 = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), v0);
  acc_t sum = at::vec::vec_reduce_all<acc_t>([](const Vec& x, const Vec& y) { return x + y; }, v0 + v1);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// y += alpha x over n entries.
template <typename acc_t>
void axpy(acc_t alpha, const acc_t* x, acc_t* y, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + W <= n; i += W) at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  for (; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

// (values [P, k] acc dtype, ids int64 [P, k] in [lo, hi) ascending, logsumexp [P] of values / T over the slice
// (masked entries excluded; -inf for a position with none) or undefined).
std::vector<at::Tensor> kd_teacher_topk(const at::Tensor& ht, const at::Tensor& wt, int64_t lo, int64_t hi,
                                        int64_t k, double temperature, bool want_logsumexp) {
  const auto acc = acc_type(ht.scalar_type());
  const auto h = to_acc(ht);
  const auto w = wt.narrow(0, lo, hi - lo).to(acc).contiguous();
  const int64_t rows = h.size(0), n = hi - lo;
  auto values = at::empty({rows, k}, h.options());
  auto index = at::empty({rows, k}, h.options().dtype(at::kLong));
  auto lse = want_logsumexp ? at::empty({rows}, h.options()) : at::Tensor();
  int64_t step = kSelectMaxPositions;  // the chunk's [V, C] logits within about 4 MiB of float32
  while (step > kSelectMinPositions && step * n > (1 << 20)) step /= 2;
  const int64_t cols = std::max<int64_t>(std::min(step, rows), kSelectMinPositions);
  auto staging = at::zeros({cols, h.size(1)}, h.options());
  auto buffer = at::empty({cols, n}, h.options());
  const auto w_t = w.t();
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t m = std::min(step, rows - r0);
    staging.narrow(0, 0, m).copy_(h.narrow(0, r0, m));
    mm_into(buffer, staging, w_t);  // always cols rows: the same GEMM for every chunk
    const auto t = buffer.narrow(0, 0, m);
    auto [v, i] = kd_rows::select_topk_rows(t, k);
    values.narrow(0, r0, m).copy_(v);
    index.narrow(0, r0, m).copy_(i.add_(lo));
    if (want_logsumexp) {
      AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "kd_teacher_lse", [&] {
        const scalar_t* tp = t.data_ptr<scalar_t>();
        scalar_t* out = lse.data_ptr<scalar_t>() + r0;
        const scalar_t masked = kd_rows::masked_threshold<scalar_t>(t.scalar_type());
        const scalar_t inv = scalar_t(1) / static_cast<scalar_t>(temperature);
        const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
        at::parallel_for(0, m, 1, [&](int64_t a, int64_t b) {
          for (int64_t r = a; r < b; ++r) {
            const scalar_t* row = tp + r * n;
            scalar_t top = neg_inf;
            for (int64_t v = 0; v < n; ++v) if (row[v] > masked) top = std::max(top, row[v]);
            if (top == neg_inf) { out[r] = neg_inf; continue; }
            double z = 0;
            for (int64_t v = 0; v < n; ++v) if (row[v] > masked) z += std::exp((row[v] - top) * inv);
            out[r] = top * inv + static_cast<scalar_t>(std::log(z));
          }
        });
      });
    }
  }
  return {values, index, lse};
}

// The KD loss with the teacher given as ids [P, k] (int64, relative to lo) and logits [P, k]: (loss, lse_s, lse_t
// [P] acc dtype, over the k; d hs [P, H] in hs's dtype for grad_rows or undefined; d ws [V, H] in ws's dtype when
// need_dw (needs grad_rows) or undefined). The student's logits only at the ids (see the file's comment).
std::vector<at::Tensor> fused_linear_kd_kl_given(const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& index,
                                                 const at::Tensor& teacher_logits,
                                                 const c10::optional<at::Tensor>& mask, double temperature,
                                                 int64_t lo, int64_t hi, const c10::optional<at::Tensor>& grad_rows,
                                                 bool need_dw) {
  const auto acc = acc_type(hs.scalar_type());
  const auto h = to_acc(hs);
  const auto w = ws.narrow(0, lo, hi - lo).to(acc).contiguous();
  const auto t = teacher_logits.to(acc).contiguous();
  const auto ids = index.to(at::kLong).contiguous();
  const int64_t rows = h.size(0), hidden = h.size(1), k = ids.size(1);
  const bool with_grad = grad_rows.has_value();
  TORCH_CHECK(with_grad || !need_dw, "fused_linear_kd_kl_given: d ws needs grad_rows");
  auto loss = at::zeros({rows}, h.options()), lse_s = at::zeros({rows}, h.options());
  auto lse_t = at::zeros({rows}, h.options());
  auto d_hs = with_grad ? at::zeros_like(h) : at::Tensor();
  auto d_logits = need_dw ? at::zeros({rows, k}, h.options()) : at::Tensor();
  const auto m = mask.has_value() ? c10::optional<at::Tensor>(mask->to(at::kBool).contiguous()) : c10::nullopt;
  const auto g = with_grad ? grad_rows->to(acc).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "kd_given_rows", [&] {
    const scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const int64_t* ip = ids.data_ptr<int64_t>();
    const bool* mp = m.has_value() ? m->data_ptr<bool>() : nullptr;
    const scalar_t* gp = with_grad ? g.data_ptr<scalar_t>() : nullptr;
    scalar_t* dhp = with_grad ? d_hs.data_ptr<scalar_t>() : nullptr;
    scalar_t* dlp = need_dw ? d_logits.data_ptr<scalar_t>() : nullptr;
    const scalar_t masked = kd_rows::masked_threshold<scalar_t>(teacher_logits.scalar_type());
    const scalar_t temp = static_cast<scalar_t>(temperature), inv = scalar_t(1) / temp;
    const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
    scalar_t* lp = loss.data_ptr<scalar_t>();
    scalar_t* lsp = lse_s.data_ptr<scalar_t>();
    scalar_t* ltp = lse_t.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
      std::vector<scalar_t> s(k), d(k);
      for (int64_t p = a; p < b; ++p) {
        if (mp != nullptr && !mp[p]) continue;
        const scalar_t* trow = tp + p * k;
        const int64_t* irow = ip + p * k;
        const scalar_t* hrow = hp + p * hidden;
        for (int64_t j = 0; j < k; ++j) s[j] = dot(hrow, wp + irow[j] * hidden, hidden);
        const auto res = kd_rows::kl_row(s.data(), trow, k, inv, temp, masked);
        if (res.lse_t == neg_inf) continue;  // no live teacher entry: loss 0, gradient 0
        lp[p] = res.loss, lsp[p] = res.lse_s, ltp[p] = res.lse_t;
        if (!with_grad) continue;
        kd_rows::dlogits_row(s.data(), trow, d.data(), k, inv, res.lse_s, res.lse_t, gp[p] * temp, masked);
        scalar_t* dh = dhp + p * hidden;
        for (int64_t j = 0; j < k; ++j) axpy(d[j], wp + irow[j] * hidden, dh, hidden);
        if (need_dw) std::copy(d.begin(), d.end(), dlp + p * k);
      }
    });
  });
  at::Tensor d_ws;
  if (need_dw) {
    auto d_slice = at::zeros_like(w);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "kd_given_dw", [&] {
      const scalar_t* hp = h.data_ptr<scalar_t>();
      const scalar_t* dlp = d_logits.data_ptr<scalar_t>();
      const int64_t* ip = ids.data_ptr<int64_t>();
      scalar_t* dwp = d_slice.data_ptr<scalar_t>();
      const int64_t blocks = (hidden + kScatterBlock - 1) / kScatterBlock;
      at::parallel_for(0, blocks, 1, [&](int64_t a, int64_t b) {
        const int64_t c0 = a * kScatterBlock, c1 = std::min(hidden, b * kScatterBlock);
        for (int64_t p = 0; p < rows; ++p) {
          for (int64_t j = 0; j < k; ++j) {
            const scalar_t dj = dlp[p * k + j];
            if (dj != 0) axpy(dj, hp + p * hidden + c0, dwp + ip[p * k + j] * hidden + c0, c1 - c0);
          }
        }
      });
    });
    d_ws = at::zeros_like(ws);
    d_ws.narrow(0, lo, hi - lo).copy_(d_slice);
  }
  return {loss, lse_s, lse_t, with_grad ? d_hs.to(hs.scalar_type()) : at::Tensor(), d_ws};
}

}  // namespace mode_kernels
