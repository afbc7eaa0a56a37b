// The native CPU kernels' entry points (defined in routed_lora.cpp and kd_kl.cpp, bound in bindings.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace mode_kernels {
std::vector<at::Tensor> routed_lora_forward(const at::Tensor& x, const at::Tensor& weight,
                                            const c10::optional<at::Tensor>& bias,
                                            const c10::optional<at::Tensor>& lora_input, const at::Tensor& order,
                                            const at::Tensor& offsets, const at::Tensor& lora_a,
                                            const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
                                            const std::vector<int64_t>& experts_per_modality, double scaling);
std::vector<at::Tensor> routed_lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& lora_input, const at::Tensor& order, const at::Tensor& offsets,
    const at::Tensor& lora_a, const at::Tensor& lora_b, const c10::optional<at::Tensor>& router_weight,
    const std::vector<int64_t>& experts_per_modality, double scaling, const std::vector<bool>& needs,
    const c10::optional<at::Tensor>& saved_shrink);
std::vector<at::Tensor> kd_kl_forward(const at::Tensor& student, const at::Tensor& teacher,
                                      const c10::optional<at::Tensor>& mask, double temperature, int64_t lo,
                                      int64_t hi);
at::Tensor kd_kl_backward(const at::Tensor& grad_rows, const at::Tensor& student, const at::Tensor& teacher,
                          const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s, const at::Tensor& lse_t,
                          double temperature, int64_t lo, int64_t hi);
std::vector<at::Tensor> fused_linear_kd_kl_forward(const at::Tensor& hs, const at::Tensor& ht, const at::Tensor& ws,
                                                   const c10::optional<at::Tensor>& wt,
                                                   const c10::optional<at::Tensor>& mask, double temperature,
                                                   int64_t lo, int64_t hi, int64_t topk,
                                                   const c10::optional<at::Tensor>& grad_rows);
std::vector<at::Tensor> fused_linear_kd_kl_backward(const at::Tensor& grad_rows, const at::Tensor& hs,
                                                    const at::Tensor& ht, const at::Tensor& ws,
                                                    const c10::optional<at::Tensor>& wt,
                                                    const c10::optional<at::Tensor>& mask, const at::Tensor& lse_s,
                                                    const at::Tensor& lse_t, double temperature, int64_t lo,
                                                    int64_t hi, int64_t topk, bool need_dw);
std::vector<at::Tensor> kd_teacher_topk(const at::Tensor& ht, const at::Tensor& wt, int64_t lo, int64_t hi,
                                        int64_t k, double temperature, bool want_logsumexp);
std::vector<at::Tensor> fused_linear_kd_kl_given(const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& index,
                                                 const at::Tensor& teacher_logits,
                                                 const c10::optional<at::Tensor>& mask, double temperature,
                                                 int64_t lo, int64_t hi, const c10::optional<at::Tensor>& grad_rows,
                                                 bool need_dw);
}  // namespace mode_kernels
