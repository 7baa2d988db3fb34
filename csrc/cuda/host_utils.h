// Host-side helpers shared by the three ops and their autograd: argument checks and the
// (pre, rows, post) view of a weight. (How a call reaches the kernels: cuda/launch_utils.h.)
#pragma once

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>

namespace sn_cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// float64 weights accumulate in float64, every other dtype in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A weight as the matrix power iteration runs on: rows = shape[dim], cols = pre * post.
struct MatrixView {
  int64_t pre = 1, rows = 1, post = 1, cols = 1;
};

inline MatrixView matrix_view(at::IntArrayRef sizes, int64_t dim) {
  MatrixView m;
  for (int64_t i = 0; i < dim; ++i) m.pre *= sizes[i];
  m.rows = sizes[dim];
  for (int64_t i = dim + 1; i < static_cast<int64_t>(sizes.size()); ++i) m.post *= sizes[i];
  m.cols = m.pre * m.post;
  return m;
}

// dims[i] checked against weights[i] and wrapped to [0, ndim).
inline std::vector<int64_t> checked_dims(
    const char* op, at::TensorList weights, c10::SymIntArrayRef dims, const char* weights_name) {
  TORCH_CHECK(
      dims.size() == weights.size(), op, ": dims has ", dims.size(), " entries but ", weights_name,
      " has ", weights.size());
  std::vector<int64_t> out(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) {
    const int64_t ndim = weights[i].dim();
    TORCH_CHECK(ndim >= 1, op, ": ", weights_name, "[", i, "] must have at least one dimension");
    const int64_t d = dims[i].expect_int();
    TORCH_CHECK(
        d >= -ndim && d < ndim, op, ": dims[", i, "] = ", d, " is out of range for ",
        weights_name, "[", i, "] with ", ndim, " dimensions");
    out[i] = d < 0 ? d + ndim : d;
  }
  return out;
}

// Every tensor of the list defined, on `device`, of dtype `dtype`: those of `first`, the
// tensor they are compared with ("weights[0]", "w_sn[0]").
inline void check_list(
    const char* op, at::TensorList tensors, const char* name, const at::Device& device,
    at::ScalarType dtype, const char* first) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(
        t.device() == device, op, ": all tensors must be on one device, but ", name, "[", i,
        "] is on ", t.device(), " and ", first, " on ", device);
    TORCH_CHECK(
        t.scalar_type() == dtype, op, ": all tensors must share one dtype, but ", name, "[", i,
        "] is ", t.scalar_type(), " and ", first, " ", dtype);
  }
}

// The device type the kernels run on: CUDA, or the CPU in the emulated build (tests/cuda_emu).
#ifdef SN_CUDA_EMULATE
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
#endif

// The first tensor of a non-empty list: a CUDA tensor of a floating dtype the kernels run.
inline void check_first(const char* op, at::TensorList tensors, const char* name) {
  TORCH_CHECK(!tensors.empty(), op, ": ", name, " must hold at least one tensor");
  const at::Tensor& t = tensors[0];
  TORCH_CHECK(
      t.defined() && t.device().type() == kKernelDevice, op, ": ", name, "[0] must be a ",
      c10::DeviceTypeName(kKernelDevice), " tensor");
  const auto dtype = t.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
      op, ": ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
}

// A 1-D vector of `n` accumulator values on `device` (sigmas, grad_sigmas, uv).
inline void check_acc_vector(
    const char* op, const at::Tensor& t, const char* name, int64_t n, const at::Device& device,
    at::ScalarType acc) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(
      t.dim() == 1 && t.numel() == n, op, ": ", name, " must be a vector of ", n,
      " elements, got shape ", t.sizes());
}

// u and v are written in place while every weight is read, by many blocks at once: a vector
// whose elements share memory (an expanded tensor), or that shares memory with another vector or
// with a weight, would race on the GPU, with no error. Refused, as torch refuses in-place
// outputs that overlap. Contiguous tensors are compared as spans of memory; a vector that is
// not contiguous (a column of a matrix) element by element, so that the columns of one matrix,
// which interleave without sharing an element, are accepted. Non-contiguous weights are copied
// before the kernels read them.
inline void check_vectors_disjoint(
    const char* op, at::TensorList weights, at::TensorList us, at::TensorList vs) {
  struct Span {
    uintptr_t begin, end;
    const char* name;
    size_t index;
    bool written;
  };
  auto refuse_if = [op](const Span* s, const Span* hit) {
    TORCH_CHECK(
        hit == nullptr, op, ": ", s->name, "[", s->index, "] shares memory with ",
        hit == nullptr ? "" : hit->name, "[", hit == nullptr ? 0 : hit->index,
        "]; u and v are written in place: give every layer vectors of its own");
  };
  std::vector<Span> spans;
  std::vector<std::pair<Span, const at::Tensor*>> strided;  // written, not contiguous
  spans.reserve(3 * weights.size());
  auto add = [&](const at::Tensor& t, const char* name, size_t i, bool written) {
    if (t.numel() == 0) return;
    if (written) {
      TORCH_CHECK(
          t.numel() == 1 || t.stride(0) != 0, op, ": ", name, "[", i,
          "] has elements that share memory (an expanded tensor?); it is written in place: "
          "pass a tensor of its own (.clone())");
    }
    const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
    if (t.is_contiguous()) {
      spans.push_back({begin, begin + t.numel() * t.element_size(), name, i, written});
    } else if (written) {
      strided.push_back({{begin, begin, name, i, true}, &t});
    }
  };
  for (size_t i = 0; i < weights.size(); ++i) {
    add(weights[i], "weights", i, false);
    add(us[i], "us", i, true);
    add(vs[i], "vs", i, true);
  }
  std::sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
  // Sweep in address order, keeping the span that reaches furthest, and the written one that
  // does: a written span that overlaps an earlier one overlaps the first; any span that
  // overlaps an earlier written one overlaps the second.
  const Span* furthest = nullptr;
  const Span* furthest_written = nullptr;
  for (const Span& s : spans) {
    const Span* hit = nullptr;
    if (s.written && furthest != nullptr && s.begin < furthest->end) hit = furthest;
    if (furthest_written != nullptr && s.begin < furthest_written->end) hit = furthest_written;
    refuse_if(&s, hit);
    if (furthest == nullptr || s.end > furthest->end) furthest = &s;
    if (s.written && (furthest_written == nullptr || s.end > furthest_written->end)) furthest_written = &s;
  }
  if (strided.empty()) return;  // the modules' own buffers: always contiguous
  // reach[k]: of spans[0..k] (in address order), the one that ends last. A span overlaps
  // [a, a + size) if and only if it begins before a + size and ends after a, so the last span
  // that begins before a + size decides through its reach.
  std::vector<const Span*> reach(spans.size());
  for (size_t k = 0; k < spans.size(); ++k) {
    reach[k] = (k == 0 || spans[k].end > reach[k - 1]->end) ? &spans[k] : reach[k - 1];
  }
  std::unordered_map<uintptr_t, const Span*> elements;  // each strided element, by address
  for (const auto& [span, t] : strided) {
    const auto base = reinterpret_cast<uintptr_t>(t->const_data_ptr());
    const uintptr_t size = t->element_size();
    const uintptr_t step = t->stride(0) * size;  // a vector: one dim, stride > 0 (checked)
    for (int64_t k = 0; k < t->numel(); ++k) {
      const uintptr_t a = base + k * step;
      const auto after = std::lower_bound(
          spans.begin(), spans.end(), a + size, [](const Span& s, uintptr_t x) { return s.begin < x; });
      if (after != spans.begin()) {
        const Span* last = reach[(after - spans.begin()) - 1];
        refuse_if(&span, last->end > a ? last : nullptr);
      }
      const auto [it, fresh] = elements.emplace(a, &span);
      refuse_if(&span, fresh ? nullptr : it->second);
    }
  }
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace sn_cuda
