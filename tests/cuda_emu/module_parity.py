"""sn_cuda's modules on the emulated CUDA kernels, on the CPU, against torch's spectral norm.

Run by tests/test_kernels_emulated.py in a process of its own: it registers the emulated
kernels as sn_cuda's CPU kernels and sends CPU weights down the kernel path
(``ops.uses_kernels``), which must not reach the other tests. What it covers that the op-level
tests do not: the modules, batch(), the C++ autograd (csrc/autograd.cpp) and the kernels
together, as on a GPU: the packed uv and σ handed from op to op, the backward through two
forwards (D(real), D(fake)), σ's own gradient (SpectralPenalty), eval mode, several optimizer
steps, u/v made under inference mode, torch.func transforms, torch.jit.trace, activation
checkpointing, and torch.library.opcheck of the four ops. Compared to
float tolerance (the kernels reduce in another order than torch).

    python tests/cuda_emu/module_parity.py      # exit 0 when every check passes
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sn_cuda  # noqa: E402
import sn_cuda.legacy  # noqa: E402
from cuda_emu import build  # noqa: E402
from sn_cuda import ops  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)
FLAVOURS = {  # name: (torch's, sn_cuda's)
    "param": (torch.nn.utils.parametrizations.spectral_norm, sn_cuda.spectral_norm),
    "legacy": (torch.nn.utils.spectral_norm, sn_cuda.legacy.spectral_norm),
}


def model(sn_fn) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 16 * 16, 1),
    )
    torch.manual_seed(1)
    for i in (0, 2, 5):
        sn_fn(m[i])
    return m


def compare(what: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"{what}: {m}")


def compare_twins(when: str, sn: nn.Module, ref: nn.Module) -> None:
    """The gradients and u/v of sn_cuda's model against torch's twin."""
    for (key, a), b in zip(sn.named_parameters(), ref.parameters()):
        compare(f"grad of {key}, {when}", a.grad, b.grad)
    for (key, a), b in zip(sn.named_buffers(), ref.buffers()):
        compare(f"{key}, {when}", a, b)


def train_and_compare(flavour: str, batched: bool) -> None:
    torch_fn, sn_fn = FLAVOURS[flavour]
    ref, sn = model(torch_fn), model(sn_fn)
    handle = sn_cuda.batch(sn) if batched else None
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, sn)]
    gen = torch.Generator().manual_seed(2)
    for step in range(3):
        real, fake = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
        losses = []
        for m, opt in zip((ref, sn), opts):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.softplus(-m(real)).mean() + nn.functional.softplus(m(fake)).mean()
            loss.backward()
            losses.append(loss)
        when = f"{flavour}{' batched' if batched else ''}, step {step}"
        compare(f"loss, {when}", losses[1], losses[0])
        compare_twins(when, sn, ref)
        for opt in opts:
            opt.step()
    for m in (ref, sn):
        m.eval()
    x = torch.randn(4, 3, 8, 8, generator=gen)
    compare(f"eval output, {flavour}", sn(x), ref(x))
    if handle is not None:
        handle.remove()


def penalty_gradient() -> None:
    """SpectralPenalty differentiates σ itself (normalize_backward's grad_sigmas)."""
    torch.manual_seed(0)
    layers = [nn.Linear(20, 30), nn.Conv2d(3, 6, 3)]
    penalty = sn_cuda.SpectralPenalty(nn.Sequential(*layers))
    value = penalty()
    value.backward()
    for i, layer in enumerate(layers):
        w = layer.weight.detach().double().requires_grad_()
        mat = w.reshape(w.shape[0], -1)
        holder = penalty.vectors.get_submodule(str(i))
        u, v = holder.weight_u.double(), holder.weight_v.double()  # the vectors σ used
        sigma = torch.dot(u, mat @ v)
        (sigma**2).backward()
        compare(f"penalty gradient of layer {i}", layer.weight.grad.double(), w.grad)


def inference_buffers() -> None:
    """u/v made under torch.inference_mode: eval reads them; training outside inference mode
    raises torch's own error, as the reference's in-place update does (the kernels write u/v
    in place without an op torch could refuse: the version bump must refuse it)."""
    with torch.inference_mode():
        weights, us, vs = [torch.randn(4, 3)], [torch.randn(4)], [torch.randn(3)]
    before = us[0].clone()
    sigmas, _ = ops.power_iteration_op(weights, us, vs, [0], True, 1, 1e-12, False)
    compare("eval sigma from inference tensors", sigmas[0], torch.dot(us[0], weights[0] @ vs[0]))
    try:
        ops.power_iteration_op(weights, us, vs, [0], True, 1, 1e-12, True)
    except RuntimeError as e:
        assert "nference" in str(e), e
    else:
        raise AssertionError("training on inference-mode u/v outside inference mode did not raise")
    assert torch.equal(us[0], before), "the refused call changed u"


def functorch_transforms() -> None:
    """torch.func.grad of functional_call, per layer and batched: sn_cuda steps aside for the
    reference inside the transform (functorch refuses normalize's C++ autograd Function)."""
    from torch.func import functional_call, grad

    x = torch.randn(2, 3, 8, 8)
    for flavour, (torch_fn, sn_fn) in FLAVOURS.items():
        for batched in (False, True):
            ref, sn = model(torch_fn), model(sn_fn)
            handle = sn_cuda.batch(sn) if batched else None
            params = {k: 2 * p.detach() for k, p in ref.named_parameters()}
            grads = []
            for m in (ref, sn):
                buffers = {k: b.clone() for k, b in m.named_buffers()}
                loss = lambda p: functional_call(m, {**p, **buffers}, (x,)).square().sum()  # noqa: E731
                grads.append(grad(loss)(params))
            for key in grads[0]:
                compare(f"torch.func.grad {flavour} batched={batched} {key}", grads[1][key], grads[0][key])
            if handle is not None:
                handle.remove()


def jit_trace() -> None:
    """torch.jit.trace records the reference's plain ops, not the kernels: the trace runs (and
    exports to ONNX) without sn_cuda, and equals a trace of torch's spectral norm."""
    x = torch.randn(2, 3, 8, 8)
    for flavour, (torch_fn, sn_fn) in FLAVOURS.items():
        for training in (False, True):
            # Tracing a parametrized module reads its weight more than once (torch's too).
            ref, sn = (model(fn).train(training) for fn in (torch_fn, sn_fn))
            traced = [torch.jit.trace(m, (x,), check_trace=False) for m in (ref, sn)]
            assert "sn_cuda::" not in str(traced[1].inlined_graph), f"{flavour}: the trace calls sn_cuda's ops"
            with torch.no_grad():
                compare(f"traced {flavour} training={training}", traced[1](x), traced[0](x))
            for a, b in zip(sn.buffers(), ref.buffers()):
                compare(f"u/v after the traced {flavour} training={training}", a, b)


def activation_checkpointing() -> None:
    """torch.utils.checkpoint recomputes the forward in the backward (iterating again, as
    torch's spectral norm does): outputs, gradients and u/v as torch's, both variants."""
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 3, 8, 8)
    for flavour, (torch_fn, sn_fn) in FLAVOURS.items():
        for batched in (False, True):
            for reentrant in (False, True):
                ref, sn = model(torch_fn), model(sn_fn)
                handle = sn_cuda.batch(sn) if batched else None
                outs = []
                for m in (ref, sn):
                    out = checkpoint(m, x.clone().requires_grad_(), use_reentrant=reentrant)
                    out.sum().backward()
                    outs.append(out.detach())
                when = f"checkpointed {flavour}, batched={batched}, reentrant={reentrant}"
                compare(f"output, {when}", outs[1], outs[0])
                compare_twins(when, sn, ref)
                if handle is not None:
                    handle.remove()


def opchecks() -> None:
    """torch.library.opcheck on the kernels: schema (what they mutate), fake kernels (output
    shapes, strides, dtypes), autograd registration, AOT dispatch."""
    torch.manual_seed(0)
    shapes = [((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1), ((1, 5), 0), ((7, 3, 2), 2)]
    weights = [torch.randn(shape) for shape, _ in shapes]
    dims = [dim for _, dim in shapes]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[d]), dim=0) for w, d in zip(weights, dims)]
    vs = [torch.nn.functional.normalize(torch.randn(w.numel() // w.shape[d]), dim=0) for w, d in zip(weights, dims)]
    for training in (True, False):
        torch.library.opcheck(ops.power_iteration_op, (weights, us, vs, dims, True, 1, 1e-12, training))
    sigmas, uv = ops.power_iteration_op(weights, us, vs, dims, False, 1, 1e-12, True)
    leaves = [w.clone().requires_grad_() for w in weights]
    torch.library.opcheck(ops.normalize_op, (leaves, sigmas, uv, dims))
    grads = [torch.randn_like(w) for w in weights]
    w_sn = [w / 2 for w in weights]
    for grad_sigmas in (None, torch.randn_like(sigmas)):
        torch.library.opcheck(ops.normalize_backward_op, (grads, grad_sigmas, w_sn, sigmas, uv, dims))
    for training in (True, False):
        torch.library.opcheck(ops.spectral_norm_op, (leaves, us, vs, dims, True, 1, 1e-12, training))


def main() -> int:
    why_not = build.unavailable(as_sn_cuda=True)
    if why_not:
        print(f"module_parity: cannot run: {why_not}")
        return 1
    build.load(as_sn_cuda=True)
    if not torch._C._dispatch_has_kernel_for_dispatch_key("sn_cuda::normalize", "CPU"):
        print("module_parity: the emulated kernels did not register")
        return 1
    ops.uses_kernels = lambda weight: weight.dtype in ops._KERNEL_DTYPES  # this process only
    torch.set_num_threads(1)
    for flavour in FLAVOURS:
        for batched in (False, True):
            train_and_compare(flavour, batched)
    penalty_gradient()
    inference_buffers()
    functorch_transforms()
    jit_trace()
    activation_checkpointing()
    opchecks()
    print("module_parity: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
