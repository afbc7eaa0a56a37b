// Python bindings of the native CPU kernels (mode_kernels.native loads this module).
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("routed_lora_forward", &mode_kernels::routed_lora_forward);
  m.def("routed_lora_backward", &mode_kernels::routed_lora_backward);
  m.def("kd_kl_forward", &mode_kernels::kd_kl_forward);
  m.def("kd_kl_backward", &mode_kernels::kd_kl_backward);
  m.def("fused_linear_kd_kl_forward", &mode_kernels::fused_linear_kd_kl_forward);
  m.def("fused_linear_kd_kl_backward", &mode_kernels::fused_linear_kd_kl_backward);
}
