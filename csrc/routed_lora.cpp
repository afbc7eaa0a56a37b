// Modality-routed LoRA on CPU, forward and backward, in token order with dense-masked adapter columns.
//
// For a token t of modality m with experts S_m (experts ordered by modality):
//   g = softmax over S_m of u_t R[S_m]^T (g = 1 for one expert), H[t, e*r:(e+1)*r] = scaling g_e u_t A_e^T
//   y_t = x_t W^T + b + H_t B_cat^T,   B_cat[n, e*r + j] = lora_b[e, n, j]
// H is [T, E*r] in token order with zeros in the columns of other modalities' experts, so every GEMM runs
// through ATen on whole contiguous blocks (no gather, no scatter, no per-expert loop), and gates, softmax
// and scaling live in one row pass between the GEMMs:
//   forward:  [S | L] = u [A_cat; R]^T (one GEMM), row pass -> H next to x, y = [x | H] [W | B_cat]^T + b (one GEMM)
//   backward: dx0 = dy W, dH = dy B_cat, dB_cat = dy^T H, row pass -> [dS | dL],
//             dx (or d lora_input) += [dS | dL] [A_cat; R], [dA_cat; dR] = [dS | dL]^T u.
#include <tuple>
#include <vector>

#include "common.h"
#include "ops.h"

namespace mode_kernels {
namespace {

// Rows per task in the row passes (each row is a few dozen values).
constexpr int64_t kRowGrain = 256;

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

// What the forward and the backward share: operands in the acc dtype and the shrink [S | L] = u [A_cat; R]^T.
struct Shrink {
  at::Tensor u, a_router, s_logits;  // a_router: [E*r (+ E), K]; s_logits: [T, E*r (+ E)]
  std::vector<int64_t> ids;
  bool routed = false;
};

Shrink shrink(const at::Tensor& x_acc, const c10::optional<at::Tensor>& lora_input, const at::Tensor& order,
              const at::Tensor& offsets, const at::Tensor& lora_a, const c10::optional<at::Tensor>& router_weight,
              const Experts& ex) {
  Shrink sh;
  const int64_t k = x_acc.size(1), er = ex.total * ex.rank;
  sh.u = lora_input.has_value() ? to_acc(*lora_input) : x_acc;
  sh.ids = token_modality(order, offsets, x_acc.size(0));
  sh.routed = router_weight.has_value();
  for (int64_t n : ex.count) TORCH_CHECK(n == 1 || sh.routed, "routed_lora: router_weight is required");
  auto a = lora_a.to(x_acc.scalar_type()).reshape({er, k});
  sh.a_router = sh.routed ? at::cat({a, router_weight->to(x_acc.scalar_type())}, 0) : a.contiguous();
  sh.s_logits = at::mm(sh.u, sh.a_router.t());
  return sh;
}

// One token's gates: softmax over its own experts' router logits (1 for a modality with one expert).
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

// Row pass: gates [T, E] (0 outside each token's experts) and H = scaling g S on each token's own experts'
// columns, 0 on the others, written into h (a [T, E*r] view, possibly inside a wider buffer).
at::Tensor gate_rows(const Shrink& sh, const Experts& ex, double scaling, at::Tensor h) {
  const int64_t num_tokens = sh.s_logits.size(0), r = ex.rank, er = ex.total * r, e = ex.total;
  auto gates = at::zeros({num_tokens, e}, sh.s_logits.options());
  AT_DISPATCH_FLOATING_TYPES(sh.s_logits.scalar_type(), "routed_lora_gates", [&] {
    const scalar_t* sl = sh.s_logits.data_ptr<scalar_t>();
    const int64_t sl_stride = sh.s_logits.stride(0), h_stride = h.stride(0);
    scalar_t* g = gates.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scaling);
    at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = sh.ids[t], e0 = ex.first[m], e1 = e0 + ex.count[m];
        const scalar_t* srow = sl + t * sl_stride;
        scalar_t* grow = g + t * e;
        token_gates(srow + er, grow, e0, e1);
        scalar_t* hrow = out + t * h_stride;
        std::fill(hrow, hrow + er, scalar_t(0));
        for (int64_t i = e0; i < e1; ++i) {
          const scalar_t w = grow[i] * sc;
          for (int64_t j = i * r; j < (i + 1) * r; ++j) hrow[j] = srow[j] * w;
        }
      }
    });
  });
  return gates;
}

// B_cat [N, E*r]: the adapters' up-projections side by side.
at::Tensor b_cat(const at::Tensor& lora_b, at::ScalarType acc) {
  return lora_b.to(acc).permute({1, 0, 2}).reshape({lora_b.size(1), lora_b.size(0) * lora_b.size(2)});
}

}  // namespace

at::Tensor routed_lora_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                               const c10::optional<at::Tensor>& lora_input, const at::Tensor& order,
                               const at::Tensor& offsets, const at::Tensor& lora_a, const at::Tensor& lora_b,
                               const c10::optional<at::Tensor>& router_weight,
                               const std::vector<int64_t>& experts_per_modality, double scaling) {
  const Experts ex(experts_per_modality, lora_a.size(1));
  const int64_t k = x.size(1), er = ex.total * ex.rank;
  auto xa = to_acc(x);
  const Shrink sh = shrink(xa, lora_input, order, offsets, lora_a, router_weight, ex);
  // [x | H] in one buffer, so that the base and the adapters' output are one GEMM.
  auto x_h = at::empty({x.size(0), k + er}, xa.options());
  x_h.narrow(1, 0, k).copy_(xa);
  gate_rows(sh, ex, scaling, x_h.narrow(1, k, er));
  auto w_b = at::cat({weight.to(xa.scalar_type()), b_cat(lora_b, xa.scalar_type())}, 1);  // [W | B_cat]
  auto y = bias.has_value() ? at::addmm(bias->to(xa.scalar_type()), x_h, w_b.t()) : at::mm(x_h, w_b.t());
  return y.to(x.scalar_type());
}

// Gradients (dx, d lora_input, d weight, d bias, d lora_a, d lora_b, d router_weight); undefined where
// `needs` is false. Without lora_input the adapters' input gradient is part of dx.
std::vector<at::Tensor> routed_lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& lora_input, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
    const std::vector<int64_t>& experts_per_modality, double scaling, const std::vector<bool>& needs) {
  TORCH_CHECK(needs.size() == 7, "routed_lora_backward: expected 7 flags in needs");
  const bool need_x = needs[0], need_u = needs[1], need_w = needs[2], need_bias = needs[3], need_a = needs[4],
             need_b = needs[5], need_r = needs[6] && router_weight.has_value();
  const Experts ex(experts_per_modality, lora_a.size(1));
  const int64_t r = ex.rank, er = ex.total * r, e = ex.total, num_tokens = x.size(0);
  auto xa = to_acc(x);
  auto dy = to_acc(grad_y);
  const Shrink sh = shrink(xa, lora_input, order, offsets, lora_a, router_weight, ex);
  auto h = at::empty({num_tokens, er}, xa.options());
  const auto gates = gate_rows(sh, ex, scaling, h);

  // dH = dy B_cat. (Unlike the forward's inner dimension, appending B_cat's E*r columns to the base GEMM's
  // output makes MKL handle them at a fraction of its speed: two GEMMs are faster here.)
  const auto d_h = at::mm(dy, b_cat(lora_b, xa.scalar_type()));

  // Row pass: [dS | dL], with dS = scaling g dH and dL the router logits' gradient through the softmax.
  const int64_t width = sh.s_logits.size(1);
  auto d_sl = at::empty({num_tokens, width}, xa.options());
  AT_DISPATCH_FLOATING_TYPES(xa.scalar_type(), "routed_lora_gate_backward", [&] {
    const scalar_t* dh = d_h.data_ptr<scalar_t>();
    scalar_t* out = d_sl.data_ptr<scalar_t>();
    const scalar_t* s = sh.s_logits.data_ptr<scalar_t>();
    const scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scaling);
    at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t m = sh.ids[t], e0 = ex.first[m], e1 = e0 + ex.count[m];
        const scalar_t* dhrow = dh + t * er;
        const scalar_t* srow = s + t * width;
        const scalar_t* grow = g + t * e;
        scalar_t* row = out + t * width;
        std::fill(row, row + width, scalar_t(0));
        scalar_t* dl = row + er;  // only present when routed
        scalar_t weighted = 0;
        for (int64_t i = e0; i < e1; ++i) {
          scalar_t d_gate = 0;
          for (int64_t j = i * r; j < (i + 1) * r; ++j) {
            d_gate += dhrow[j] * srow[j];
            row[j] = dhrow[j] * grow[i] * sc;
          }
          if (e1 - e0 > 1) {
            dl[i] = d_gate * sc;
            weighted += grow[i] * d_gate * sc;
          }
        }
        if (e1 - e0 > 1) {
          for (int64_t i = e0; i < e1; ++i) dl[i] = grow[i] * (dl[i] - weighted);
        }
      }
    });
  });

  at::Tensor dx, du, dw, dbias, da, db, dr;
  if (need_x) dx = at::mm(dy, weight.to(xa.scalar_type()));
  if (need_x || need_u) {
    // Without lora_input the adapters' input is x: their input gradient goes straight into dx.
    at::Tensor target = (!lora_input.has_value() && need_x) ? dx : at::empty_like(sh.u);
    if (target.is_same(dx)) target.addmm_(d_sl, sh.a_router);
    else at::mm_out(target, d_sl, sh.a_router);
    if (lora_input.has_value()) du = target;
  }
  if (need_a || need_r) {
    auto d_ar = at::mm(d_sl.t(), sh.u);
    if (need_a) da = d_ar.narrow(0, 0, er).reshape(lora_a.sizes()).to(lora_a.scalar_type());
    // A copy: outputs of a custom op may not alias each other.
    if (need_r) dr = d_ar.narrow(0, er, e).to(router_weight->scalar_type(), false, /*copy=*/true);
  }
  if (need_b) {
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
