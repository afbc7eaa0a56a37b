// Modality-routed LoRA on CPU, forward and backward, in token order.
//
// For a token t of modality m with experts S_m (experts ordered by modality):
//   g = softmax over S_m of u_t R[S_m]^T (g = 1 for one expert), H[t, e*r:(e+1)*r] = scaling g_e u_t A_e^T
//   y_t = x_t W^T + b + H_t B_cat^T,   B_cat[n, e*r + j] = lora_b[e, n, j]
// Tokens come in blocks of consecutive tokens (see Block): a run of one modality's tokens is one block and
// its adapter GEMMs use only that modality's experts' columns (text: its experts and router; image: its
// expert); short runs are merged into blocks over all their modalities' experts, dense-masked (zeros in the
// columns of other modalities' experts). Every GEMM runs through ATen on a contiguous row block (no gather,
// no scatter), and gates, softmax and scaling live in token passes between the GEMMs. The per-block buffers
// (shrink, H, dH, [dS | dL]) are rank-major, [width, T]: a block's values in the first rows of its tokens'
// columns (B_blk, [A; R]_blk: the block's experts' columns of B_cat, rows of [A; R]):
//   forward:  y = x W^T + b (the base GEMM alone, as the frozen linear), then per block
//             [S | L]^T = [A; R]_blk u^T, token pass -> H^T, y += H B_blk^T
//   backward: dx = dy W; per block dH^T = B_blk^T dy^T, token pass -> [dS | dL]^T,
//             dx (or d lora_input) += [dS | dL] [A; R]_blk, [dA; dR]_blk += [dS | dL]^T u, dB_blk^T += H^T dy.
// Measured with MKL at T=2048, K=512, N=1376 (1 thread): the separate expand beats one GEMM over [x | H] and
// [W | B_cat] (no copy of x, no concatenated weight, no columns of the other modality's experts), per-block dB
// beats one dense GEMM, and the rank-major layout beats token-major for these skinny GEMMs (3x for dH at r=8).
// The forward returns the shrink [S | L] too: the backward reuses it instead of recomputing it.
#include <algorithm>
#include <array>
#include <map>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"

namespace mode_kernels {
namespace {

// Tokens per task in the token passes (each token has a few dozen values), and per span within a task (the
// passes keep a few values per token of a span on the stack).
constexpr int64_t kTokenGrain = 256;
constexpr int64_t kSpan = 128;
// Tokens per piece of a block in the backward's dH and dB GEMMs (see for_each_piece): measured at T=2048,
// K=512, N=1376 (1 thread), 64 beat whole blocks by about 3%.
constexpr int64_t kDyPiece = 64;
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
// With `routed`, the block's shrink has the router logits of those experts after their A rows.
struct Block {
  int64_t t0, t1, e_lo, e_hi;
  bool routed;
  int64_t a_cols(int64_t rank) const { return (e_hi - e_lo) * rank; }
  int64_t cols(int64_t rank) const { return a_cols(rank) + (routed ? e_hi - e_lo : 0); }
  // In the block's layout (see block_of), expert i's values are in rows a_shift + i * r onwards and its router
  // logit in row l_shift + i.
  int64_t a_shift(int64_t rank) const { return -e_lo * rank; }
  int64_t l_shift(int64_t rank) const { return a_cols(rank) - e_lo; }
  // Whether a token with experts [e0, e1) leaves some of the block's rows to other modalities' experts.
  bool masks(int64_t e0, int64_t e1) const { return e1 - e0 != e_hi - e_lo; }
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
  int64_t width = 0;  // rows of the shrink buffer: E*r (+ E with a router), what the widest block can use

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

// A block's part of a rank-major [width, T] buffer: its first `rows` rows, its tokens' columns.
at::Tensor block_of(const at::Tensor& t, const Block& b, int64_t rows) {
  return t.narrow(0, 0, rows).narrow(1, b.t0, b.t1 - b.t0);
}

at::Tensor rows_of(const at::Tensor& t, const Block& b) { return t.narrow(0, b.t0, b.t1 - b.t0); }

// The shrink of every block, [S | L]^T = [A; R]_blk u^T, rank-major [width, T] (see block_of).
at::Tensor shrink(const Operands& op, int64_t rank) {
  auto s = at::empty({op.width, op.u.size(0)}, op.u.options());
  for (const Block& b : op.blocks) mm_into(block_of(s, b, b.cols(rank)), op.block_a(b), rows_of(op.u, b).t());
  return s;
}

// Calls body(piece) on consecutive pieces of at most `tokens` tokens of every block (each a Block of the same
// experts).
template <typename F>
void for_each_piece(const std::vector<Block>& blocks, int64_t tokens, const F& body) {
  for (const Block& b : blocks) {
    for (int64_t t0 = b.t0; t0 < b.t1; t0 += tokens) {
      Block piece = b;
      piece.t0 = t0;
      piece.t1 = std::min(b.t1, t0 + tokens);
      body(piece);
    }
  }
}

// Calls body(t0, t1, e0, e1, b) on spans [t0, t1) of at most kSpan consecutive tokens of one block b that share
// their experts [e0, e1) (a one-modality block: whole spans; a mixed block: its one-modality runs), in parallel.
// The bodies loop over a span's tokens innermost: contiguous in the rank-major buffers, so they vectorise.
template <typename F>
void for_each_span(const Operands& op, const Experts& ex, const F& body) {
  for (const Block& b : op.blocks) {
    at::parallel_for(b.t0, b.t1, kTokenGrain, [&](int64_t c0, int64_t c1) {
      for (int64_t t0 = c0; t0 < c1;) {
        const int64_t m = op.ids[t0];
        int64_t t1 = t0 + 1;
        while (t1 < c1 && t1 - t0 < kSpan && op.ids[t1] == m) ++t1;
        body(t0, t1, ex.first[m], ex.first[m] + ex.count[m], b);
        t0 = t1;
      }
    });
  }
}

// Token pass: gates^T [E, T] (set on each token's experts only) and H^T [E*r, T] (rank-major, like the shrink):
// g = softmax of the token's experts' router logits (1 for a single expert), H = scaling g S on each token's own
// experts' rows, 0 on the other rows of its block.
at::Tensor gate_rows(const Operands& op, const Experts& ex, const at::Tensor& s, double scaling, at::Tensor& h) {
  const int64_t r = ex.rank, ld = s.size(1);
  TORCH_CHECK(h.size(1) == ld && s.is_contiguous() && h.is_contiguous(), "routed_lora: bad rank-major buffers");
  auto gates = at::empty({ex.total, ld}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "routed_lora_gates", [&] {
    const scalar_t sc = static_cast<scalar_t>(scaling);
    for_each_span(op, ex, [&](int64_t t0, int64_t t1, int64_t e0, int64_t e1, const Block& b) {
      const int64_t n = t1 - t0;
      scalar_t* g = gates.data_ptr<scalar_t>() + t0;  // row i: g + i * ld
      scalar_t* hs = h.data_ptr<scalar_t>() + t0;
      const scalar_t* ss = s.data_ptr<scalar_t>() + t0;
      if (b.masks(e0, e1)) {
        for (int64_t j = 0; j < b.a_cols(r); ++j) std::fill(hs + j * ld, hs + j * ld + n, scalar_t(0));
      }
      if (e1 - e0 == 1) {
        std::fill(g + e0 * ld, g + e0 * ld + n, scalar_t(1));
      } else {
        const scalar_t* logits = ss + b.l_shift(r) * ld;
        std::array<scalar_t, kSpan> mx, sum;
        std::fill(mx.begin(), mx.begin() + n, -std::numeric_limits<scalar_t>::infinity());
        std::fill(sum.begin(), sum.begin() + n, scalar_t(0));
        for (int64_t i = e0; i < e1; ++i) {
          for (int64_t t = 0; t < n; ++t) mx[t] = std::max(mx[t], logits[i * ld + t]);
        }
        for (int64_t i = e0; i < e1; ++i) {
          for (int64_t t = 0; t < n; ++t) sum[t] += (g[i * ld + t] = std::exp(logits[i * ld + t] - mx[t]));
        }
        for (int64_t i = e0; i < e1; ++i) {
          for (int64_t t = 0; t < n; ++t) g[i * ld + t] /= sum[t];
        }
      }
      const int64_t shift = b.a_shift(r);
      for (int64_t i = e0; i < e1; ++i) {
        for (int64_t j = (shift + i * r) * ld; j < (shift + (i + 1) * r) * ld; j += ld) {
          for (int64_t t = 0; t < n; ++t) hs[j + t] = ss[j + t] * g[i * ld + t] * sc;
        }
      }
    });
  });
  return gates;
}

// Token pass of the backward: [dS | dL]^T [width, T] from dH^T (the shrink's layout): dS = scaling g dH on each
// token's own experts' rows, dL = g (d_gate - sum_i g_i d_gate_i) with d_gate = scaling dH . S (the softmax's
// gradient), 0 on the other rows of its block.
at::Tensor gate_grad_rows(const Operands& op, const Experts& ex, const at::Tensor& s, const at::Tensor& gates,
                          const at::Tensor& d_h, double scaling) {
  const int64_t r = ex.rank, ld = s.size(1);
  auto d_s = at::empty({op.width, ld}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "routed_lora_gate_backward", [&] {
    const scalar_t sc = static_cast<scalar_t>(scaling);
    for_each_span(op, ex, [&](int64_t t0, int64_t t1, int64_t e0, int64_t e1, const Block& b) {
      const int64_t n = t1 - t0;
      const scalar_t* g = gates.data_ptr<scalar_t>() + t0;
      const scalar_t* ss = s.data_ptr<scalar_t>() + t0;
      const scalar_t* dhs = d_h.data_ptr<scalar_t>() + t0;
      scalar_t* dss = d_s.data_ptr<scalar_t>() + t0;
      if (b.masks(e0, e1)) {
        for (int64_t j = 0; j < b.cols(r); ++j) std::fill(dss + j * ld, dss + j * ld + n, scalar_t(0));
      }
      const bool routed = e1 - e0 > 1;
      const int64_t shift = b.a_shift(r);
      scalar_t* dl = routed ? dss + b.l_shift(r) * ld : nullptr;  // row i: the logit gradient of expert i
      for (int64_t i = e0; i < e1; ++i) {
        if (routed) std::fill(dl + i * ld, dl + i * ld + n, scalar_t(0));
        for (int64_t j = (shift + i * r) * ld; j < (shift + (i + 1) * r) * ld; j += ld) {
          for (int64_t t = 0; t < n; ++t) {
            if (routed) dl[i * ld + t] += dhs[j + t] * ss[j + t];
            dss[j + t] = dhs[j + t] * g[i * ld + t] * sc;
          }
        }
      }
      if (routed) {
        std::array<scalar_t, kSpan> weighted;
        std::fill(weighted.begin(), weighted.begin() + n, scalar_t(0));
        for (int64_t i = e0; i < e1; ++i) {
          for (int64_t t = 0; t < n; ++t) weighted[t] += g[i * ld + t] * (dl[i * ld + t] *= sc);
        }
        for (int64_t i = e0; i < e1; ++i) {
          for (int64_t t = 0; t < n; ++t) dl[i * ld + t] = g[i * ld + t] * (dl[i * ld + t] - weighted[t]);
        }
      }
    });
  });
  return d_s;
}

// B_cat [N, E*r]: the adapters' up-projections side by side.
at::Tensor b_cat(const at::Tensor& lora_b, at::ScalarType acc) {
  return lora_b.to(acc).permute({1, 0, 2}).reshape({lora_b.size(1), lora_b.size(0) * lora_b.size(2)});
}

// The block's experts' columns of B_cat.
at::Tensor block_b(const at::Tensor& bc, const Block& b, int64_t rank) {
  return bc.narrow(1, b.e_lo * rank, b.a_cols(rank));
}

}  // namespace

// (y, the shrink [S | L]^T the backward reuses: rank-major [E*r (+ E), T], see block_of).
std::vector<at::Tensor> routed_lora_forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& lora_input, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
    const std::vector<int64_t>& experts_per_modality, double scaling) {
  // Nothing made here is differentiated (the op layer's autograd function owns the gradients): without view
  // tracking the dozens of narrow views per call cost less (measured at T=512 with K=N=16, 1 thread: the
  // forward + backward's fixed cost 0.60 -> 0.39 ms).
  const at::AutoDispatchBelowADInplaceOrView internal_views;
  const Experts ex(experts_per_modality, lora_a.size(1));
  const int64_t r = ex.rank;
  auto xa = to_acc(x);
  const auto acc = xa.scalar_type();
  const Operands op = operands(xa, lora_input, order, offsets, lora_a, router_weight, ex);
  auto s = shrink(op, r);
  auto h = at::empty({ex.total * r, x.size(0)}, xa.options());
  gate_rows(op, ex, s, scaling, h);
  const auto w_t = weight.to(acc).t();
  auto y = bias.has_value() ? at::addmm(bias->to(acc), xa, w_t) : at::mm(xa, w_t);
  const auto bc = b_cat(lora_b, acc);
  for (const Block& b : op.blocks) rows_of(y, b).addmm_(block_of(h, b, b.a_cols(r)).t(), block_b(bc, b, r).t());
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
  const at::AutoDispatchBelowADInplaceOrView internal_views;  // as in the forward
  const bool need_x = needs[0], need_u = needs[1], need_w = needs[2], need_bias = needs[3], need_a = needs[4],
             need_b = needs[5], need_r = needs[6] && router_weight.has_value();
  const Experts ex(experts_per_modality, lora_a.size(1));
  const int64_t r = ex.rank, er = ex.total * r, e = ex.total, num_tokens = x.size(0);
  auto xa = to_acc(x);
  auto dy = to_acc(grad_y);
  const Operands op = operands(xa, lora_input, order, offsets, lora_a, router_weight, ex);
  const auto s = saved_shrink.has_value() ? *saved_shrink : shrink(op, r);
  TORCH_CHECK(s.size(0) == op.width && s.size(1) == num_tokens && s.scalar_type() == xa.scalar_type() &&
                  s.is_contiguous(),
              "routed_lora_backward: the saved shrink does not match the inputs");
  auto h = at::empty({er, num_tokens}, xa.options());
  const auto gates = gate_rows(op, ex, s, scaling, h);

  // Per piece of a block dH^T = B_blk^T dy^T and dB_cat^T [E*r, N] += H^T dy (the second GEMM finds the piece's
  // rows of dy in cache), then a token pass: [dS | dL]^T (the shrink's layout), dS = scaling g dH, dL the router
  // logits' gradient via the softmax.
  const auto bc = b_cat(lora_b, xa.scalar_type());
  auto d_h = at::empty({er, num_tokens}, xa.options());
  at::Tensor d_bcat_t;
  if (need_b) d_bcat_t = at::zeros({er, lora_b.size(1)}, xa.options());
  for_each_piece(op.blocks, kDyPiece, [&](const Block& b) {
    mm_into(block_of(d_h, b, b.a_cols(r)), block_b(bc, b, r).t(), rows_of(dy, b).t());
    if (need_b) d_bcat_t.narrow(0, b.e_lo * r, b.a_cols(r)).addmm_(block_of(h, b, b.a_cols(r)), rows_of(dy, b));
  });
  const auto d_s = gate_grad_rows(op, ex, s, gates, d_h, scaling);

  at::Tensor dx, du, dw, dbias, da, db, dr;
  if (need_x) dx = at::mm(dy, weight.to(xa.scalar_type()));
  if (need_x || need_u) {
    // Without lora_input the adapters' input is x: their input gradient goes straight into dx.
    const bool into_dx = !lora_input.has_value() && need_x;
    at::Tensor target = into_dx ? dx : at::empty_like(op.u);
    for (const Block& b : op.blocks) {  // the blocks cover every token once
      const auto d_block = block_of(d_s, b, b.cols(r)).t();
      if (into_dx) rows_of(target, b).addmm_(d_block, op.block_a(b));
      else mm_into(rows_of(target, b), d_block, op.block_a(b));
    }
    if (lora_input.has_value()) du = target;
  }
  if (need_a || need_r) {
    // [dA; dR] of a block, added into its experts' rows (an expert range can recur in several blocks).
    auto d_a = at::zeros_like(op.a);
    auto d_router = router_weight.has_value() ? at::zeros_like(op.router) : at::Tensor();
    for (const Block& b : op.blocks) {
      const auto grad = at::mm(block_of(d_s, b, b.cols(r)), rows_of(op.u, b));
      d_a.narrow(0, b.e_lo * r, b.a_cols(r)).add_(grad.narrow(0, 0, b.a_cols(r)));
      if (b.routed) d_router.narrow(0, b.e_lo, b.e_hi - b.e_lo).add_(grad.narrow(0, b.a_cols(r), b.e_hi - b.e_lo));
    }
    if (need_a) da = d_a.reshape(lora_a.sizes()).to(lora_a.scalar_type());
    if (need_r) dr = d_router.to(router_weight->scalar_type());
  }
  if (need_b) db = d_bcat_t.view({e, r, lora_b.size(1)}).transpose(1, 2).contiguous().to(lora_b.scalar_type());
  if (need_w) dw = at::mm(dy.t(), xa).to(weight.scalar_type());
  if (need_bias) dbias = dy.sum(0).to(bias->scalar_type());
  if (need_x) dx = dx.to(x.scalar_type());
  if (need_u) du = du.to(lora_input->scalar_type());
  return {dx, need_u ? du : at::Tensor(), dw, dbias, da, db, dr};
}

}  // namespace mode_kernels
