// The schema block of the native ops (one TORCH_LIBRARY for the namespace).
// Implementations register per device in cpu/ and cuda/; fake kernels and
// autograd are registered from Python (caad_kernels/backends/native_ops.py).
//
// Tensors arrive as row views: logits [B, T, V] with unit stride over V and any
// batch/time strides, labels [B, T]. `divergence` is the resolved code
// (0 forward KL, 1 reverse KL, 2 generalized JSD).
#include <torch/library.h>

TORCH_LIBRARY(caad, m) {
  m.def(
      "native_kd_forward(Tensor s, Tensor a, Tensor? t, Tensor? labels, float alpha, float plausibility_beta, "
      "float temperature, int divergence, float jsd_beta, float soft_weight, float hard_weight, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "native_kd_backward(Tensor grad_rows, Tensor s, Tensor a, Tensor? t, Tensor? labels, Tensor stats, "
      "float alpha, float plausibility_beta, float temperature, int divergence, float jsd_beta, "
      "float soft_weight, float hard_weight, int ignore_index, Tensor(a!) grad_s) -> ()");
  // Forward and gradient in one call (grad_in_forward): grad_s = grad_rows[n]·∂ℓ_n/∂s_n,
  // returns native_kd_forward's (loss, stats). grad_s must not alias s. On CUDA sm_90 one
  // cluster kernel reads each input once; elsewhere it is the two kernels back to back.
  m.def(
      "native_kd_forward_backward(Tensor grad_rows, Tensor s, Tensor a, Tensor? t, Tensor? labels, "
      "float alpha, float plausibility_beta, float temperature, int divergence, float jsd_beta, "
      "float soft_weight, float hard_weight, int ignore_index, Tensor(a!) grad_s) -> (Tensor, Tensor)");
  // Sparse teacher targets (SPEC §9; csrc/cpu/sparse_kd_cpu.cpp): s [B, T, V]; ids [N, K] int64 (−1 pads);
  // logprobs [N, K] and tail [N] in the accumulation dtype (float32, or float64); labels [N] int64.
  m.def(
      "native_sparse_kd_forward(Tensor s, Tensor ids, Tensor logprobs, Tensor? tail, Tensor? labels, "
      "float temperature, float soft_weight, float hard_weight, int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "native_sparse_kd_backward(Tensor grad_rows, Tensor s, Tensor ids, Tensor logprobs, Tensor? tail, "
      "Tensor? labels, Tensor stats, float temperature, float soft_weight, float hard_weight, int ignore_index, "
      "Tensor(a!) grad_s) -> ()");
}
