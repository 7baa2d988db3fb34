"""The op boundary: sn_cuda::power_iteration, sn_cuda::normalize, sn_cuda::normalize_backward,
and sn_cuda::spectral_norm (the first two in one call).

Per op: torch.library.opcheck (schema and mutation, fake kernel, autograd registration,
tracing), results against sn_cuda.reference, and gradients against torch autograd through
the reference; then the composed path (power_iteration under no_grad, then normalize) as
the modules use it: gradcheck/gradgradcheck, D(real)/D(fake)/one backward, and
torch.compile(fullgraph=True) giving eager's numbers. On CPU the ops run the reference; the
``cuda`` variants run the compiled kernels and are skipped without them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sn_cuda
from sn_cuda import ops, reference

power_iteration = torch.ops.sn_cuda.power_iteration
normalize = torch.ops.sn_cuda.normalize
normalize_backward = torch.ops.sn_cuda.normalize_backward
spectral_norm_op = torch.ops.sn_cuda.spectral_norm

# Layer lists (shape, dim): one layer; conv + transposed conv + linear; 5-D and a one-row
# matrix; a middle dim.
CASES = {
    "linear": [((7, 5), 0)],
    "mixed": [((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1), ((5, 7), 0)],
    "conv3d_one_row": [((3, 4, 2, 2, 2), 0), ((1, 5), 0)],
    "middle_dim": [((6, 2, 3), 2), ((2, 3, 4), 1)],
    "negative_dim": [((6, 2, 3), -1), ((4, 5), -2)],  # wrapped, as the kernels do
}


# normalize's autograd is compiled code (csrc/autograd.cpp): without the extension the modules
# never call normalize (W/σ comes from torch ops), and these tests have nothing to test.
needs_normalize_autograd = pytest.mark.skipif(
    not ops._NORMALIZE_HAS_AUTOGRAD,
    reason="normalize's autograd is in the compiled extension, which is not loaded",
)

# Small enough for gradgradcheck's finite differences.
SMALL = [((3, 2, 2), 1), ((4, 3), 0)]
# An empty layer first: its v still takes its columns' room in the packed uv (the double
# backward once mistook it for none and read every later layer's u, v from the wrong place).
EMPTY_FIRST = [((0, 5), 0), ((2, 0, 3), 1), ((4, 3), 0)]


def make_layers(case, dtype=torch.float32, device="cpu", seed=0):
    """weights, us, vs, dims for CASES[case] (or a list of (shape, dim)); u, v unit vectors
    as the modules hold them."""
    gen = torch.Generator().manual_seed(seed)
    weights, us, vs, dims = [], [], [], []
    for shape, dim in CASES[case] if isinstance(case, str) else case:
        w = torch.randn(shape, generator=gen, dtype=dtype)
        rows = shape[dim]
        weights.append(w.to(device))
        us.append(F.normalize(torch.randn(rows, generator=gen, dtype=dtype), dim=0).to(device))
        cols = ops._rows_cols(shape, dim)[1]
        vs.append(F.normalize(torch.randn(cols, generator=gen, dtype=dtype), dim=0).to(device))
        dims.append(dim)
    return weights, us, vs, dims


def _clones(tensors):
    return [t.clone() for t in tensors]


def _close(actual, expected, msg=""):
    """Bit-identical where the op runs the reference (CPU); tight tolerance on the kernels."""
    if actual.device.type == "cpu":
        assert torch.equal(actual, expected), f"{msg}: max |diff| {(actual - expected).abs().max().item():.3g}"
    else:
        tol = dict(rtol=1e-10, atol=1e-12) if actual.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(actual, expected, msg=msg or None, **tol)


# ------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_power_iteration(case, dtype, training, device):
    weights, us, vs, dims = make_layers(case, dtype, device)
    u_first = case != "mixed"  # both orders, over the cases
    n = 3 if case == "middle_dim" else 1
    torch.library.opcheck(power_iteration.default, (weights, us, vs, dims, u_first, n, 1e-12, training))


@needs_normalize_autograd
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_normalize(case, dtype, device):
    weights, us, vs, dims = make_layers(case, dtype, device)
    sigmas, uv = power_iteration(weights, us, vs, dims, True, 1, 1e-12, True)
    leaves = [w.requires_grad_() for w in weights]
    torch.library.opcheck(normalize.default, (leaves, sigmas, uv, dims))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_grad_sigmas", [False, True])
def test_opcheck_normalize_backward(case, dtype, with_grad_sigmas, device):
    weights, us, vs, dims = make_layers(case, dtype, device)
    sigmas, uv = power_iteration(weights, us, vs, dims, True, 1, 1e-12, True)
    w_sn, _ = normalize(weights, sigmas, uv, dims)
    grads = [torch.randn_like(w) for w in w_sn]
    grad_sigmas = torch.randn_like(sigmas) if with_grad_sigmas else None
    torch.library.opcheck(normalize_backward.default, (grads, grad_sigmas, w_sn, sigmas, uv, dims))


@needs_normalize_autograd
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_spectral_norm(case, training, device):
    weights, us, vs, dims = make_layers(case, torch.float64, device)
    leaves = [w.requires_grad_() for w in weights]
    u_first = case != "mixed"
    torch.library.opcheck(spectral_norm_op.default, (leaves, us, vs, dims, u_first, 1, 1e-12, training))


@needs_normalize_autograd
@pytest.mark.parametrize("training", [True, False])
def test_power_iteration_records_no_graph(training, device):
    """Grad mode on, weights that require grad: no output requires grad (the op runs below
    autograd, as torch iterates under no_grad); u and v still get their version bump."""
    weights, us, vs, dims = make_layers("mixed", torch.float64, device)
    leaves = [w.requires_grad_() for w in weights]
    before = [t._version for t in us + vs]
    sigmas, uv = power_iteration(leaves, us, vs, dims, True, 1, 1e-12, training)
    assert not sigmas.requires_grad and sigmas.grad_fn is None
    assert not uv.requires_grad and uv.grad_fn is None
    bumped = [t._version > b for t, b in zip(us + vs, before)]
    assert bumped == [training] * len(bumped), bumped


@needs_normalize_autograd
@pytest.mark.parametrize("u_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_spectral_norm_op_is_the_two_ops(u_first, training, n, device):
    """The one-call op gives what power_iteration (under no_grad) then normalize give: W/σ, σ,
    the updated u and v, and the weights' gradients, bit for bit."""
    results = []
    for fused in (True, False):
        weights, us, vs, dims = make_layers("mixed", torch.float64, device, seed=3)
        leaves = [w.requires_grad_() for w in weights]
        args = (us, vs, dims, u_first, n, 1e-12, training)
        if fused:
            w_sn, sigmas = spectral_norm_op(leaves, *args)
        else:
            with torch.no_grad():
                sig, uv = power_iteration(leaves, *args)
            w_sn, sigmas = normalize(leaves, sig, uv, dims)
        gen = torch.Generator().manual_seed(5)
        grads = [torch.randn(w.shape, generator=gen, dtype=w.dtype).to(device) for w in w_sn]
        torch.autograd.backward(w_sn + [sigmas], grads + [torch.ones_like(sigmas)])
        results.append(w_sn + [sigmas] + us + vs + [w.grad for w in leaves])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a.detach(), b.detach()), f"output {i} differs"


# -------------------------------------------------------------------- vs the reference
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("u_first", [True, False])
def test_forward_ops_equal_the_reference(case, dtype, training, u_first, device):
    weights, us, vs, dims = make_layers(case, dtype, device)
    ref_us, ref_vs = _clones(us), _clones(vs)
    expected, expected_sigmas = reference.spectral_norm(weights, ref_us, ref_vs, dims, u_first, 2, 1e-12, training)
    sigmas, uv = power_iteration(weights, us, vs, dims, u_first, 2, 1e-12, training)
    assert sigmas.dtype == uv.dtype == dtype and sigmas.shape == (len(weights),)
    offset = 0
    for i, (u, v) in enumerate(zip(us, vs)):
        _close(u, ref_us[i], f"u[{i}] updated in place")
        _close(v, ref_vs[i], f"v[{i}] updated in place")
        # uv is the packed snapshot [u0, v0, u1, v1, ...] of the vectors σ used.
        _close(uv[offset : offset + u.numel()], u, f"uv: u[{i}]")
        offset += u.numel()
        _close(uv[offset : offset + v.numel()], v, f"uv: v[{i}]")
        offset += v.numel()
        _close(sigmas[i], expected_sigmas[i], f"sigma[{i}]")
    assert offset == uv.numel()
    w_sn, sigma_out = normalize(weights, sigmas, uv, dims)
    _close(sigma_out, sigmas, "normalize's sigma output")
    for i, (a, b) in enumerate(zip(w_sn, expected)):
        assert a.shape == b.shape and a.is_contiguous()
        _close(a, b, f"w_sn[{i}]")


@needs_normalize_autograd
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_grad_sigmas", [False, True])
def test_backward_equals_autograd_through_the_reference(case, with_grad_sigmas, device):
    dtype = torch.float64
    weights, us, vs, dims = make_layers(case, dtype, device)
    ref_us, ref_vs = _clones(us), _clones(vs)
    leaves = [w.clone().requires_grad_() for w in weights]
    out, sigs = reference.spectral_norm(leaves, ref_us, ref_vs, dims, True, 1, 1e-12, True)
    grads = [torch.randn_like(w) for w in weights]
    gs = torch.randn(len(weights), dtype=dtype, device=device) if with_grad_sigmas else None
    loss = sum((o * g).sum() for o, g in zip(out, grads))
    if gs is not None:
        loss = loss + sum(s * g for s, g in zip(sigs, gs))
    expected = torch.autograd.grad(loss, leaves)

    sigmas, uv = power_iteration(weights, us, vs, dims, True, 1, 1e-12, True)
    w_sn, _ = normalize(weights, sigmas, uv, dims)
    direct = normalize_backward(grads, gs, w_sn, sigmas, uv, dims)
    # ... and through normalize's registered autograd.
    op_leaves = [w.clone().requires_grad_() for w in weights]
    op_out, op_sigmas = normalize(op_leaves, sigmas, uv, dims)
    op_loss = sum((o * g).sum() for o, g in zip(op_out, grads))
    if gs is not None:
        op_loss = op_loss + (op_sigmas * gs).sum()
    through_autograd = torch.autograd.grad(op_loss, op_leaves)
    for i, e in enumerate(expected):
        torch.testing.assert_close(direct[i], e, rtol=1e-10, atol=1e-12, msg=f"normalize_backward, layer {i}")
        torch.testing.assert_close(through_autograd[i], e, rtol=1e-10, atol=1e-12, msg=f"autograd, layer {i}")


def test_accumulation_dtype_for_half_weights():
    weights, us, vs, dims = make_layers("mixed")
    half = [w.to(torch.bfloat16) for w in weights]
    us, vs = [u.to(torch.bfloat16) for u in us], [v.to(torch.bfloat16) for v in vs]
    sigmas, uv = power_iteration(half, us, vs, dims, True, 1, 1e-12, True)
    assert sigmas.dtype == uv.dtype == torch.float32
    assert us[0].dtype == torch.bfloat16  # the buffers keep the weight's dtype
    w_sn, sigma_out = normalize(half, sigmas, uv, dims)
    assert all(w.dtype == torch.bfloat16 for w in w_sn) and sigma_out.dtype == torch.float32


@pytest.mark.parametrize("training", [False, True])
def test_power_iteration_with_inference_tensors(training, device):
    # Buffers made under torch.inference_mode (e.g. a model moved there) have no version
    # counter: eval reads them as torch's flavours do; training writes them, which torch
    # refuses outside inference mode, with its own error.
    with torch.inference_mode():
        weights, us, vs, dims = make_layers("mixed", device=device)
    with torch.no_grad():
        if not training:
            sigmas, _ = power_iteration(weights, us, vs, dims, True, 1, 1e-12, False)
            expected = [torch.vdot(u, reference.weight_matrix(w, d) @ v) for w, u, v, d in zip(weights, us, vs, dims)]
            torch.testing.assert_close(sigmas, torch.stack(expected))
        else:
            with pytest.raises(RuntimeError, match="[Ii]nference"):
                power_iteration(weights, us, vs, dims, True, 1, 1e-12, True)


def test_spectral_norm_refuses_what_the_kernels_refuse():
    # On the reference path too (the op's own cases: test_kernels_cuda.check_argument_errors),
    # where zip() would drop a layer and F.normalize(out=) resize a wrong-sized u in place.
    w = [torch.randn(4, 3), torch.randn(5, 2)]
    u = [torch.randn(4), torch.randn(5)]
    v = [torch.randn(3), torch.randn(2)]
    cases = [
        (([], [], [], []), "weights must hold at least one tensor"),
        ((w, u[:1], v, [0, 0]), "us has 1 tensors but weights has 2"),
        ((w, u, v, [0]), "dims has 1 entries but weights has 2"),
        ((w, u, v, [0, -3]), r"dims\[1\] = -3 is out of range"),
        ((w, [u[0], u[0]], v, [0, 0]), r"us\[1\] must be a vector of 5 elements"),
        ((w, u, v, [1, 0]), r"us\[0\] must be a vector of 3 elements"),
        ((w, [u[0], u[1].to("meta")], v, [0, 0]), r"us\[1\] is on meta"),
    ]
    for (ws, us, vs, dims), message in cases:
        before = [t.clone() for t in u + v]
        with pytest.raises(RuntimeError, match=message):
            ops.spectral_norm(ws, us, vs, dims, True, 1, 1e-12, True)
        assert all(torch.equal(t, b) for t, b in zip(u + v, before)), message


# ----------------------------------------------------------------------- composed path
def _composed(us, vs, dims, training):
    """W ↦ (W/σ..., σ) as the modules compute it on the kernels."""

    def fn(*weights):
        with torch.no_grad():
            sigmas, uv = power_iteration(list(weights), us, vs, dims, True, 1, 1e-12, training)
        w_sn, sigma = normalize(list(weights), sigmas, uv, dims)
        return (*w_sn, sigma)

    return fn


@needs_normalize_autograd
@pytest.mark.parametrize("case", [SMALL, EMPTY_FIRST, "middle_dim"], ids=["small", "empty_first", "middle_dim"])
def test_gradcheck_and_gradgradcheck_in_eval(case, device):
    # Eval mode: u, v fixed, so the composed function of W is deterministic.
    weights, us, vs, dims = make_layers(case, torch.float64, device)
    leaves = tuple(w.requires_grad_() for w in weights)
    fn = _composed(us, vs, dims, training=False)
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


@needs_normalize_autograd
@pytest.mark.parametrize("case", [SMALL, EMPTY_FIRST, "mixed"], ids=["small", "empty_first", "mixed"])
def test_create_graph_gives_the_same_gradient(case, device):
    # With create_graph=True the backward is a differentiable formula (for gradient penalties),
    # not normalize_backward: its first-order values must be the same. (gradgradcheck cannot
    # see an error here: it differentiates whatever that formula computes.)
    weights, us, vs, dims = make_layers(case, torch.float64, device)
    leaves = [w.requires_grad_() for w in weights]
    fn = _composed(us, vs, dims, training=False)
    gen = torch.Generator().manual_seed(3)
    outs = fn(*leaves)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(device) for o in outs]
    first = torch.autograd.grad(outs, leaves, cotangents)
    again = torch.autograd.grad(fn(*leaves), leaves, cotangents, create_graph=True)
    for i, (a, b) in enumerate(zip(again, first)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"layer {i}")


@needs_normalize_autograd
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_two_forwards_one_backward(dtype, device):
    # D(real), D(fake), one backward: the second call updates u, v before the backward of
    # the first, which must use the snapshot (uv) its σ was computed from.
    weights, us, vs, dims = make_layers("mixed", dtype, device)
    ref_us, ref_vs = _clones(us), _clones(vs)
    leaves = [w.clone().requires_grad_() for w in weights]
    ref_leaves = [w.clone().requires_grad_() for w in weights]
    fn = _composed(us, vs, dims, training=True)
    real, fake = fn(*leaves), fn(*leaves)
    ref_real = reference.spectral_norm(ref_leaves, ref_us, ref_vs, dims, True, 1, 1e-12, True)[0]
    ref_fake = reference.spectral_norm(ref_leaves, ref_us, ref_vs, dims, True, 1, 1e-12, True)[0]
    cot = [torch.randn_like(w) for w in weights]
    sum((a * c).sum() - (b * c).square().sum() for a, b, c in zip(real[:-1], fake[:-1], cot)).backward()
    sum((a * c).sum() - (b * c).square().sum() for a, b, c in zip(ref_real, ref_fake, cot)).backward()
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for i in range(len(weights)):
        _close(us[i], ref_us[i], f"u[{i}]")
        _close(vs[i], ref_vs[i], f"v[{i}]")
        torch.testing.assert_close(leaves[i].grad, ref_leaves[i].grad, **tol, msg=f"grad[{i}]")


def _train_step(weights, us, vs, dims):
    with torch.no_grad():
        sigmas, uv = power_iteration(weights, us, vs, dims, True, 1, 1e-12, True)
    w_sn, sigma = normalize(weights, sigmas, uv, dims)
    return sum((w * w).sum() for w in w_sn) + sigma.sum()


@needs_normalize_autograd
@pytest.mark.parametrize(
    "backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)]
)
def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    weights, us, vs, dims = make_layers("mixed", torch.float32, device)
    leaves = [w.requires_grad_() for w in weights]
    eager_us, eager_vs = _clones(us), _clones(vs)
    eager_loss = _train_step(leaves, eager_us, eager_vs, dims)
    eager_grads = torch.autograd.grad(eager_loss, leaves)
    compiled = torch.compile(_train_step, fullgraph=True, backend=backend)
    for step in range(2):  # the second call reuses the graph, on updated u, v
        loss = compiled(leaves, us, vs, dims)
        grads = torch.autograd.grad(loss, leaves)
        if step == 0:
            tol = dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(loss, eager_loss, **tol)
            for g, e in zip(grads, eager_grads):
                torch.testing.assert_close(g, e, **tol)
            # The in-place update of the buffers survives compilation.
            for a, b in zip(us + vs, eager_us + eager_vs):
                torch.testing.assert_close(a, b, **tol)
    eager_loss = _train_step(leaves, eager_us, eager_vs, dims)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------- what modules call; backend
def test_modules_take_the_reference_on_cpu():
    weights, us, vs, dims = make_layers("mixed")
    assert not ops.uses_kernels(weights[0])
    ref_us, ref_vs = _clones(us), _clones(vs)
    w_sn, sigmas = ops.spectral_norm(weights, us, vs, dims, False, 1, 1e-12, True)
    expected, expected_sigmas = reference.spectral_norm(weights, ref_us, ref_vs, dims, False, 1, 1e-12, True)
    for a, b in zip(list(w_sn) + list(sigmas) + us + vs, expected + expected_sigmas + ref_us + ref_vs):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_modules_take_the_kernels_on_cuda(dtype):
    weights, us, vs, dims = make_layers("mixed", dtype, "cuda")
    assert ops.uses_kernels(weights[0])
    ref_us, ref_vs = _clones(us), _clones(vs)
    w_sn, sigmas = ops.spectral_norm(weights, us, vs, dims, True, 1, 1e-12, True)
    expected, expected_sigmas = reference.spectral_norm(
        [w.double() for w in weights], [u.double() for u in ref_us], [v.double() for v in ref_vs],
        dims, True, 1, 1e-12, True,
    )
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}.get(dtype, 1e-5)
    for a, b in zip(w_sn, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    for a, b in zip(sigmas, expected_sigmas):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_backend_says_torch_and_why_without_kernels():
    backend = sn_cuda.backend()
    assert backend in ("cuda", "torch")
    assert isinstance(backend, str) and isinstance(backend.reason, str) and backend.reason
    if not torch.cuda.is_available() or not sn_cuda._extension.LOADED:
        assert backend == "torch"


def test_backend_disabled_by_environment():
    env = dict(os.environ, SN_CUDA_DISABLE="1")
    code = "import sn_cuda; b = sn_cuda.backend(); print(b); print(b.reason)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    name, reason = out.stdout.strip().splitlines()
    assert name == "torch" and "SN_CUDA_DISABLE" in reason
