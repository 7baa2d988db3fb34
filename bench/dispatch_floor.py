"""Host time of sn_cuda's op boundary with the kernels taken out.

In this process the three ``sn_cuda`` ops get CPU kernels that do nothing (they only allocate
their outputs), and ``sn_cuda.ops.spectral_norm`` is told to take the op path on the CPU. A
forward + backward then costs exactly what the boundary adds around the kernels: argument
handling, dispatch, the in-place bookkeeping, autograd. The no-op kernels are Python, so this
is an upper bound of the boundary's cost with the compiled CUDA kernels.

Compare with issue 4's targets (a whole SN step of an 11-layer SNGAN D in <= 50 µs).
Run: ``python bench/dispatch_floor.py`` (host time: a CPU is enough).
"""

import time

import torch

from sn_cuda import ops


def _install_noop_kernels(lib: torch.library.Library) -> None:
    def power_iteration(weights, us, vs, dims, u_first, n, eps, training):
        return weights[0].new_empty(len(weights)), weights[0].new_empty(1)

    def normalize(weights, sigmas, uv, dims):
        return [torch.empty_like(w) for w in weights], torch.empty_like(sigmas)

    def normalize_backward(grads, grad_sigmas, w_sn, sigmas, uv, dims):
        return [torch.empty_like(g) for g in grads]

    for name, fn in (("power_iteration", power_iteration), ("normalize", normalize),
                     ("normalize_backward", normalize_backward)):
        lib.impl(name, fn, "CPU")


def step_us(layers: int, repeats: int = 300) -> float:
    weights = [torch.randn(2, 2, requires_grad=True) for _ in range(layers)]
    us = [torch.randn(2) for _ in range(layers)]
    vs = [torch.randn(2) for _ in range(layers)]
    dims = [0] * layers
    grads = [torch.ones(2, 2) for _ in range(layers)]

    def step():
        w_sn, _ = ops.spectral_norm(weights, us, vs, dims, True, 1, 1e-12, True)
        torch.autograd.backward(w_sn, grads)

    for _ in range(30):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats * 1e6


if __name__ == "__main__":
    torch.set_num_threads(1)
    lib = torch.library.Library("sn_cuda", "IMPL")
    _install_noop_kernels(lib)
    ops.uses_kernels = lambda weight: True  # this process only: take the op path on the CPU
    for n in (1, 11, 23, 64):
        print(f"{n:3d} layers: {step_us(n):7.1f} us host time per forward+backward (no-op kernels)")
