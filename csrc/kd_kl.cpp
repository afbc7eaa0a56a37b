// KD loss T^2 KL(teacher || student) on CPU: on logits, and fused with the two output projections.
//
// Per row of a vocabulary slice, with p = softmax(logits / T):
//   loss = T^2 sum_v p_t (log p_t - log p_s) = T^2 (sum_v p_t (t_v - s_v) / T - lse_t + lse_s)
//   d loss / d s_v = T (p_s(v) - p_t(v))
// One vectorised row pass (two sweeps over the row while it is in cache) gives both logsumexps and the
// loss; another gives the logits' gradient. Teacher logits of -inf or of their dtype's most negative
// finite value are masked (p_t = 0). Rows masked out or without a finite teacher logit: loss 0, gradient 0.
// The fused-linear form computes the logits of a chunk of rows by ATen GEMM into a reused buffer, so no
// [P, V] tensor ever exists; d hidden is one GEMM per chunk.
#include <tuple>
#include <vector>

#include "common.h"
#include "ops.h"

namespace mode_kernels {
namespace {

using at::vec::Vectorized;

// Logits per chunk of the fused-linear form: 2 MiB of float32 per buffer.
constexpr int64_t kChunkElements = 1 << 19;

template <typename acc_t>
struct RowResult {
  acc_t loss, lse_s, lse_t;
};

// Loss and logsumexps of one row of n student/teacher logits (acc dtype). `masked`: teacher logits at or
// below it have probability 0. A dead row (no teacher logit above `masked`) gives lse_t = -inf.
template <typename acc_t>
RowResult<acc_t> kl_row(const acc_t* s, const acc_t* t, int64_t n, acc_t inv_temp, acc_t temp, acc_t masked) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const Vec vmasked(masked), vneg_inf(neg_inf);
  Vec vmax_s(neg_inf), vmax_t(neg_inf);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    auto vs = Vec::loadu(s + i), vt = Vec::loadu(t + i);
    vmax_s = at::vec::maximum(vmax_s, vs);
    vmax_t = at::vec::maximum(vmax_t, Vec::blendv(vneg_inf, vt, vt > vmasked));
  }
  acc_t max_s = neg_inf, max_t = neg_inf;
  for (; i < n; ++i) {
    max_s = std::max(max_s, s[i]);
    if (t[i] > masked) max_t = std::max(max_t, t[i]);
  }
  acc_t lanes_s[W], lanes_t[W];
  vmax_s.store(lanes_s);
  vmax_t.store(lanes_t);
  for (int64_t j = 0; j < W; ++j) max_s = std::max(max_s, lanes_s[j]), max_t = std::max(max_t, lanes_t[j]);
  if (max_t == neg_inf) return {0, 0, neg_inf};

  const Vec vinv(inv_temp), vms(max_s), vmt(max_t), zero(0);
  Vec vzs(0), vzt(0), vw(0);
  for (i = 0; i + W <= n; i += W) {
    auto vs = Vec::loadu(s + i), vt = Vec::loadu(t + i);
    auto keep = vt > vmasked;
    vzs += ((vs - vms) * vinv).exp();
    auto et = Vec::blendv(zero, ((vt - vmt) * vinv).exp(), keep);
    vzt += et;
    vw += et * Vec::blendv(zero, vt - vs, keep);
  }
  acc_t zs = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; }, vzs);
  acc_t zt = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; }, vzt);
  acc_t w = at::vec::vec_reduce_all<acc_t>([](const Vec& a, const Vec& b) { return a + b; }, vw);
  for (; i < n; ++i) {
    zs += std::exp((s[i] - max_s) * inv_temp);
    if (t[i] > masked) {
      const acc_t et = std::exp((t[i] - max_t) * inv_temp);
      zt += et;
      w += et * (t[i] - s[i]);
    }
  }
  const acc_t lse_s = max_s * inv_temp + std::log(zs), lse_t = max_t * inv_temp + std::log(zt);
  return {temp * temp * (w / zt * inv_temp - lse_t + lse_s), lse_s, lse_t};
}

// d[v] = scale (p_s(v) - p_t(v)) for one row (d may alias s).
template <typename acc_t>
void dlogits_row(const acc_t* s, const acc_t* t, acc_t* d, int64_t n, acc_t inv_temp, acc_t lse_s, acc_t lse_t,
                 acc_t scale, acc_t masked) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vinv(inv_temp), vls(lse_s), vlt(lse_t), vscale(scale), vmasked(masked), zero(0);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    auto vs = Vec::loadu(s + i), vt = Vec::loadu(t + i);
    auto pt = Vec::blendv(zero, (vt * vinv - vlt).exp(), vt > vmasked);
    (((vs * vinv - vls).exp() - pt) * vscale).store(d + i);
  }
  for (; i < n; ++i) {
    const acc_t pt = t[i] > masked ? std::exp(t[i] * inv_temp - lse_t) : acc_t(0);
    d[i] = (std::exp(s[i] * inv_temp - lse_s) - pt) * scale;
  }
}

// The teacher's most negative finite value in its own dtype, as an acc value: logits at or below it are masked.
template <typename acc_t>
acc_t masked_threshold(at::ScalarType teacher_dtype) {
  switch (teacher_dtype) {
    case at::kDouble: return static_cast<acc_t>(std::numeric_limits<double>::lowest());
    case at::kFloat: return static_cast<acc_t>(std::numeric_limits<float>::lowest());
    case at::kBFloat16: return static_cast<acc_t>(std::numeric_limits<c10::BFloat16>::lowest());
    case at::kHalf: return static_cast<acc_t>(std::numeric_limits<c10::Half>::lowest());
    default: TORCH_CHECK(false, "kd_kl: unsupported teacher dtype ", teacher_dtype);
  }
}

struct Rows {
  at::Tensor loss, lse_s, lse_t;
};

// Row statistics of s, t ([rows, n] acc-dtype, contiguous) into rows [r0, r0 + rows) of `out`.
// lse_t of a dead row (no finite teacher logit, or masked out) is stored as 0 with loss 0 and lse_s 0.
void stats_rows(const at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& mask, Rows& out,
                int64_t r0, double temperature, at::ScalarType teacher_dtype) {
  const int64_t rows = s.size(0), n = s.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "kd_kl_rows", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const bool* mp = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    scalar_t* loss = out.loss.data_ptr<scalar_t>();
    scalar_t* ls = out.lse_s.data_ptr<scalar_t>();
    scalar_t* lt = out.lse_t.data_ptr<scalar_t>();
    const scalar_t masked = masked_threshold<scalar_t>(teacher_dtype);
    const scalar_t temp = static_cast<scalar_t>(temperature), inv = scalar_t(1) / temp;
    at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t p = r0 + i;
        RowResult<scalar_t> res{0, 0, -std::numeric_limits<scalar_t>::infinity()};
        if (mp == nullptr || mp[p]) res = kl_row(sp + i * n, tp + i * n, n, inv, temp, masked);
        const bool alive = res.lse_t != -std::numeric_limits<scalar_t>::infinity();
        loss[p] = alive ? res.loss : 0;
        ls[p] = alive ? res.lse_s : 0;
        lt[p] = alive ? res.lse_t : 0;
      }
    });
  });
}

// In place: s becomes d loss / d s (rows [r0, r0 + rows) of the saved statistics), times grad_rows.
void dlogits_rows(at::Tensor& s, const at::Tensor& t, const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s,
                  const at::Tensor& lse_t, const at::Tensor& grad_rows, int64_t r0, double temperature,
                  at::ScalarType teacher_dtype) {
  const int64_t rows = s.size(0), n = s.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "kd_kl_dlogits", [&] {
    scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const bool* mp = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    const scalar_t* ls = lse_s.data_ptr<scalar_t>();
    const scalar_t* lt = lse_t.data_ptr<scalar_t>();
    const scalar_t* g = grad_rows.data_ptr<scalar_t>();
    const scalar_t masked = masked_threshold<scalar_t>(teacher_dtype);
    const scalar_t temp = static_cast<scalar_t>(temperature), inv = scalar_t(1) / temp;
    at::parallel_for(0, rows, 1, [&](int64_t a, int64_t b) {
      for (int64_t i = a; i < b; ++i) {
        const int64_t p = r0 + i;
        scalar_t* row = sp + i * n;
        const scalar_t* trow = tp + i * n;
        // Alive rows are those with a finite teacher logit in the slice (and not masked out).
        bool alive = mp == nullptr || mp[p];
        if (alive) {
          alive = false;
          for (int64_t v = 0; v < n && !alive; ++v) alive = trow[v] > masked;
        }
        if (!alive) {
          std::fill(row, row + n, scalar_t(0));
          continue;
        }
        dlogits_row(row, trow, row, n, inv, ls[p], lt[p], g[p] * temp, masked);
      }
    });
  });
}

Rows empty_rows(int64_t rows, const at::TensorOptions& options) {
  return {at::zeros({rows}, options), at::zeros({rows}, options), at::zeros({rows}, options)};
}

c10::optional<at::Tensor> contiguous_mask(const c10::optional<at::Tensor>& mask) {
  if (!mask.has_value()) return c10::nullopt;
  return mask->to(at::kBool).contiguous();
}

// The logits of the teacher's top-k in each row, and the student's at the same entries.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_gather(const at::Tensor& s, const at::Tensor& t, int64_t topk) {
  auto [t_top, index] = at::topk(t, topk, -1);
  return {s.gather(-1, index).contiguous(), t_top.contiguous(), index};
}

}  // namespace

std::vector<at::Tensor> kd_kl_forward(const at::Tensor& student, const at::Tensor& teacher,
                                      const c10::optional<at::Tensor>& mask, double temperature, int64_t lo,
                                      int64_t hi) {
  const int64_t rows = student.size(0);
  const auto acc = acc_type(student.scalar_type());
  Rows out = empty_rows(rows, student.options().dtype(acc));
  const auto m = contiguous_mask(mask);
  const int64_t step = rows_per_chunk(kChunkElements, hi - lo);
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    auto s = student.narrow(0, r0, n).narrow(1, lo, hi - lo).to(acc).contiguous();
    auto t = teacher.narrow(0, r0, n).narrow(1, lo, hi - lo).to(acc).contiguous();
    stats_rows(s, t, m, out, r0, temperature, teacher.scalar_type());
  }
  return {out.loss, out.lse_s, out.lse_t};
}

at::Tensor kd_kl_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                          const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s, const at::Tensor& lse_t,
                          double temperature, int64_t lo, int64_t hi) {
  const int64_t rows = student.size(0);
  const auto acc = acc_type(student.scalar_type());
  auto grad = at::zeros_like(student, at::MemoryFormat::Contiguous);
  const auto m = contiguous_mask(mask);
  const auto g = grad_rows.to(acc).contiguous(), ls = lse_s.to(acc).contiguous(), lt = lse_t.to(acc).contiguous();
  const int64_t step = rows_per_chunk(kChunkElements, hi - lo);
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    auto s = at::empty({n, hi - lo}, student.options().dtype(acc));  // a copy: the gradient is written in place
    s.copy_(student.narrow(0, r0, n).narrow(1, lo, hi - lo));
    auto t = teacher.narrow(0, r0, n).narrow(1, lo, hi - lo).to(acc).contiguous();
    dlogits_rows(s, t, m, ls, lt, g, r0, temperature, teacher.scalar_type());
    grad.narrow(0, r0, n).narrow(1, lo, hi - lo).copy_(s);
  }
  return grad;
}

// Forward of the fused-linear KD loss: (loss, lse_s, lse_t), each [P] in the acc dtype, and, when
// grad_rows is given, d loss / d hs for those per-row output gradients ([P, H] in hs's dtype), computed in
// the same pass over the chunks (3 GEMMs per chunk in all instead of 2 now and 3 in a backward).
// topk > 0: only the teacher's topk largest logits of the slice count, both distributions renormalised.
std::vector<at::Tensor> fused_linear_kd_kl_forward(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& ws,
                                                   const c10::optional<at::Tensor>& wt,
                                                   const c10::optional<at::Tensor>& mask, double temperature,
                                                   int64_t lo, int64_t hi, int64_t topk,
                                                   const c10::optional<at::Tensor>& grad_rows) {
  const int64_t rows = hs.size(0), vocab = hi - lo;
  const auto acc = acc_type(hs.scalar_type());
  const auto opts = hs.options().dtype(acc);
  Rows out = empty_rows(rows, opts);
  const auto m = contiguous_mask(mask);
  const auto hs_a = to_acc(hs), ht_a = to_acc(ht);
  const auto ws_slice = ws.narrow(0, lo, vocab).to(acc).contiguous();
  const auto wt_slice = wt.has_value() ? wt->narrow(0, lo, vocab).to(acc).contiguous() : ws_slice;
  const bool with_grad = grad_rows.has_value();
  const auto g = with_grad ? grad_rows->to(acc).contiguous() : at::Tensor();
  auto d_hs = with_grad ? at::empty_like(hs_a) : at::Tensor();
  const int64_t step = rows_per_chunk(kChunkElements, vocab);
  auto s_buf = at::empty({std::min(step, rows), vocab}, opts), t_buf = at::empty_like(s_buf);
  const auto teacher_dtype = ht.scalar_type();
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    auto s = s_buf.narrow(0, 0, n), t = t_buf.narrow(0, 0, n);
    mm_into(s, hs_a.narrow(0, r0, n), ws_slice.t());
    mm_into(t, ht_a.narrow(0, r0, n), wt_slice.t());
    if (topk > 0) {
      auto [s_top, t_top, index] = topk_gather(s, t, topk);
      stats_rows(s_top, t_top, m, out, r0, temperature, teacher_dtype);
      if (with_grad) {
        dlogits_rows(s_top, t_top, m, out.lse_s, out.lse_t, g, r0, temperature, teacher_dtype);
        s.zero_().scatter_(-1, index, s_top);
      }
    } else {
      stats_rows(s, t, m, out, r0, temperature, teacher_dtype);
      if (with_grad) dlogits_rows(s, t, m, out.lse_s, out.lse_t, g, r0, temperature, teacher_dtype);
    }
    if (with_grad) mm_into(d_hs.narrow(0, r0, n), s, ws_slice);
  }
  std::vector<at::Tensor> result{out.loss, out.lse_s, out.lse_t};
  result.push_back(with_grad ? d_hs.to(hs.scalar_type()) : at::Tensor());
  return result;
}

// (d hs [P, H] in hs's dtype, d ws [V, H] in ws's dtype or undefined). The teacher is a constant.
std::vector<at::Tensor> fused_linear_kd_kl_backward(const at::Tensor& grad_rows, const at::Tensor& hs,
                                                    const at::Tensor& ht, const at::Tensor& ws,
                                                    const c10::optional<at::Tensor>& wt,
                                                    const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s,
                                                    const at::Tensor& lse_t, double temperature, int64_t lo,
                                                    int64_t hi, int64_t topk, bool need_dw) {
  const int64_t rows = hs.size(0), vocab = hi - lo;
  const auto acc = acc_type(hs.scalar_type());
  const auto opts = hs.options().dtype(acc);
  const auto m = contiguous_mask(mask);
  const auto hs_a = to_acc(hs), ht_a = to_acc(ht);
  const auto ws_slice = ws.narrow(0, lo, vocab).to(acc).contiguous();
  const auto wt_slice = wt.has_value() ? wt->narrow(0, lo, vocab).to(acc).contiguous() : ws_slice;
  const auto g = grad_rows.to(acc).contiguous(), ls = lse_s.to(acc).contiguous(), lt = lse_t.to(acc).contiguous();
  auto d_hs = at::empty_like(hs_a);
  auto d_ws_slice = need_dw ? at::zeros_like(ws_slice) : at::Tensor();
  const int64_t step = rows_per_chunk(kChunkElements, vocab);
  auto s_buf = at::empty({std::min(step, rows), vocab}, opts), t_buf = at::empty_like(s_buf);
  const auto teacher_dtype = ht.scalar_type();
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    auto s = s_buf.narrow(0, 0, n), t = t_buf.narrow(0, 0, n);
    mm_into(s, hs_a.narrow(0, r0, n), ws_slice.t());
    mm_into(t, ht_a.narrow(0, r0, n), wt_slice.t());
    if (topk > 0) {
      auto [s_top, t_top, index] = topk_gather(s, t, topk);
      dlogits_rows(s_top, t_top, m, ls, lt, g, r0, temperature, teacher_dtype);
      s.zero_().scatter_(-1, index, s_top);
    } else {
      dlogits_rows(s, t, m, ls, lt, g, r0, temperature, teacher_dtype);
    }
    mm_into(d_hs.narrow(0, r0, n), s, ws_slice);
    if (need_dw) d_ws_slice.addmm_(s.t(), hs_a.narrow(0, r0, n));
  }
  at::Tensor d_ws;
  if (need_dw) {
    d_ws = at::zeros_like(ws);
    d_ws.narrow(0, lo, vocab).copy_(d_ws_slice);
  }
  return {d_hs.to(hs.scalar_type()), d_ws};
}

}  // namespace mode_kernels
