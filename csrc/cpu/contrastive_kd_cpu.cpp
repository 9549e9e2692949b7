// CPU implementation of the native ops: rows in parallel (at::parallel_for),
// each row by the torch-free core in csrc/kernel/.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>

#include "../kernel/contrastive_kd.h"
#include "../kernel/options.h"

namespace caad {
namespace {

DType kernel_dtype(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& s, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.sizes() == s.sizes(), name, " must be [B, T, V] like s, got ", x.sizes());
  TORCH_CHECK(x.size(2) <= 1 || x.stride(2) == 1, name, " must have unit stride over V");
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
}

// Addresses row n of a [B, T, V] view (rows need not be uniformly strided).
struct RowView {
  const char* base;
  int64_t stride_b, stride_t, rows_per_batch, elem;
  DType dtype;
  RowView(const at::Tensor& x, const char* name)
      : base(static_cast<const char*>(x.data_ptr())), stride_b(x.stride(0)), stride_t(x.stride(1)),
        rows_per_batch(x.size(1)), elem(x.element_size()), dtype(kernel_dtype(x, name)) {}
  const void* at(int64_t n) const {
    int64_t b = n / rows_per_batch, t = n - b * rows_per_batch;
    return base + (b * stride_b + t * stride_t) * elem;
  }
  Row row(int64_t n) const { return Row{at(n), dtype}; }
};

struct Labels {
  at::Tensor owned;  // int64 copy only when the labels are another integer type
  const int64_t* base = nullptr;
  int64_t stride_b = 0, stride_t = 0, rows_per_batch = 1;
  Labels(const std::optional<at::Tensor>& labels, const at::Tensor& s) {
    if (!labels.has_value()) return;
    TORCH_CHECK(!at::isFloatingType(labels->scalar_type()) && labels->scalar_type() != at::kBool,
                "labels must be an integer tensor, got ", labels->scalar_type());
    TORCH_CHECK(labels->dim() == 2 && labels->size(0) == s.size(0) && labels->size(1) == s.size(1),
                "labels must be [B, T] like s's leading dims, got ", labels->sizes());
    owned = labels->scalar_type() == at::kLong ? *labels : labels->to(at::kLong);
    base = owned.data_ptr<int64_t>();
    stride_b = owned.stride(0);
    stride_t = owned.stride(1);
    rows_per_batch = owned.size(1);
  }
  bool has() const { return base != nullptr; }
  int64_t at(int64_t n) const {
    int64_t b = n / rows_per_batch, t = n - b * rows_per_batch;
    return base[b * stride_b + t * stride_t];
  }
};

int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(vocab, 1)); }

// float64 anywhere means float64 accumulation (the path gradcheck uses); else fp32.
bool wants_double(const at::Tensor& s, const at::Tensor& a, const std::optional<at::Tensor>& t) {
  return s.scalar_type() == at::kDouble || a.scalar_type() == at::kDouble ||
         (t.has_value() && t->scalar_type() == at::kDouble);
}

template <typename Acc>
void forward_rows(const RowView& sv, const RowView& av, const RowView& tv, const Labels& lab, int64_t rows,
                  int64_t vocab, int64_t ignore_index, const KernelOptions& o, Acc* loss_p, Acc* stats_p) {
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = lab.has() ? lab.at(n) : 0;
      Acc* st = stats_p + n * kNumStats;
      if (lab.has() && y == ignore_index) {
        loss_p[n] = 0;
        for (int k = 0; k < kNumStats; ++k) st[k] = 0;
        continue;
      }
      loss_p[n] = forward_row(sv.row(n), av.row(n), tv.row(n), vocab, y, o, st);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> native_kd_forward_cpu(
    const at::Tensor& s, const at::Tensor& a, const std::optional<at::Tensor>& t,
    const std::optional<at::Tensor>& labels, double alpha, double plausibility_beta, double temperature,
    int64_t divergence, double jsd_beta, double soft_weight, double hard_weight, int64_t ignore_index) {
  check_rows(s, s, "s");
  check_rows(a, s, "a");
  if (t.has_value()) check_rows(*t, s, "t");
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2);
  const bool dbl = wants_double(s, a, t);
  const auto acc = s.options().dtype(dbl ? at::kDouble : at::kFloat);
  auto loss = at::empty({rows}, acc);
  auto stats = at::empty({rows, kNumStats}, acc);
  const KernelOptions o = make_options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                                       hard_weight, t.has_value());
  const RowView sv(s, "s"), av(a, "a"), tv(t.has_value() ? *t : a, "t");
  const Labels lab(labels, s);
  if (dbl) {
    forward_rows<double>(sv, av, tv, lab, rows, vocab, ignore_index, o, loss.data_ptr<double>(),
                         stats.data_ptr<double>());
  } else {
    forward_rows<float>(sv, av, tv, lab, rows, vocab, ignore_index, o, loss.data_ptr<float>(),
                        stats.data_ptr<float>());
  }
  return {loss, stats};
}

template <typename Acc>
void backward_rows(const Acc* up_p, int64_t up_stride, const RowView& sv, const RowView& av, const RowView& tv,
                   const RowView& gv, const Labels& lab, int64_t rows, int64_t vocab, int64_t ignore_index,
                   const KernelOptions& o, const Acc* stats_p) {
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      void* g = const_cast<void*>(gv.at(n));
      const int64_t y = lab.has() ? lab.at(n) : 0;
      if (lab.has() && y == ignore_index) {
        zero_row(g, gv.dtype, vocab);
        continue;
      }
      backward_row(up_p[n * up_stride], sv.row(n), av.row(n), tv.row(n), vocab, y, o, stats_p + n * kNumStats, g,
                   gv.dtype);
    }
  });
}

void native_kd_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& s, const at::Tensor& a,
                            const std::optional<at::Tensor>& t, const std::optional<at::Tensor>& labels,
                            const at::Tensor& stats, double alpha, double plausibility_beta, double temperature,
                            int64_t divergence, double jsd_beta, double soft_weight, double hard_weight,
                            int64_t ignore_index, const at::Tensor& grad_s) {
  check_rows(s, s, "s");
  check_rows(a, s, "a");
  if (t.has_value()) check_rows(*t, s, "t");
  check_rows(grad_s, s, "grad_s");
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == rows, "grad_rows must be [N]");
  const bool dbl = wants_double(s, a, t);
  const auto acc = dbl ? at::kDouble : at::kFloat;
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == kNumStats &&
                  stats.scalar_type() == acc && stats.is_contiguous(),
              "stats must be a contiguous [N, ", static_cast<int>(kNumStats), "] tensor from native_kd_forward");
  const KernelOptions o = make_options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                                       hard_weight, t.has_value());
  const at::Tensor up = grad_rows.to(acc);
  const RowView sv(s, "s"), av(a, "a"), tv(t.has_value() ? *t : a, "t"), gv(grad_s, "grad_s");
  const Labels lab(labels, s);
  if (dbl) {
    backward_rows<double>(up.data_ptr<double>(), up.stride(0), sv, av, tv, gv, lab, rows, vocab, ignore_index, o,
                          stats.data_ptr<double>());
  } else {
    backward_rows<float>(up.data_ptr<float>(), up.stride(0), sv, av, tv, gv, lab, rows, vocab, ignore_index, o,
                         stats.data_ptr<float>());
  }
}

// Rows are handed out dynamically, `chunk` at a time from a shared counter: on a machine whose
// cores are shared (CI), a static split waits for the slowest core. Each row's result depends
// on that row alone, so the order does not change any value (SPEC §4 determinism).
template <typename F>
void for_rows_dynamic(int64_t rows, int64_t chunk, const F& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), (rows + chunk - 1) / chunk);
  at::parallel_for(0, std::max<int64_t>(workers, 1), 1, [&](int64_t, int64_t) {
    body([&](int64_t& begin, int64_t& end) {
      begin = next.fetch_add(chunk, std::memory_order_relaxed);
      end = std::min(begin + chunk, rows);
      return begin < rows;
    });
  });
}

// Forward and backward row by row in one pass over the rows: each row's loss, statistics and
// gradient (upstream weight grad_rows[n]) come from one read of its s, a and t; the forward
// keeps its exponentials in a per-thread scratch of ~2·V floats (forward_backward_row).
template <typename Acc>
void forward_backward_rows(const Acc* up_p, int64_t up_stride, const RowView& sv, const RowView& av,
                           const RowView& tv, const RowView& gv, const Labels& lab, int64_t rows, int64_t vocab,
                           int64_t ignore_index, const KernelOptions& o, Acc* loss_p, Acc* stats_p) {
  for_rows_dynamic(rows, grain_rows(vocab), [&](const auto& claim) {
    std::unique_ptr<Acc[]> work(new Acc[forward_backward_workspace(vocab)]);
    int64_t begin = 0, end = 0;
    while (claim(begin, end)) {
      for (int64_t n = begin; n < end; ++n) {
        void* g = const_cast<void*>(gv.at(n));
        const int64_t y = lab.has() ? lab.at(n) : 0;
        Acc* st = stats_p + n * kNumStats;
        if (lab.has() && y == ignore_index) {
          loss_p[n] = 0;
          for (int k = 0; k < kNumStats; ++k) st[k] = 0;
          zero_row(g, gv.dtype, vocab);
          continue;
        }
        loss_p[n] = forward_backward_row(up_p[n * up_stride], sv.row(n), av.row(n), tv.row(n), vocab, y, o, st,
                                         work.get(), g, gv.dtype);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> native_kd_forward_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& s, const at::Tensor& a, const std::optional<at::Tensor>& t,
    const std::optional<at::Tensor>& labels, double alpha, double plausibility_beta, double temperature,
    int64_t divergence, double jsd_beta, double soft_weight, double hard_weight, int64_t ignore_index,
    const at::Tensor& grad_s) {
  check_rows(s, s, "s");
  check_rows(a, s, "a");
  if (t.has_value()) check_rows(*t, s, "t");
  check_rows(grad_s, s, "grad_s");
  const int64_t rows = s.size(0) * s.size(1), vocab = s.size(2);
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == rows, "grad_rows must be [N]");
  const bool dbl = wants_double(s, a, t);
  const auto acc = s.options().dtype(dbl ? at::kDouble : at::kFloat);
  auto loss = at::empty({rows}, acc);
  auto stats = at::empty({rows, kNumStats}, acc);
  const KernelOptions o = make_options(alpha, plausibility_beta, temperature, divergence, jsd_beta, soft_weight,
                                       hard_weight, t.has_value());
  const at::Tensor up = grad_rows.to(acc.dtype());
  const RowView sv(s, "s"), av(a, "a"), tv(t.has_value() ? *t : a, "t"), gv(grad_s, "grad_s");
  const Labels lab(labels, s);
  if (dbl) {
    forward_backward_rows<double>(up.data_ptr<double>(), up.stride(0), sv, av, tv, gv, lab, rows, vocab,
                                  ignore_index, o, loss.data_ptr<double>(), stats.data_ptr<double>());
  } else {
    forward_backward_rows<float>(up.data_ptr<float>(), up.stride(0), sv, av, tv, gv, lab, rows, vocab,
                                 ignore_index, o, loss.data_ptr<float>(), stats.data_ptr<float>());
  }
  return {loss, stats};
}

}  // namespace
}  // namespace caad

TORCH_LIBRARY_IMPL(caad, CPU, m) {
  m.impl("native_kd_forward", &caad::native_kd_forward_cpu);
  m.impl("native_kd_backward", &caad::native_kd_backward_cpu);
  m.impl("native_kd_forward_backward", &caad::native_kd_forward_backward_cpu);
}
