// Contrastive KD loss, CUDA row kernels: the torch-free launch interface (SPEC §2–§5).
//
// Same algorithm, statistics layout and NaN/inf rules as the CPU core
// (csrc/kernel/contrastive_kd.h) and the Triton kernels: one thread block per
// row, fp32 accumulation, 8 fp32 statistics per row (caad::Stat order). This
// header only needs the CUDA runtime API types, so the torch binding
// (contrastive_kd_cuda.cpp) can be compiled by the host compiler alone.
//
// Tensors are [B, T, V] row views with unit stride over V: row n lives at
// element (n / T)·stride_b + (n % T)·stride_t (strides in elements, 64-bit).
// All of s, a, t must have one dtype (the binding upcasts mismatches to fp32);
// the gradient's dtype may differ only when the inputs are fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../kernel/contrastive_kd.h"

namespace caad {
namespace cuda {

// A read-only [B, T, V] logits view. `ptr` may be null for a tensor the options
// never read (a when !opts.soft, t when !opts.use_text).
struct RowTensor {
  const void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_t = 0;
  DType dtype = DType::kFloat32;
};

// The gradient output view ([B, T, V], unit stride over V); may be s itself.
struct MutableRowTensor {
  void* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_t = 0;
  DType dtype = DType::kFloat32;
};

// int64 labels [B, T]; ptr == nullptr means "no labels": every row is valid and
// the hard-term label is 0 (as in the CPU binding; w_hard must then be 0).
struct LabelView {
  const int64_t* ptr = nullptr;
  int64_t stride_b = 0;
  int64_t stride_t = 0;
};

struct ForwardArgs {
  RowTensor s, a, t;
  LabelView labels;
  int64_t rows = 0;            // N = B·T
  int64_t rows_per_batch = 1;  // T
  int64_t vocab = 0;           // V
  KernelOptions opts;
  int64_t ignore_index = -100;
  float* loss = nullptr;   // [N] fp32: the row losses (0 on ignored rows)
  float* stats = nullptr;  // [N, kNumStats] fp32, contiguous (all 0 on ignored rows)
};

struct BackwardArgs {
  const float* grad_rows = nullptr;  // upstream gradient of row n at grad_rows[n * grad_rows_stride]
  int64_t grad_rows_stride = 1;      // may be 0 (one broadcast scalar)
  RowTensor s, a, t;
  LabelView labels;
  int64_t rows = 0;
  int64_t rows_per_batch = 1;
  int64_t vocab = 0;
  KernelOptions opts;
  int64_t ignore_index = -100;
  const float* stats = nullptr;  // [N, kNumStats] fp32 from the forward
  MutableRowTensor grad;         // written in full: exact zeros on ignored rows
};

// grad_in_forward on sm_90: forward outputs plus grad[n] = grad_rows[n]·∂ℓ_n/∂s_n in one
// launch, each row held on chip by a thread-block cluster. The gradient has the
// inputs' dtype.
struct SinglePassArgs {
  ForwardArgs forward;
  const float* grad_rows = nullptr;
  int64_t grad_rows_stride = 1;
  MutableRowTensor grad;  // must not alias s
};

// Enqueue the kernel on `stream`. Returns cudaErrorInvalidValue for arguments
// outside the contract above (float64, mixed input dtypes, an unsupported
// gradient dtype), else the launch status (cudaGetLastError). No host sync.
cudaError_t launch_contrastive_kd_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_contrastive_kd_backward(const BackwardArgs& args, cudaStream_t stream);

// cudaErrorNotSupported (nothing enqueued) unless the device is sm_90+, the build has sm_90
// code, all tensors share one dtype, V is a multiple of 16 bytes' worth of entries, every
// row starts 16-byte aligned and a row fits K <= 16 CTAs' shared memory; the caller then
// runs the forward and backward kernels instead. Otherwise the launch status.
cudaError_t launch_contrastive_kd_single_pass(const SinglePassArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace caad
