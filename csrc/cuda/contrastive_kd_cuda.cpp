// CUDA implementation of the native ops (schemas in csrc/ops.cpp): the same checks
// and semantics as the CPU binding (csrc/cpu/contrastive_kd_cpu.cpp), with the
// kernels of contrastive_kd_kernels.cu launched on the current stream. No host sync.
//
// Dtypes: the kernels are instantiated per input dtype (fp32, bf16, fp16), with one
// dtype shared by every tensor the options read (s; a when soft_weight != 0; t when
// the contrast uses it). When those dtypes differ, the 16-bit ones are upcast to
// fp32 here — one [B, T, V] fp32 copy per upcast tensor, freed after the launch;
// never a downcast, which would change values. The gradient is written in grad_s's
// own dtype; a gradient dtype other than the inputs' (only seen when the caller
// passes one) is served by the fp32 kernels the same way. float64 is refused: it is
// the cpu and torch backends' gradcheck path.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>

#include "../kernel/contrastive_kd.h"
#include "../kernel/options.h"
#include "contrastive_kd_kernels.cuh"

namespace caad {
namespace {

DType kernel_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble:
      TORCH_CHECK(false, name, " is float64: the CUDA kernels take float32, bfloat16 or float16; float64 is "
                  "supported by the cpu and torch backends only (their gradcheck path)");
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& s, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == s.sizes(), name, " must be [B, T, V] like s, got ", x.sizes());
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, name, " must have unit stride over V");
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.device() == s.device(), name, " must be on ", s.device(), " like s, got ", x.device());
  kernel_dtype(x, name);
}

cuda::RowTensor row_tensor(const at::Tensor& x) {
  return cuda::RowTensor{x.data_ptr(), x.stride(0), x.stride(1), kernel_dtype(x, "input")};
}

// The tensors the kernels read, in one dtype (see the header comment).
struct Inputs {
  at::Tensor s, a, t;  // t undefined when absent; a may be s when the soft term is off
};

Inputs unify_dtypes(const at::Tensor& s, const at::Tensor& a, const std::optional<at::Tensor>& t,
                    const KernelOptions& o, std::optional<at::ScalarType> grad_dtype) {
  Inputs in{s, a, t.has_value() ? *t : at::Tensor()};
  const at::ScalarType d = s.scalar_type();
  bool mixed = (o.soft && a.scalar_type() != d) || (o.use_text && t->scalar_type() != d);
  // Gradient kernels exist for (T, T) and (fp32, any 16-bit): a 16-bit input with another
  // gradient dtype is read as fp32.
  if (grad_dtype.has_value() && *grad_dtype != d && d != at::kFloat) mixed = true;
  if (!mixed) return in;
  auto up = [](const at::Tensor& x) { return x.scalar_type() == at::kFloat ? x : x.to(at::kFloat); };
  in.s = up(in.s);
  if (o.soft) in.a = up(in.a);
  if (o.use_text) in.t = up(in.t);
  return in;
}

struct Labels {
  at::Tensor owned;  // int64 copy only when the labels are another integer type
  cuda::LabelView view;
  Labels(const std::optional<at::Tensor>& labels, const at::Tensor& s) {
    if (!labels.has_value()) return;
    const at::Tensor& l = *labels;
    TORCH_CHECK(l.dim() == 2 && l.size(0) == s.size(0) && l.size(1) == s.size(1), "labels must be [B, T] = [",
                s.size(0), ", ", s.size(1), "], got ", l.sizes());
    TORCH_CHECK(l.device() == s.device(), "labels must be on ", s.device(), " like s, got ", l.device());
    TORCH_CHECK(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), "labels must be an integer tensor, got ",
                l.scalar_type());
    owned = l.scalar_type() == at::kLong ? l : l.to(at::kLong);
    view = cuda::LabelView{owned.data_ptr<int64_t>(), owned.stride(0), owned.stride(1)};
  }
};

// The forward's launch arguments: inputs of one dtype, fp32 loss [N] and stats [N, kNumStats].
cuda::ForwardArgs forward_args(const Inputs& in, const Labels& lab, const KernelOptions& o, int64_t ignore_index,
                               at::Tensor& loss, at::Tensor& stats) {
  cuda::ForwardArgs args;
  args.s = row_tensor(in.s);
  args.a = row_tensor(in.a);
  if (in.t.defined()) args.t = row_tensor(in.t);
  args.labels = lab.view;
  args.rows = in.s.size(0) * in.s.size(1);
  args.rows_per_batch = in.s.size(1);
  args.vocab = in.s.size(2);
  args.opts = o;
  args.ignore_index = ignore_index;
  args.loss = loss.data_ptr<float>();
  args.stats = stats.data_ptr<float>();
  return args;
}

std::tuple<at::Tensor, at::Tensor> native_kd_forward_cuda(
    const at::Tensor& s, const at::Tensor& a, const std::optional<at::Tensor>& t,
    const std::optional<at::Tensor>& labels, double alpha, double plausibility_beta, double temperature,
    int64_t divergence, double jsd_beta, double soft_weight, double hard_weight, int64_t ignore_index) {
  check_rows(s, s, "s");
  check_rows(a, s, "a");
  if (t.has_value()) check_rows(*t, s, "t");
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t rows = s.size(0) * s.size(1);
  const auto f32 = s.options().dtype(at::kFloat);
  auto loss = at::empty({rows}, f32);
  auto stats = at::empty({rows, kNumStats}, f32);
  const KernelOptions o = make_options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                                       hard_weight, t.has_value());
  const Labels lab(labels, s);
  if (rows == 0) return {loss, stats};
  const Inputs in = unify_dtypes(s, a, t, o, std::nullopt);
  const cuda::ForwardArgs args = forward_args(in, lab, o, ignore_index, loss, stats);
  C10_CUDA_CHECK(cuda::launch_contrastive_kd_forward(args, c10::cuda::getCurrentCUDAStream()));
  return {loss, stats};
}

// The checks shared by the ops that write a gradient.
void check_gradient_inputs(const at::Tensor& grad_rows, const at::Tensor& s, const at::Tensor& a,
                           const std::optional<at::Tensor>& t, const at::Tensor& grad_s) {
  check_rows(s, s, "s");
  check_rows(a, s, "a");
  if (t.has_value()) check_rows(*t, s, "t");
  check_rows(grad_s, s, "grad_s");
  const int64_t rows = s.size(0) * s.size(1);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == rows, "grad_rows must be [N] = [", rows, "], got ",
              grad_rows.sizes());
  TORCH_CHECK(grad_rows.device() == s.device(), "grad_rows must be on ", s.device(), " like s, got ",
              grad_rows.device());
}

void native_kd_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& s, const at::Tensor& a,
                             const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& labels,
                             const at::Tensor& stats, double alpha, double plausibility_beta, double temperature,
                             int64_t divergence, double jsd_beta, double soft_weight, double hard_weight,
                             int64_t ignore_index, const at::Tensor& grad_s) {
  check_gradient_inputs(grad_rows, s, a, t, grad_s);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumStats &&
                  stats.scalar_type() == at::kFloat && stats.is_contiguous() && stats.device() == s.device(),
              "stats must be a contiguous float32 [N, ", static_cast<int>(kNumStats),
              "] tensor from native_kd_forward on ", s.device());
  const KernelOptions o = make_options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                                       hard_weight, t.has_value());
  const Labels lab(labels, s);
  if (rows == 0) return;
  // fp32 upstream gradients; a stride-0 (expanded) grad_rows stays a view.
  const at::Tensor up = grad_rows.to(at::kFloat);
  // When grad_s is s itself (in-place backward) and no upcast happens, the kernel reads
  // each chunk of s before overwriting it, in the same thread.
  const Inputs in = unify_dtypes(s, a, t, o, grad_s.scalar_type());

  cuda::BackwardArgs args;
  args.grad_rows = up.data_ptr<float>();
  args.grad_rows_stride = up.stride(0);
  args.s = row_tensor(in.s);
  args.a = row_tensor(in.a);
  if (in.t.defined()) args.t = row_tensor(in.t);
  args.labels = lab.view;
  args.rows = rows;
  args.rows_per_batch = s.size(1);
  args.vocab = vocab;
  args.opts = o;
  args.ignore_index = ignore_index;
  args.stats = stats.data_ptr<float>();
  args.grad = cuda::MutableRowTensor{grad_s.data_ptr(), grad_s.stride(0), grad_s.stride(1),
                                     kernel_dtype(grad_s, "grad_s")};
  C10_CUDA_CHECK(cuda::launch_contrastive_kd_backward(args, c10::cuda::getCurrentCUDAStream()));
}

// CAAD_CUDA_CLUSTER: "0" turns the sm_90 single-pass kernel off (to compare it with the
// two-kernel path); "require" makes a case it cannot take an error instead of a fallback
// (the GPU tests use it to prove the kernel ran); unset or anything else: use it when it can.
enum class ClusterMode { kOff, kAuto, kRequire };

ClusterMode cluster_mode() {
  const char* v = std::getenv("CAAD_CUDA_CLUSTER");
  if (v == nullptr) return ClusterMode::kAuto;
  if (std::strcmp(v, "0") == 0) return ClusterMode::kOff;
  return std::strcmp(v, "require") == 0 ? ClusterMode::kRequire : ClusterMode::kAuto;
}

std::tuple<at::Tensor, at::Tensor> native_kd_forward_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& s, const at::Tensor& a, const std::optional<at::Tensor>& t,
    const std::optional<at::Tensor>& labels, double alpha, double plausibility_beta, double temperature,
    int64_t divergence, double jsd_beta, double soft_weight, double hard_weight, int64_t ignore_index,
    const at::Tensor& grad_s) {
  check_gradient_inputs(grad_rows, s, a, t, grad_s);
  const c10::cuda::CUDAGuard guard(s.device());
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2);
  TORCH_CHECK(!grad_s.is_same(s) && grad_s.data_ptr() != s.data_ptr(), "grad_s must not alias s");
  const KernelOptions o = make_options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                                       hard_weight, t.has_value());
  const bool one_dtype = grad_s.scalar_type() == s.scalar_type() && (!o.soft || a.scalar_type() == s.scalar_type()) &&
                         (!o.use_text || t->scalar_type() == s.scalar_type());
  const ClusterMode mode = cluster_mode();
  TORCH_CHECK(mode != ClusterMode::kRequire || (rows > 0 && vocab > 0 && one_dtype),
              "CAAD_CUDA_CLUSTER=require: the single-pass kernel needs one dtype for s, a, t and grad_s and a "
              "non-empty input");
  if (rows > 0 && vocab > 0 && one_dtype && s.scalar_type() != at::kDouble && mode != ClusterMode::kOff) {
    const auto f32 = s.options().dtype(at::kFloat);
    auto loss = at::empty({rows}, f32);
    auto stats = at::empty({rows, kNumStats}, f32);
    const Labels lab(labels, s);
    const at::Tensor up = grad_rows.to(at::kFloat);
    cuda::SinglePassArgs args;
    args.forward = forward_args(Inputs{s, a, t.has_value() ? *t : at::Tensor()}, lab, o, ignore_index, loss, stats);
    args.grad_rows = up.data_ptr<float>();
    args.grad_rows_stride = up.stride(0);
    args.grad = cuda::MutableRowTensor{grad_s.data_ptr(), grad_s.stride(0), grad_s.stride(1),
                                       kernel_dtype(grad_s, "grad_s")};
    const cudaError_t err = cuda::launch_contrastive_kd_single_pass(args, c10::cuda::getCurrentCUDAStream());
    if (err != cudaErrorNotSupported) {
      C10_CUDA_CHECK(err);
      return {loss, stats};
    }
    TORCH_CHECK(mode != ClusterMode::kRequire,
                "CAAD_CUDA_CLUSTER=require: the sm_90 single-pass kernel cannot take this case (needs compute "
                "capability 9.x and a build with sm_90 code, V a multiple of 16 bytes of entries, 16-byte aligned "
                "rows, and a row that fits 16 CTAs' shared memory)");
  }
  auto out = native_kd_forward_cuda(s, a, t, labels, alpha, plausibility_beta, temperature, divergence, jsd_beta,
                                    soft_weight, hard_weight, ignore_index);
  native_kd_backward_cuda(grad_rows, s, a, t, labels, std::get<1>(out), alpha, plausibility_beta, temperature,
                          divergence, jsd_beta, soft_weight, hard_weight, ignore_index, grad_s);
  return out;
}

}  // namespace
}  // namespace caad

TORCH_LIBRARY_IMPL(caad, CUDA, m) {
  m.impl("native_kd_forward", &caad::native_kd_forward_cuda);
  m.impl("native_kd_backward", &caad::native_kd_backward_cuda);
  m.impl("native_kd_forward_backward", &caad::native_kd_forward_backward_cuda);
}
