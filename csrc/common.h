// Shared helpers of the native CPU kernels: accumulation dtype and vectorised row loops.
#pragma once

// Per-operator headers instead of ATen/ATen.h: a fraction of the compile time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/topk.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>

#include <cmath>
#include <limits>

namespace mode_kernels {

// Math runs in float32 for float32/bfloat16/float16 inputs and in float64 for float64 (as the reference).
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A contiguous copy of t in the accumulation dtype (no copy when it already is one).
inline at::Tensor to_acc(const at::Tensor& t) {
  return t.to(acc_type(t.scalar_type())).contiguous();
}

// out = a @ b into an existing (possibly strided) view of a larger buffer.
inline void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) {
  at::mm_out(out, a, b);
}

// Rows per chunk so that one [rows, cols] buffer holds about `elements` values (at least one row).
inline int64_t rows_per_chunk(int64_t elements, int64_t cols) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(cols, 1));
}

}  // namespace mode_kernels
