"""Host time of sn_cuda's op boundary with the kernels taken out.

In this process the three ``sn_cuda`` ops get CPU kernels that do nothing but allocate their
outputs, compiled C++ like the CUDA kernels (built on first use with torch's
``cpp_extension.load_inline``, about a minute, then cached), and ``sn_cuda.ops.spectral_norm``
is told to take the op path on the CPU. A forward + backward then costs what the boundary adds
around the kernels: argument handling, dispatch, the in-place bookkeeping, autograd.

Each step starts with the weights' ``.grad`` set to None (``zero_grad()``'s default); the
backward goes straight to autograd's engine, as the bench's steps do (``backward_into``:
``torch.autograd.backward``'s Python checks of each gradient are no cost of SN). The
``autograd floor`` column is that backward straight into the weights: what autograd costs to
deliver that many leaves' gradients whatever computes W/σ (a model without SN pays it too).
The difference is what sn_cuda's boundary itself costs. Medians of 7 blocks; the machine's
noise is visible in the spread between runs, so compare columns of one run.

A second table times the bench's own suite step the same way (kernels taken out): the model's
forward through the modules and ``sn_cuda.batch``, then the backward.
Compare with the target of a whole SN step of an 11-layer SNGAN D in <= 50 µs.
Run: ``python bench/dispatch_floor.py`` (host time: a CPU is enough).
"""

import statistics
import time

import torch

from sn_cuda import ops
from sn_cuda.bench.run import backward_into


_NOOP_KERNELS = r"""
#include <torch/library.h>

namespace {
std::tuple<at::Tensor, at::Tensor> power_iteration(
    at::TensorList weights, at::TensorList, at::TensorList, c10::SymIntArrayRef, bool, c10::SymInt,
    double, bool) {
  return {at::empty({int64_t(weights.size())}, weights[0].options()), at::empty({1}, weights[0].options())};
}
std::tuple<std::vector<at::Tensor>, at::Tensor> normalize(
    at::TensorList weights, const at::Tensor& sigmas, const at::Tensor&, c10::SymIntArrayRef) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& w : weights) out.push_back(at::empty_like(w));
  return {out, at::empty_like(sigmas)};
}
std::vector<at::Tensor> normalize_backward(
    at::TensorList grads, const std::optional<at::Tensor>&, at::TensorList, const at::Tensor&,
    const at::Tensor&, c10::SymIntArrayRef) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& g : grads) out.push_back(at::empty_like(g));
  return out;
}
}  // namespace

TORCH_LIBRARY_IMPL(sn_cuda, CPU, m) {
  m.impl("power_iteration", &power_iteration);
  m.impl("normalize", &normalize);
  m.impl("normalize_backward", &normalize_backward);
}
"""


def _install_noop_kernels() -> None:
    from torch.utils.cpp_extension import load_inline

    load_inline("sn_cuda_noop_kernels", cpp_sources=[_NOOP_KERNELS], is_python_module=False)


def _median_us(step, repeats: int = 200, blocks: int = 7) -> float:
    for _ in range(30):
        step()
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        times.append((time.perf_counter() - start) / repeats * 1e6)
    return statistics.median(times)


def step_us(layers: int) -> tuple[float, float]:
    """(sn_cuda's step, the autograd floor) in µs for ``layers`` layers."""
    weights = [torch.randn(2, 2, requires_grad=True) for _ in range(layers)]
    us = [torch.randn(2) for _ in range(layers)]
    vs = [torch.randn(2) for _ in range(layers)]
    dims = [0] * layers
    grads = tuple(torch.ones(2, 2) for _ in range(layers))

    def sn_step():
        for w in weights:
            w.grad = None
        w_sn, _ = ops.spectral_norm(weights, us, vs, dims, True, 1, 1e-12, True)
        backward_into(w_sn, grads)

    def floor_step():
        for w in weights:
            w.grad = None
        backward_into(weights, grads)

    return _median_us(sn_step), _median_us(floor_step)


def suite_step_us(suite_name: str, method: str) -> float:
    """The bench's own step (``prepare_suite_step``: the model's forward reads every layer's
    weight, then the backward) for ``method`` on ``suite_name``, kernels taken out: what the
    Python layers (modules, ``sn_cuda.batch``) add to the op boundary."""
    from sn_cuda.bench import run, suites

    suite = suites.get_suite(suite_name)
    cpu = torch.device("cpu")
    prepared = run.prepare_suite_step(suite, method, run.suite_grads(suite, cpu, torch.float32), cpu, torch.float32)

    def step():
        prepared.zero_grads()
        prepared.step()

    return _median_us(step, repeats=100)


if __name__ == "__main__":
    torch.set_num_threads(1)
    _install_noop_kernels()
    ops.uses_kernels = lambda weight: True  # this process only: take the op path on the CPU
    print("| layers | sn_cuda step | autograd floor | boundary (difference) |")
    print("|---:|---:|---:|---:|")
    for n in (1, 11, 23, 64):
        sn, floor = step_us(n)
        print(f"| {n} | {sn:.1f} µs | {floor:.1f} µs | {sn - floor:.1f} µs |")
    print()
    print("| suite step, kernels taken out | sn_cuda per layer | sn_cuda batched |")
    print("|---|---:|---:|")
    for name in ("sngan_cifar_resnet_d", "many_small"):
        layer, batched = (suite_step_us(name, m) for m in ("sn_cuda_layer", "sn_cuda_batched"))
        print(f"| {name} | {layer:.1f} µs | {batched:.1f} µs |")
