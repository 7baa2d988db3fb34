"""Host time of ``sn_cuda.batch``'s per-forward staging (the root's pre-hook), alone.

``ops.spectral_norm`` is stubbed out, so what is timed is the Python that groups the layers and
hands each its W/σ: the part of a batched step that grows with the layer count, on any machine.
Usage: python bench/stage_host_time.py [layers]
"""

import importlib
import sys
import time

import torch
from torch import nn

import sn_cuda

batch_module = importlib.import_module("sn_cuda.batch")


def main(layers: int = 64, calls: int = 3000) -> None:
    torch.set_num_threads(1)
    for flavour, sn_fn in (("parametrization", sn_cuda.spectral_norm), ("hook", sn_cuda.legacy.spectral_norm)):
        model = nn.Sequential(*[sn_fn(nn.Linear(8, 8)) for _ in range(layers)])
        handle = sn_cuda.batch(model)
        w_sn, sigmas = [torch.zeros(8, 8)] * layers, torch.zeros(layers)
        real = batch_module.ops.spectral_norm
        batch_module.ops.spectral_norm = lambda weights, *args: (w_sn[: len(weights)], sigmas)
        try:
            for _ in range(200):  # warm-up
                handle._stage(model, ())
            start = time.perf_counter()
            for _ in range(calls):
                handle._stage(model, ())
            per_call = (time.perf_counter() - start) / calls * 1e6
        finally:
            batch_module.ops.spectral_norm = real
            handle._clear(model, (), None)
        print(f"{flavour}: {per_call:.1f} µs per forward ({layers} layers)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
