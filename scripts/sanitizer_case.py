"""A small many-layer case for compute-sanitizer (memcheck, racecheck, initcheck).

Twelve layers of mixed odd shapes (one row, one column, tall, wide, element counts that are
not a multiple of 4, a misaligned slice, dims 0, 1 and last, an empty weight) go through all
three ops in one call each: training in both orders (1 and 2 power iterations) and eval, then
the backward with and without grad_sigmas, for float32 and bfloat16. One more call repeats the
layers 11 times (132 layers: a full layer table of 128, then a chunk of 4; csrc/layer_table.h).
Results are checked loosely against the float64 reference, so that a run which is wrong but
clean still fails.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitizer_case.py

Exits 0 when every result is close, 1 otherwise; needs a GPU and the compiled extension.
"""

from __future__ import annotations

import math
import sys

import torch

import sn_cuda
from sn_cuda import reference

LAYERS = [  # (shape, dim)
    ((1, 1), 0),
    ((1, 300), 0),
    ((300, 1), 0),
    ((2000, 20), 0),
    ((3, 1030), 0),
    ((3, 5, 7), 0),
    ((5, 3, 7), 1),
    ((4, 3, 5), 2),
    ((6, 5, 3, 3), 1),
    ((33, 17, 3, 3), 0),
    ((260, 70), 0),
    ((5, 0), 0),
]
# (training, n_power_iterations, u_first)
MODES = [(True, 1, True), (True, 2, False), (False, 1, True)]
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel_err(actual, expected) -> float:
    if actual.numel() == 0:
        return 0.0
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()


def make(layers, dtype, gen):
    """Inputs drawn on the CPU (fewer instrumented kernels), then moved to the GPU."""
    weights, us, vs, dims = [], [], [], []
    for i, (shape, dim) in enumerate(layers):
        n = math.prod(shape)
        rows = shape[dim]
        base = torch.randn(n + 1, generator=gen).to(device="cuda", dtype=dtype)
        # Every third weight is a slice at a misaligned storage offset.
        weights.append(base[1:].view(shape) if i % 3 == 0 else base[:n].view(shape).clone())
        u = torch.nn.functional.normalize(torch.randn(rows, generator=gen), dim=0)
        v = torch.nn.functional.normalize(torch.randn(n // max(rows, 1), generator=gen), dim=0)
        us.append(u.to(device="cuda", dtype=dtype))
        vs.append(v.to(device="cuda", dtype=dtype))
        dims.append(dim)
    return weights, us, vs, dims


def run(layers, dtype, training, n_iter, u_first, gen) -> list[str]:
    problems = []
    weights, us, vs, dims = make(layers, dtype, gen)
    # The float64 reference, on the CPU.
    w64 = [w.cpu().double() for w in weights]
    u64 = [u.cpu().double() for u in us]
    v64 = [v.cpu().double() for v in vs]
    ref_sigmas = []
    for w, u, v, dim in zip(w64, u64, v64, dims):
        mat = reference.weight_matrix(w, dim)
        if training:
            reference.power_iteration(mat, u, v, u_first, n_iter, 1e-12)
        ref_sigmas.append(torch.vdot(u, torch.mv(mat, v)))

    sigmas, uv = torch.ops.sn_cuda.power_iteration(weights, us, vs, dims, u_first, n_iter, 1e-12, training)
    leaves = [w.detach().requires_grad_() for w in weights]
    w_sn, sigma_out = torch.ops.sn_cuda.normalize(leaves, sigmas, uv, dims)
    gen_grad = [torch.randn(w.shape, generator=gen).to(device="cuda", dtype=dtype) for w in weights]
    loss = sum((o.float() * g.float()).sum() for o, g in zip(w_sn, gen_grad)) + sigma_out.sum()
    loss.backward()  # normalize_backward with grad_sigmas
    plain = torch.ops.sn_cuda.normalize_backward(gen_grad, None, w_sn, sigmas, uv, dims)
    torch.cuda.synchronize()

    tag = f"{len(layers)} layers {dtype} training={training} n={n_iter} u_first={u_first}"
    err = rel_err(sigmas.cpu(), torch.stack(ref_sigmas))
    if not err <= TOL[dtype]:
        problems.append(f"{tag}: sigmas relative error {err:.3g}")
    for i, (out, w) in enumerate(zip(w_sn, w64)):
        err = rel_err(out.detach().cpu(), w / sigmas[i].cpu().double())
        if not err <= TOL[dtype]:
            problems.append(f"{tag}: W/sigma of layer {i} relative error {err:.3g}")
    for i, (leaf, g) in enumerate(zip(leaves, plain)):
        if not (torch.isfinite(leaf.grad).all() and torch.isfinite(g).all()):
            problems.append(f"{tag}: non-finite gradient for layer {i}")
    return problems


def main() -> int:
    if sn_cuda.backend() != "cuda":
        print(f"sanitizer_case: the kernels cannot run here: {sn_cuda.backend().reason}")
        return 1
    gen = torch.Generator().manual_seed(0)
    problems = []
    for dtype in (torch.float32, torch.bfloat16):
        for training, n_iter, u_first in MODES:
            problems += run(LAYERS, dtype, training, n_iter, u_first, gen)
    problems += run(LAYERS * 11, torch.float32, True, 1, True, gen)
    for p in problems:
        print("sanitizer_case:", p)
    print(f"sanitizer_case: {len(LAYERS)} layers x {2 * len(MODES)} calls, {11 * len(LAYERS)} layers x 1: {'FAILED' if problems else 'ok'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
