// The native CPU kernels as operators of the `mode_kernels_native` library (torch.ops.mode_kernels_native.*,
// loaded by mode_kernels.native). Registered through torch/library.h rather than bound with pybind11 through
// torch/extension.h: that header pulls in torch's whole C++ frontend and took 28 of the build's 45 CPU seconds
// (this file: 5.5 s), and no Python header is needed at all.
#include <torch/library.h>

#include "ops.h"

namespace {
// The dispatcher passes a bool[] argument as c10::List<bool> (it refuses std::vector<bool>).
std::vector<at::Tensor> routed_lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& lora_input, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
    const std::vector<int64_t>& experts_per_modality, double scaling, const c10::List<bool>& needs,
    const c10::optional<at::Tensor>& saved_shrink) {
  return mode_kernels::routed_lora_backward(grad_y, x, weight, bias, lora_input, order, offsets, lora_a, lora_b,
                                            router_weight, experts_per_modality, scaling, needs.vec(), saved_shrink);
}
}  // namespace

TORCH_LIBRARY(mode_kernels_native, m) {
  m.def("routed_lora_forward", &mode_kernels::routed_lora_forward);
  m.def("routed_lora_backward", &routed_lora_backward);
  m.def("kd_kl_forward", &mode_kernels::kd_kl_forward);
  m.def("kd_kl_backward", &mode_kernels::kd_kl_backward);
  m.def("fused_linear_kd_kl_forward", &mode_kernels::fused_linear_kd_kl_forward);
  m.def("fused_linear_kd_kl_backward", &mode_kernels::fused_linear_kd_kl_backward);
  m.def("kd_teacher_topk", &mode_kernels::kd_teacher_topk);
  m.def("fused_linear_kd_kl_given", &mode_kernels::fused_linear_kd_kl_given);
}
