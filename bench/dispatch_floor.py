"""The per-call floor of sn_cuda's op boundary: two Python custom ops shaped like
``sn_cuda::power_iteration`` (mutating, list arguments) and ``sn_cuda::normalize`` (list in,
list out, Python autograd), with implementations that do nothing.

Whatever the kernels cost, a forward through ``sn_cuda.ops.spectral_norm`` costs at least
this much host time; compare it with the issue-4 targets (~50 µs for a whole SN step of an
11-layer model). Run: ``python bench/dispatch_floor.py`` (CPU is enough: this is host time).
"""

import time

import torch
from torch import Tensor


@torch.library.custom_op("sn_cuda_probe::mutating", mutates_args=("us",))
def _mutating(ws: list[Tensor], us: list[Tensor], dims: list[int]) -> tuple[Tensor, Tensor]:
    return ws[0].new_empty(1), ws[0].new_empty(1)


@torch.library.custom_op("sn_cuda_probe::functional", mutates_args=())
def _functional(ws: list[Tensor], s: Tensor, dims: list[int]) -> tuple[list[Tensor], Tensor]:
    return [w.new_empty(0) for w in ws], s.new_empty(1)


_functional.register_autograd(
    lambda ctx, grads, _g: (list(grads), None, None),
    setup_context=lambda ctx, inputs, output: None,
)


def floor_us(layers: int, repeats: int = 500) -> float:
    ws = [torch.randn(2, 2, requires_grad=True) for _ in range(layers)]
    us = [torch.randn(2) for _ in range(layers)]
    dims = [0] * layers

    def forward():
        with torch.no_grad():
            s, _ = _mutating(ws, us, dims)
        return _functional(ws, s, dims)

    for _ in range(50):
        forward()
    start = time.perf_counter()
    for _ in range(repeats):
        forward()
    return (time.perf_counter() - start) / repeats * 1e6


if __name__ == "__main__":
    torch.set_num_threads(1)
    for n in (1, 11, 23, 64):
        print(f"{n:3d} layers: {floor_us(n):7.1f} us host time per forward (no kernels)")
