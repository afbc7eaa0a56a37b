// Modality-routed LoRA on CPU, forward and backward, in token order.
//
// For a token t of modality m with experts S_m (experts ordered by modality):
//   g = softmax over S_m of u_t R[S_m]^T (g = 1 for one expert), H[t, e*r:(e+1)*r] = scaling g_e u_t A_e^T
//   y_t = x_t W^T + b + H_t B_cat^T,   B_cat[n, e*r + j] = lora_b[e, n, j]
// Tokens come in blocks of consecutive tokens (see Block): a run of one modality's tokens is one block and
// its adapter GEMMs use only that modality's experts' columns (text: its experts and router; image: its
// expert); short runs are merged into blocks over all their modalities' experts, dense-masked (zeros in the
// columns of other modalities' experts). Every GEMM runs through ATen on a contiguous row block (no gather,
// no scatter), and gates, softmax and scaling live in row passes between the GEMMs:
//   forward:  per block [S | L] = u [A; R]^T, row pass -> H (dense, [T, E*r]) next to x,
//             y = [x | H] [W | B_cat]^T + b (one GEMM over all tokens)
//   backward: dx0 = dy W; per block dH = dy B, row pass -> [dS | dL], dx (or d lora_input) += [dS | dL] [A; R],
//             [dA; dR] += [dS | dL]^T u; dB_cat = dy^T H (one GEMM).
// The forward returns the shrink [S | L] too: the backward reuses it instead of recomputing it.
#include <algorithm>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"

namespace mode_kernels {
namespace {

// Rows per task in the row passes (each row is a few dozen values).
constexpr int64_t kRowGrain = 256;
// Runs of one modality shorter than this are merged into dense-masked blocks: a GEMM on a few rows costs
// more in calls than the masked columns cost in flops.
constexpr int64_t kMinRun = 32;

struct Experts {
  std::vector<int64_t> first, count;  // per modality
  int64_t total = 0, rank = 0;

  Experts(const std::vector<int64_t>& per_modality, int64_t rank_) : rank(rank_) {
    for (int64_t n : per_modality) {
      TORCH_CHECK(n >= 1, "routed_lora: every modality needs at least one expert");
      first.push_back(total);
      count.push_back(n);
      total += n;
    }
  }
};

// Tokens [t0, t1) whose adapter GEMMs use the columns of experts [e_lo, e_hi) only (their modalities' own).
// With `routed`, the block's shrink has the router logits of those experts after their A columns.
struct Block {
  int64_t t0, t1, e_lo, e_hi;
  bool routed;
  int64_t a_cols(int64_t rank) const { return (e_hi - e_lo) * rank; }
  int64_t cols(int64_t rank) const { return a_cols(rank) + (routed ? e_hi - e_lo : 0); }
};

// Modality id of every token, from the plan's order and offsets.
std::vector<int64_t> token_modality(const at::Tensor& order, const at::Tensor& offsets, int64_t num_tokens) {
  auto ord = order.to(at::kLong).contiguous();
  auto off = offsets.to(at::kLong).contiguous();
  const int64_t* o = ord.data_ptr<int64_t>();
  const int64_t* f = off.data_ptr<int64_t>();
  const int64_t num_modalities = off.numel() - 1;
  TORCH_CHECK(ord.numel() == num_tokens && f[0] == 0 && f[num_modalities] == num_tokens,
              "routed_lora: the routing plan does not cover the ", num_tokens, " tokens");
  std::vector<int64_t> ids(num_tokens, -1);
  for (int64_t m = 0; m < num_modalities; ++m) {
    for (int64_t i = f[m]; i < f[m + 1]; ++i) {
      TORCH_CHECK(o[i] >= 0 && o[i] < num_tokens && ids[o[i]] < 0, "routed_lora: malformed routing plan");
      ids[o[i]] = m;
    }
  }
  return ids;
}

// Runs of one modality of at least kMinRun tokens, each a block; the tokens between them in blocks over the
// experts of all the modalities they hold.
std::vector<Block> token_blocks(const std::vector<int64_t>& ids, const Experts& ex, bool routed) {
  std::vector<Block> blocks;
  const int64_t num_tokens = static_cast<int64_t>(ids.size());
  int64_t mixed_start = 0;
  auto close_mixed = [&](int64_t end) {
    if (end <= mixed_start) return;
    int64_t lo = ex.total, hi = 0;
    for (int64_t t = mixed_start; t < end; ++t) {
      lo = std::min(lo, ex.first[ids[t]]);
      hi = std::max(hi, ex.first[ids[t]] + ex.count[ids[t]]);
    }
    blocks.push_back({mixed_start, end, lo, hi, routed && hi - lo > 1});
  };
  for (int64_t t0 = 0; t0 < num_tokens;) {
    int64_t t1 = t0 + 1;
    while (t1 < num_tokens && ids[t1] == ids[t0]) ++t1;
    if (t1 - t0 >= kMinRun) {
      close_mixed(t0);
      const int64_t m = ids[t0];
      blocks.push_back({t0, t1, ex.first[m], ex.first[m] + ex.count[m], routed && ex.count[m] > 1});
      mixed_start = t1;
    }
    t0 = t1;
  }
  close_mixed(num_tokens);
  return blocks;
}

// What the forward and the backward share: operands in the acc dtype, the blocks and each block's [A; R] rows.
struct Operands {
  at::Tensor u, a, router;  // a: [E*r, K]; router: [E, K] or undefined
  std::vector<int64_t> ids;
  std::vector<Block> blocks;
  std::map<std::pair<int64_t, int64_t>, at::Tensor> a_router;  // per expert range: [A rows; R rows], [cols, K]
  int64_t width = 0;  // columns of the shrink buffer: E*r (+ E with a router), what the widest block can use

  const at::Tensor& block_a(const Block& b) const { return a_router.at({b.e_lo, b.e_hi}); }
};

Operands operands(const at::Tensor& x_acc, const c10::optional<at::Tensor>& lora_input, const at::Tensor& order,
                  const at::Tensor& offsets, const at::Tensor& lora_a, const c10::optional<at::Tensor>& router_weight,
                  const Experts& ex) {
  Operands op;
  const int64_t k = x_acc.size(1), r = ex.rank;
  const bool routed = router_weight.has_value();
  for (int64_t n : ex.count) TORCH_CHECK(n == 1 || routed, "routed_lora: router_weight is required");
  op.u = lora_input.has_value() ? to_acc(*lora_input) : x_acc;
  op.ids = token_modality(order, offsets, x_acc.size(0));
  op.blocks = token_blocks(op.ids, ex, routed);
  op.a = lora_a.to(x_acc.scalar_type()).reshape({ex.total * r, k});
  if (routed) op.router = router_weight->to(x_acc.scalar_type());
  op.width = ex.total * r + (routed ? ex.total : 0);
  for (const Block& b : op.blocks) {
    auto& rows = op.a_router[{b.e_lo, b.e_hi}];
    if (rows.defined()) continue;
    auto a_rows = op.a.narrow(0, b.e_lo * r, b.a_cols(r));
    rows = b.routed ? at::cat({a_rows, op.router.narrow(0, b.e_lo, b.e_hi - b.e_lo)}, 0) : a_rows.contiguous();
  }
  return op;
}

// The shrink of every block, [S | L] = u [A; R]^T, into the first b.cols() columns of its rows of a [T, width]
// buffer (the rest of a row is unused).
at::Tensor shrink(const Operands& op, int64_t rank) {
  auto s = at::empty({op.u.size(0), op.width}, op.u.options());
  for (const Block& b : op.blocks) {
    mm_into(s.narrow(0, b.t0, b.t1 - b.t0).narrow(1, 0, b.cols(rank)), op.u.narrow(0, b.t0, b.t1 - b.t0),
            op.block_a(b).t());
  }
  return s;
}

// One token's gates over its experts [e0, e1): softmax of their router logits (1 for a single expert).
template <typename scalar_t>
void token_gates(const scalar_t* logits, scalar_t* gates, int64_t e0, int64_t e1) {
  if (e1 - e0 == 1) {
    gates[e0] = 1;
    return;
  }
  scalar_t mx = -std::numeric_limits<scalar_t>::infinity(), sum = 0;
  for (int64_t i = e0; i < e1; ++i) mx = std::max(mx, logits[i]);
  for (int64_t i = e0; i < e1; ++i) sum += (gates[i] = std::exp(logits[i] - mx));
  for (int64_t i = e0; i < e1; ++i) gates[i] /= sum;
}

// Calls body(t, e0, e1, a_shift, l_shift) for every token t, in parallel over each block's rows: [e0, e1) are
// the token's experts; in a row of the block's shrink layout, expert i's columns start at a_shift + i * r and
// its router logit is at l_shift + i.
template <typename F>
void for_each_token(const Operands& op, const Experts& ex, const F& body) {
  const int64_t r = ex.rank;
  for (const Block& b : op.blocks) {
    at::parallel_for(b.t0, b.t1, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = op.ids[t], e0 = ex.first[m];
        body(t, e0, e0 + ex.count[m], -b.e_lo * r, b.a_cols(r) - b.e_lo);
      }
    });
  }
}

// Row pass: gates [T, E] (0 outside each token's experts) and H = scaling g S on each token's own experts'
// columns, 0 on the others, written into h (a [T, E*r] view, possibly inside a wider buffer).
at::Tensor gate_rows(const Operands& op, const Experts& ex, const at::Tensor& s, double scaling, at::Tensor h) {
  const int64_t r = ex.rank, er = ex.total * r, e = ex.total;
  auto gates = at::zeros({s.size(0), e}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "routed_lora_gates", [&] {
    scalar_t* g = gates.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    const scalar_t* s0 = s.data_ptr<scalar_t>();
    const int64_t h_stride = h.stride(0), s_stride = s.stride(0);
    const scalar_t sc = static_cast<scalar_t>(scaling);
    for_each_token(op, ex, [&](int64_t t, int64_t e0, int64_t e1, int64_t a_shift, int64_t l_shift) {
      const scalar_t* sa = s0 + t * s_stride + a_shift;
      scalar_t* grow = g + t * e;
      token_gates(s0 + t * s_stride + l_shift, grow, e0, e1);
      scalar_t* hrow = out + t * h_stride;
      std::fill(hrow, hrow + er, scalar_t(0));
      for (int64_t i = e0; i < e1; ++i) {
        const scalar_t w = grow[i] * sc;
        for (int64_t j = i * r; j < (i + 1) * r; ++j) hrow[j] = sa[j] * w;
      }
    });
  });
  return gates;
}

// B_cat [N, E*r]: the adapters' up-projections side by side.
at::Tensor b_cat(const at::Tensor& lora_b, at::ScalarType acc) {
  return lora_b.to(acc).permute({1, 0, 2}).reshape({lora_b.size(1), lora_b.size(0) * lora_b.size(2)});
}

at::Tensor rows_of(const at::Tensor& t, const Block& b) { return t.narrow(0, b.t0, b.t1 - b.t0); }

}  // namespace

// (y, the shrink [S | L] the backward reuses: [T, E*r (+ E)], each block in the first columns of its rows).
std::vector<at::Tensor> routed_lora_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& lora_input, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
    const std::vector<int64_t>& experts_per_modality, double scaling) {
  const Experts ex(experts_per_modality, lora_a.size(1));
  const int64_t k = x.size(1), er = ex.total * ex.rank;
  auto xa = to_acc(x);
  const Operands op = operands(xa, lora_input, order, offsets, lora_a, router_weight, ex);
  auto s = shrink(op, ex.rank);
  // [x | H] in one buffer, so that the base and the adapters' output are one GEMM.
  auto x_h = at::empty({x.size(0), k + er}, xa.options());
  x_h.narrow(1, 0, k).copy_(xa);
  gate_rows(op, ex, s, scaling, x_h.narrow(1, k, er));
  auto w_b = at::cat({weight.to(xa.scalar_type()), b_cat(lora_b, xa.scalar_type())}, 1);  // [W | B_cat]
  auto y = bias.has_value() ? at::addmm(bias->to(xa.scalar_type()), x_h, w_b.t()) : at::mm(x_h, w_b.t());
  return {y.to(x.scalar_type()), s};
}

// Gradients (dx, d lora_input, d weight, d bias, d lora_a, d lora_b, d router_weight); undefined where
// `needs` is false. Without lora_input the adapters' input gradient is part of dx. `saved_shrink`: the
// forward's second output (recomputed when not given).
std::vector<at::Tensor> routed_lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& lora_input, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
    const std::vector<int64_t>& experts_per_modality, double scaling, const std::vector<bool>& needs,
    const c10::optional<at::Tensor>& saved_shrink) {
  TORCH_CHECK(needs.size() == 7, "routed_lora_backward: expected 7 flags in needs");
  const bool need_x = needs[0], need_u = needs[1], need_w = needs[2], need_bias = needs[3], need_a = needs[4],
             need_b = needs[5], need_r = needs[6] && router_weight.has_value();
  const Experts ex(experts_per_modality, lora_a.size(1));
  const int64_t r = ex.rank, er = ex.total * r, e = ex.total, num_tokens = x.size(0);
  auto xa = to_acc(x);
  auto dy = to_acc(grad_y);
  const Operands op = operands(xa, lora_input, order, offsets, lora_a, router_weight, ex);
  const auto s = saved_shrink.has_value() ? *saved_shrink : shrink(op, r);
  TORCH_CHECK(s.size(0) == num_tokens && s.size(1) == op.width && s.scalar_type() == xa.scalar_type(),
              "routed_lora_backward: the saved shrink does not match the inputs");
  auto h = at::empty({num_tokens, er}, xa.options());
  const auto gates = gate_rows(op, ex, s, scaling, h);

  // Per block dH = dy B over its experts' columns (into the first a_cols of its rows), then a row pass:
  // [dS | dL] (same layout as the shrink), dS = scaling g dH, dL the router logits' gradient via the softmax.
  const auto bc = b_cat(lora_b, xa.scalar_type());
  auto d_h = at::empty({num_tokens, er}, xa.options());
  for (const Block& b : op.blocks) {
    mm_into(rows_of(d_h, b).narrow(1, 0, b.a_cols(r)), rows_of(dy, b), bc.narrow(1, b.e_lo * r, b.a_cols(r)));
  }
  auto d_s = at::zeros({num_tokens, op.width}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "routed_lora_gate_backward", [&] {
    const scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* dh = d_h.data_ptr<scalar_t>();
    const scalar_t* s0 = s.data_ptr<scalar_t>();
    scalar_t* ds0 = d_s.data_ptr<scalar_t>();
    const int64_t s_stride = s.stride(0);
    const scalar_t sc = static_cast<scalar_t>(scaling);
    // d_s and dH rows in the shrink's layout (dH: its A columns only).
    for_each_token(op, ex, [&](int64_t t, int64_t e0, int64_t e1, int64_t a_shift, int64_t l_shift) {
      const scalar_t* sa = s0 + t * s_stride + a_shift;
      const scalar_t* dha = dh + t * er + a_shift;
      scalar_t* dsa = ds0 + t * op.width + a_shift;
      scalar_t* dl = ds0 + t * op.width + l_shift;
      const scalar_t* grow = g + t * e;
      scalar_t weighted = 0;
      for (int64_t i = e0; i < e1; ++i) {
        scalar_t d_gate = 0;
        for (int64_t j = i * r; j < (i + 1) * r; ++j) {
          d_gate += dha[j] * sa[j];
          dsa[j] = dha[j] * grow[i] * sc;
        }
        if (e1 - e0 > 1) {
          dl[i] = d_gate * sc;
          weighted += grow[i] * d_gate * sc;
        }
      }
      if (e1 - e0 > 1) {
        for (int64_t i = e0; i < e1; ++i) dl[i] = grow[i] * (dl[i] - weighted);
      }
    });
  });

  at::Tensor dx, du, dw, dbias, da, db, dr;
  if (need_x) dx = at::mm(dy, weight.to(xa.scalar_type()));
  if (need_x || need_u) {
    // Without lora_input the adapters' input is x: their input gradient goes straight into dx.
    const bool into_dx = !lora_input.has_value() && need_x;
    at::Tensor target = into_dx ? dx : at::empty_like(op.u);
    for (const Block& b : op.blocks) {  // the blocks cover every token once
      const auto d_block = rows_of(d_s, b).narrow(1, 0, b.cols(r));
      if (into_dx) rows_of(target, b).addmm_(d_block, op.block_a(b));
      else mm_into(rows_of(target, b), d_block, op.block_a(b));
    }
    if (lora_input.has_value()) du = target;
  }
  if (need_a || need_r) {
    // [dA; dR] per expert range, then added into the experts' rows (a range can recur in several blocks).
    std::map<std::pair<int64_t, int64_t>, std::pair<Block, at::Tensor>> d_ar;
    for (const Block& b : op.blocks) {
      auto& [range, sum] = d_ar[{b.e_lo, b.e_hi}];
      auto grad = at::mm(rows_of(d_s, b).narrow(1, 0, b.cols(r)).t(), rows_of(op.u, b));
      range = b;
      sum = sum.defined() ? sum.add_(grad) : grad;
    }
    auto d_a = at::zeros_like(op.a);
    auto d_router = router_weight.has_value() ? at::zeros_like(op.router) : at::Tensor();
    for (const auto& [key, range_grad] : d_ar) {
      const auto& [b, grad] = range_grad;
      d_a.narrow(0, b.e_lo * r, b.a_cols(r)).add_(grad.narrow(0, 0, b.a_cols(r)));
      if (b.routed) d_router.narrow(0, b.e_lo, b.e_hi - b.e_lo).add_(grad.narrow(0, b.a_cols(r), b.e_hi - b.e_lo));
    }
    if (need_a) da = d_a.reshape(lora_a.sizes()).to(lora_a.scalar_type());
    if (need_r) dr = d_router.to(router_weight->scalar_type());
  }
  if (need_b) {
    // One GEMM over the dense H (zeros outside each token's experts): per block it was no faster here.
    auto d_bcat = at::mm(dy.t(), h);
    db = d_bcat.view({lora_b.size(1), e, r}).permute({1, 0, 2}).contiguous().to(lora_b.scalar_type());
  }
  if (need_w) dw = at::mm(dy.t(), xa).to(weight.scalar_type());
  if (need_bias) dbias = dy.sum(0).to(bias->scalar_type());
  if (need_x) dx = dx.to(x.scalar_type());
  if (need_u) du = du.to(lora_input->scalar_type());
  return {dx, need_u ? du : at::Tensor(), dw, dbias, da, db, dr};
}

}  // namespace mode_kernels
