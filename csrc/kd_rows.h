// Row passes of the KD loss shared by kd_kl.cpp (logits, dense fused-linear) and kd_topk.cpp (teacher top-k
// selection, sparse student): per row of n student/teacher logits, the loss and logsumexps, and the d logits.
#pragma once

#include <tuple>

#include "common.h"

namespace mode_kernels {
namespace kd_rows {

using at::vec::Vectorized;

// KL = E_pt[(t - s)] / T - (lse_t - lse_s), with lse_t - lse_s = (max_t - max_s) / T + log(z_t / z_s): taking
// the difference of the logsumexps through their parts keeps a small KL exact to float32 rounding (the
// logsumexps themselves are ~log V and would cancel to ~1e-6).
template <typename acc_t>
acc_t kl_of(acc_t mean_diff, acc_t max_diff, acc_t z_ratio, acc_t inv_temp) {
  return (mean_diff - max_diff) * inv_temp - std::log(z_ratio);
}

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
  return {temp * temp * kl_of(w / zt, max_t - max_s, zt / zs, inv_temp), lse_s, lse_t};
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

// The k largest of each row of t ([rows, n], acc dtype, contiguous): (values [rows, k], ids int64 [rows, k]),
// ids ascending; among values equal to the k-th largest the lower ids are taken (the documented ties rule).
// Defined in kd_topk.cpp.
std::tuple<at::Tensor, at::Tensor> select_topk_rows(const at::Tensor& t, int64_t k);

}  // namespace kd_rows
}  // namespace mode_kernels
