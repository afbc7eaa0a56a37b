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
#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"
#include "kd_rows.h"
#include "ops.h"

namespace mode_kernels {
namespace {

using at::vec::Vectorized;
using kd_rows::dlogits_row;
using kd_rows::kl_of;
using kd_rows::kl_row;
using kd_rows::masked_threshold;
using kd_rows::RowResult;

// Logits per chunk of the fused-linear form: 2 MiB of float32 per buffer.
constexpr int64_t kChunkElements = 1 << 19;

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

// The fused-linear form computes each chunk's logits transposed, [V, C] = W X^T (one GEMM that reuses the
// packed hidden states: much faster than X W^T for a few dozen positions), so its row passes run down the
// columns: each vector lane is one position, and the row pass streams the buffer in memory order.
constexpr int64_t kFusedMinPositions = 16, kFusedMaxPositions = 128;
constexpr int64_t kSumBlock = 256;  // rows summed in the acc dtype before adding to the double totals

// Every column goes through the same vector arithmetic, the last (partial) vector of a chunk included: a
// position's results must not depend on where it falls in a chunk, since the chunks change with the number
// of positions (one process with the whole batch, or several with parts of it, must agree to rounding).
// `lanes` of W at column c: the last one loads and stores only the columns that exist (count < W).
template <typename acc_t>
int64_t lanes_at(int64_t c, int64_t width) {
  return std::min<int64_t>(Vectorized<acc_t>::size(), width - c);
}

// Per position (column c in [c0, c1) of s, t: n rows, ld apart): loss, lse_s, lse_t; dead positions (masked out or
// no teacher logit above `masked`) get 0, 0, 0.
template <typename acc_t>
void kl_columns(const acc_t* s, const acc_t* t, int64_t n, int64_t ld, int64_t c0, int64_t c1, acc_t inv_temp,
                acc_t temp, acc_t masked, const bool* counted, acc_t* loss, acc_t* lse_s, acc_t* lse_t) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t width = c1 - c0, padded = (width + W - 1) / W * W;  // per-column buffers in whole vectors
  std::vector<acc_t> max_s(padded, neg_inf), max_t(padded, neg_inf), z_s(padded, 0), z_t(padded, 0), w(padded, 0);
  const Vec vmasked(masked), vneg_inf(neg_inf), vinv(inv_temp), zero(0);
  for (int64_t v = 0; v < n; ++v) {
    const acc_t* sr = s + v * ld + c0;
    const acc_t* tr = t + v * ld + c0;
    for (int64_t c = 0; c < width; c += W) {
      const int64_t k = lanes_at<acc_t>(c, width);
      auto vs = Vec::loadu(sr + c, k), vt = Vec::loadu(tr + c, k);
      at::vec::maximum(Vec::loadu(&max_s[c]), vs).store(&max_s[c]);
      at::vec::maximum(Vec::loadu(&max_t[c]), Vec::blendv(vneg_inf, vt, vt > vmasked)).store(&max_t[c]);
    }
  }
  // Each lane sums a whole column: float partial sums over blocks of rows, added up in double, keep the
  // sums (and the KL, a small difference of them) accurate for large vocabularies.
  std::vector<double> total_z_s(width, 0), total_z_t(width, 0), total_w(width, 0);
  auto flush = [&] {
    for (int64_t c = 0; c < width; ++c) {
      total_z_s[c] += z_s[c], total_z_t[c] += z_t[c], total_w[c] += w[c];
      z_s[c] = z_t[c] = w[c] = 0;
    }
  };
  for (int64_t v = 0; v < n; ++v) {
    if (v % kSumBlock == 0) flush();
    const acc_t* sr = s + v * ld + c0;
    const acc_t* tr = t + v * ld + c0;
    for (int64_t c = 0; c < width; c += W) {
      const int64_t k = lanes_at<acc_t>(c, width);
      auto vs = Vec::loadu(sr + c, k), vt = Vec::loadu(tr + c, k);
      auto keep = vt > vmasked;
      (Vec::loadu(&z_s[c]) + ((vs - Vec::loadu(&max_s[c])) * vinv).exp()).store(&z_s[c]);
      auto et = Vec::blendv(zero, ((vt - Vec::loadu(&max_t[c])) * vinv).exp(), keep);
      (Vec::loadu(&z_t[c]) + et).store(&z_t[c]);
      (Vec::loadu(&w[c]) + et * Vec::blendv(zero, vt - vs, keep)).store(&w[c]);
    }
  }
  flush();
  for (int64_t c = 0; c < width; ++c) {
    const bool alive = max_t[c] != neg_inf && (counted == nullptr || counted[c0 + c]);
    const double zs = total_z_s[c], zt = total_z_t[c];
    const acc_t ls = max_s[c] * inv_temp + std::log(zs), lt = max_t[c] * inv_temp + std::log(zt);
    const double kl = kl_of<double>(total_w[c] / zt, max_t[c] - max_s[c], zt / zs, inv_temp);
    loss[c0 + c] = alive ? static_cast<acc_t>(temp * temp * kl) : 0;
    lse_s[c0 + c] = alive ? ls : 0;
    lse_t[c0 + c] = alive ? lt : 0;
  }
}

// In place: s[v, c] becomes scale[c] (p_s - p_t) for columns [c0, c1); shift_s/shift_t are the logsumexps,
// +inf for dead positions (so both probabilities are 0, and scale is 0 too: no inf * 0).
template <typename acc_t>
void dlogits_columns(acc_t* s, const acc_t* t, int64_t n, int64_t ld, int64_t c0, int64_t c1, acc_t inv_temp,
                     acc_t masked, const acc_t* shift_s, const acc_t* shift_t, const acc_t* scale) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const Vec vinv(inv_temp), vmasked(masked), zero(0);
  for (int64_t v = 0; v < n; ++v) {
    acc_t* sr = s + v * ld;
    const acc_t* tr = t + v * ld;
    for (int64_t c = c0; c < c1; c += W) {
      const int64_t k = lanes_at<acc_t>(c, c1);
      auto vs = Vec::loadu(sr + c, k), vt = Vec::loadu(tr + c, k);
      auto pt = Vec::blendv(zero, (vt * vinv - Vec::loadu(shift_t + c, k)).exp(), vt > vmasked);
      (((vs * vinv - Vec::loadu(shift_s + c, k)).exp() - pt) * Vec::loadu(scale + c, k)).store(sr + c, k);
    }
  }
}

// Column passes of one chunk: positions [r0, r0 + cols) are the columns of s, t ([n, cols] views in the acc
// dtype with unit column stride and the same row stride).
struct ColumnChunk {
  at::Tensor s, t;
  int64_t r0;
  at::Tensor padded;  // the student's columns with the chunk's padding (see chunk_logits)
};

void stats_columns(const ColumnChunk& ch, const c10::optional<at::Tensor>& mask, Rows& out, double temperature,
                   at::ScalarType teacher_dtype) {
  const int64_t n = ch.s.size(0), cols = ch.s.size(1), ld = ch.s.stride(0);
  AT_DISPATCH_FLOATING_TYPES(ch.s.scalar_type(), "kd_kl_columns", [&] {
    const scalar_t temp = static_cast<scalar_t>(temperature), inv = scalar_t(1) / temp;
    const scalar_t masked = masked_threshold<scalar_t>(teacher_dtype);
    const bool* counted = mask.has_value() ? mask->data_ptr<bool>() + ch.r0 : nullptr;
    at::parallel_for(0, cols, 16, [&](int64_t c0, int64_t c1) {
      kl_columns(ch.s.data_ptr<scalar_t>(), ch.t.data_ptr<scalar_t>(), n, ld, c0, c1, inv, temp, masked, counted,
                 out.loss.data_ptr<scalar_t>() + ch.r0, out.lse_s.data_ptr<scalar_t>() + ch.r0,
                 out.lse_t.data_ptr<scalar_t>() + ch.r0);
    });
  });
}

// ch.s becomes d loss / d logits (transposed), for the saved per-position statistics and output gradients.
void dlogits_columns_of(ColumnChunk& ch, const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s,
                        const at::Tensor& lse_t, const at::Tensor& grad_rows, double temperature,
                        at::ScalarType teacher_dtype) {
  const int64_t n = ch.s.size(0), cols = ch.s.size(1), ld = ch.s.stride(0);
  AT_DISPATCH_FLOATING_TYPES(ch.s.scalar_type(), "kd_kl_dlogits_columns", [&] {
    const scalar_t temp = static_cast<scalar_t>(temperature), inv = scalar_t(1) / temp;
    const scalar_t masked = masked_threshold<scalar_t>(teacher_dtype);
    const scalar_t inf = std::numeric_limits<scalar_t>::infinity();
    const bool* counted = mask.has_value() ? mask->data_ptr<bool>() + ch.r0 : nullptr;
    const scalar_t* ls = lse_s.data_ptr<scalar_t>() + ch.r0;
    const scalar_t* lt = lse_t.data_ptr<scalar_t>() + ch.r0;
    const scalar_t* g = grad_rows.data_ptr<scalar_t>() + ch.r0;
    const scalar_t* tp = ch.t.data_ptr<scalar_t>();
    // Alive: counted and some teacher logit above the mask threshold in the position's column.
    std::vector<char> alive(cols, 0);
    for (int64_t v = 0; v < n; ++v) {
      for (int64_t c = 0; c < cols; ++c) alive[c] |= tp[v * ld + c] > masked;
    }
    std::vector<scalar_t> shift_s(cols), shift_t(cols), scale(cols);
    for (int64_t c = 0; c < cols; ++c) {
      const bool on = alive[c] && (counted == nullptr || counted[c]);
      shift_s[c] = on ? ls[c] : inf;
      shift_t[c] = on ? lt[c] : inf;
      scale[c] = on ? g[c] * temp : 0;
    }
    at::parallel_for(0, cols, 16, [&](int64_t c0, int64_t c1) {
      dlogits_columns(ch.s.data_ptr<scalar_t>(), tp, n, ld, c0, c1, inv, masked, shift_s.data(), shift_t.data(),
                      scale.data());
    });
  });
}

// Positions per chunk of the fused-linear form: the most (a power of two, 16 to 128) whose two [V, C] logit
// buffers and d hs [P, H] hold at most 0.6 P V values, 60% of one [P, V] logits tensor (materialising the
// logits holds several). More positions per chunk make both GEMMs faster.
int64_t fused_chunk(int64_t rows, int64_t vocab, int64_t hidden) {
  const double budget = 0.6 * static_cast<double>(rows) * vocab - static_cast<double>(rows) * hidden;
  int64_t positions = kFusedMaxPositions;
  while (positions > kFusedMinPositions && 2.0 * positions * vocab > budget) positions /= 2;
  return positions;
}

// The fused-linear passes over chunks of positions; `body` gets each chunk's transposed logits.
// topk > 0: the chunk is cut down to the teacher's topk logits per position (and `index` says where they were).
struct FusedInputs {
  at::Tensor hs, ht, ws, wt;  // acc dtype; ws, wt: the vocabulary slice
  int64_t vocab;
  bool shared;                // the teacher uses the student's weight
};

// The transposed logits of positions [r0, r0 + n): [s | t] side by side in one [V, 2 cols] buffer, cols =
// max(n, kFusedMinPositions): a short last chunk is padded with positions of zero hidden state. ATen runs
// GEMMs of a few columns through other kernels, with other rounding; padded, every GEMM has at least
// kFusedMinPositions columns, so a position's logits and d hs do not depend on the chunk it falls in, nor
// on how many positions the call has (one process with the whole batch, or several with parts of it).
// With one shared weight (the teacher is the student without adapters) both halves are one GEMM.
ColumnChunk chunk_logits(const FusedInputs& in, at::Tensor& buffer, at::Tensor& staging, int64_t r0, int64_t n) {
  const int64_t cols = std::max(n, kFusedMinPositions);
  if (buffer.size(1) != 2 * cols) {
    buffer = at::empty({in.vocab, 2 * cols}, in.hs.options());
    staging = at::zeros({2 * cols, in.hs.size(1)}, in.hs.options());
  }
  staging.narrow(0, 0, n).copy_(in.hs.narrow(0, r0, n));
  staging.narrow(0, cols, n).copy_(in.ht.narrow(0, r0, n));
  if (in.shared) {
    mm_into(buffer, in.ws, staging.t());
  } else {
    mm_into(buffer.narrow(1, 0, cols), in.ws, staging.narrow(0, 0, cols).t());
    mm_into(buffer.narrow(1, cols, cols), in.wt, staging.narrow(0, cols, cols).t());
  }
  return {buffer.narrow(1, 0, n), buffer.narrow(1, cols, n), r0, buffer.narrow(1, 0, cols)};
}

// d hs of the chunk's positions from its student d-logits (ch.padded: padding columns hold finite values).
void d_hidden_into(at::Tensor& d_hs, const ColumnChunk& ch, const at::Tensor& ws) {
  const int64_t n = ch.s.size(1);
  if (ch.padded.size(1) == n) {
    mm_into(d_hs.narrow(0, ch.r0, n), ch.padded.t(), ws);
  } else {
    d_hs.narrow(0, ch.r0, n).copy_(at::mm(ch.padded.t(), ws).narrow(0, 0, n));
  }
}

FusedInputs fused_inputs(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& ws,
                         const c10::optional<at::Tensor>& wt, int64_t lo, int64_t hi) {
  const auto acc = acc_type(hs.scalar_type());
  FusedInputs in{to_acc(hs), to_acc(ht), ws.narrow(0, lo, hi - lo).to(acc).contiguous(), at::Tensor(), hi - lo,
                 !wt.has_value()};
  in.wt = in.shared ? in.ws : wt->narrow(0, lo, hi - lo).to(acc).contiguous();
  return in;
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
  const FusedInputs in = fused_inputs(hs, ht, ws, wt, lo, hi);
  const int64_t rows = hs.size(0);
  Rows out = empty_rows(rows, in.hs.options());
  const auto m = contiguous_mask(mask);
  const bool with_grad = grad_rows.has_value();
  const auto g = with_grad ? grad_rows->to(in.hs.scalar_type()).contiguous() : at::Tensor();
  auto d_hs = with_grad ? at::empty_like(in.hs) : at::Tensor();
  const int64_t step = fused_chunk(rows, in.vocab, hs.size(1));
  at::Tensor buffer = at::empty({0, 0}, in.hs.options()), staging;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    const ColumnChunk full = chunk_logits(in, buffer, staging, r0, n);
    ColumnChunk ch = full;
    at::Tensor index;
    if (topk > 0) {
      auto [t_top, idx] = kd_rows::select_topk_rows(full.t.t().contiguous(), topk);
      index = idx.t();
      ch = {full.s.gather(0, index).contiguous(), t_top.t().contiguous(), r0, at::Tensor()};
    }
    stats_columns(ch, m, out, temperature, ht.scalar_type());
    if (!with_grad) continue;
    dlogits_columns_of(ch, m, out.lse_s, out.lse_t, g, temperature, ht.scalar_type());
    if (topk > 0) full.s.zero_().scatter_(0, index, ch.s);
    d_hidden_into(d_hs, full, in.ws);
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
  const FusedInputs in = fused_inputs(hs, ht, ws, wt, lo, hi);
  const int64_t rows = hs.size(0);
  const auto acc = in.hs.scalar_type();
  const auto m = contiguous_mask(mask);
  const auto g = grad_rows.to(acc).contiguous(), ls = lse_s.to(acc).contiguous(), lt = lse_t.to(acc).contiguous();
  auto d_hs = at::empty_like(in.hs);
  auto d_ws_slice = need_dw ? at::zeros_like(in.ws) : at::Tensor();
  const int64_t step = fused_chunk(rows, in.vocab, hs.size(1));
  at::Tensor buffer = at::empty({0, 0}, in.hs.options()), staging;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    ColumnChunk ch = chunk_logits(in, buffer, staging, r0, n);
    if (topk > 0) {
      auto [t_top, idx] = kd_rows::select_topk_rows(ch.t.t().contiguous(), topk);
      const at::Tensor index = idx.t();
      ColumnChunk top{ch.s.gather(0, index).contiguous(), t_top.t().contiguous(), r0, at::Tensor()};
      dlogits_columns_of(top, m, ls, lt, g, temperature, ht.scalar_type());
      ch.s.zero_().scatter_(0, index, top.s);
    } else {
      dlogits_columns_of(ch, m, ls, lt, g, temperature, ht.scalar_type());
    }
    d_hidden_into(d_hs, ch, in.ws);
    if (need_dw) d_ws_slice.addmm_(ch.s, in.hs.narrow(0, r0, n));
  }
  at::Tensor d_ws;
  if (need_dw) {
    d_ws = at::zeros_like(ws);
    d_ws.narrow(0, lo, in.vocab).copy_(d_ws_slice);
  }
  return {d_hs.to(hs.scalar_type()), d_ws};
}

}  // namespace mode_kernels
