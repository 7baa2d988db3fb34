"""The compiled CUDA kernels (csrc/cuda) against the reference computed in float64.

Every output of the three ops is compared on fresh random inputs: sigmas, the packed uv, the
u and v buffers after the call, W/σ, and the gradients from normalize_backward (with and
without grad_sigmas). Layers: every distinct layer shape of the public models in
sn_cuda/data/model_shapes.json (a whole model per call) and odd synthetic shapes (1x1, one
row, one column, tall, wide, odd element counts, the middle and last dims, empty). Inputs are
contiguous, sliced at a misaligned storage offset, or strided; the caching allocator is filled
with NaN bytes before each call, so an output or scratch element the kernels forget to write
shows up. Reruns must be bit-identical. Tests marked ``cuda`` need a GPU and the extension.

The comparison logic also runs on the CPU with the reference standing in for the kernels
(``test_checks_*``): it must pass there, and fail for a kernel that is slightly wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import sn_cuda
from sn_cuda import _extension, reference
from sn_cuda.ops import _rows_cols, _split_uv  # the (rows, cols) of a layer; views of packed uv

KERNELS_READY = torch.cuda.is_available() and _extension.LOADED
cuda = pytest.mark.skipif(not KERNELS_READY, reason="needs a CUDA GPU and the compiled extension")

# Relative error bound (max |error| / max |expected|, per tensor) of each weight dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = list(TOL)
EPS = 1e-12

# (shape, dim) layers with every odd case the tiling has: one row, one column, a single
# element, tall-skinny (BigGAN's first linear), wide, element counts that are not a multiple
# of 4, several row items and column chunks, a middle dim, the last dim (post = 1), a
# ConvTranspose2d weight, a 1-D weight, and empty weights.
ODD_LAYERS = [
    ((1, 1), 0),
    ((1, 37), 0),
    ((37, 1), 0),
    ((24576, 20), 0),
    ((3, 4099), 0),
    ((3, 5, 7), 0),
    ((600, 700), 0),
    ((1025, 33), 0),
    ((5, 3, 7), 1),
    ((4, 3, 5), 2),
    ((6, 5, 3, 3), 1),
    ((9,), 0),
    ((5, 0), 0),
    ((0, 6), 0),
]
# The largest matrices the kernels must handle, fp32 only (a few hundred MB in float64).
LARGE_LAYERS = [((2048, 18432), 0), ((24576, 20), 0), ((512, 1024, 4, 4), 1)]

# (training, n_power_iterations, u_first)
MODES = [(True, 1, True), (True, 1, False), (True, 3, True), (True, 3, False), (False, 1, True)]
MODE_IDS = ["train-param", "train-hook", "train3-param", "train3-hook", "eval"]


def _model_layers() -> dict[str, list[tuple[tuple[int, ...], int]]]:
    """Each model's distinct (shape, dim) layers; dim 1 for transposed convolutions."""
    path = pathlib.Path(sn_cuda.__file__).parent / "data" / "model_shapes.json"
    models = json.loads(path.read_text())["models"]
    out = {}
    for name, model in models.items():
        layers = []
        for layer in model["layers"]:
            dim = 1 if layer["type"].startswith("ConvTranspose") else 0
            entry = (tuple(layer["shape"]), dim)
            if entry not in layers:
                layers.append(entry)
        out[name] = layers
    return out


MODEL_LAYERS = _model_layers()


# ----------------------------------------------------------------------------- the ops
@dataclasses.dataclass(frozen=True)
class Ops:
    """The three ops under test (the dispatcher's: kernels for CUDA tensors)."""

    power_iteration: Callable = torch.ops.sn_cuda.power_iteration
    normalize: Callable = torch.ops.sn_cuda.normalize
    normalize_backward: Callable = torch.ops.sn_cuda.normalize_backward


OPS = Ops()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_power_iteration(weights, us, vs, dims, u_first, n, eps, training):
    """What sn_cuda::power_iteration means, from sn_cuda.reference, for float64 tensors on any
    device: u, v updated in place when training; σ = u·W v; uv = [u0, v0, u1, v1, ...]."""
    sigmas, uv = [], []
    for w, u, v, dim in zip(weights, us, vs, dims):
        sigma, u, v = reference.sigma_and_vectors(w, u, v, dim, u_first, n, eps, training)
        sigmas.append(sigma)
        uv += [u.reshape(-1), v.reshape(-1)]
    return torch.stack(sigmas), torch.cat(uv)


# ---------------------------------------------------------------------------- comparing
def rel_err(actual: torch.Tensor, expected: torch.Tensor, scale: float = 0.0) -> float:
    """max |actual − expected| / max(max |expected|, scale); NaN when actual holds a NaN.

    `scale` is the size of the terms a result is the difference of, where they can cancel."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if actual.numel() == 0:
        return 0.0
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(device=a.device, dtype=torch.float64)
    denom = e.abs().max().clamp_min(max(scale, torch.finfo(torch.float64).tiny))
    return ((a - e).abs().max() / denom).item()


def assert_close(actual, expected, tol, what, scale=0.0):
    err = rel_err(actual, expected, scale)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"  # fails on NaN too


# ------------------------------------------------------------------------------ inputs
def make_tensor(shape, dtype, device, gen, layout, unit=False):
    """A random tensor of `shape`: contiguous, a slice at a misaligned storage offset of a
    bigger buffer ("offset"), or a non-contiguous view ("strided"); unit-norm if `unit`."""
    n = math.prod(shape)
    if layout == "offset":
        t = torch.randn(n + 1, generator=gen, device=device)[1:].view(shape)
    elif layout == "strided" and len(shape) == 1:
        t = torch.randn(2 * n, generator=gen, device=device)[::2]
    elif layout == "strided":
        t = torch.randn(shape[::-1], generator=gen, device=device).permute(*range(len(shape) - 1, -1, -1))
    else:
        t = torch.randn(shape, generator=gen, device=device)
    if unit:
        t.copy_(F.normalize(t.reshape(-1), dim=0).view(shape))
    return _same_layout(t, dtype)


def _same_layout(t, dtype):
    """`t` converted to `dtype` with its sizes, strides and storage offset kept."""
    if t.dtype == dtype:
        return t
    extent = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    storage = torch.empty(t.storage_offset() + extent, dtype=dtype, device=t.device)
    out = storage.as_strided(t.shape, t.stride(), t.storage_offset())
    out.copy_(t)
    return out


def make_layers(layers, dtype, device, seed=0, layout="contiguous", scale=1.0):
    """weights, us, vs, dims: random weights (times ``scale``) and unit vectors in the weight
    dtype, u = W v / |W v| as after a power iteration (so that σ = u·W v is far from 0, also in
    eval mode)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights, us, vs, dims = [], [], [], []
    for shape, dim in layers:
        rows, cols = _rows_cols(shape, dim)
        w = make_tensor(shape, dtype, device, gen, layout).mul_(scale)
        u = make_tensor((rows,), dtype, device, gen, layout, unit=True)
        v = make_tensor((cols,), dtype, device, gen, layout, unit=True)
        if w.numel():
            u.copy_(F.normalize(torch.mv(reference.weight_matrix(w.double(), dim), v.double()), dim=0))
        weights.append(w)
        us.append(u)
        vs.append(v)
        dims.append(dim)
    return weights, us, vs, dims


def poison_allocator(device) -> None:
    """Refill torch's CUDA caching allocator with blocks of 0xFF bytes (NaN in every float
    dtype, 0xFFFFFFFF as a counter), so that what the next op allocates starts as garbage."""
    if torch.device(device).type != "cuda":
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    blocks = [torch.empty(n, dtype=torch.uint8, device=device) for n in [1 << 16] * 16 + [1 << 20] * 8 + [64 << 20, 256 << 20]]
    for b in blocks:
        b.fill_(255)
    del blocks  # back to the cache, not to the driver


# --------------------------------------------------------------------------- the check
def run_and_check(
    layers,
    dtype,
    *,
    training=True,
    n_iter=1,
    u_first=True,
    layout="contiguous",
    device="cuda",
    seed=0,
    grad_sigmas=True,
    scale=1.0,
    ops: Ops = OPS,
):
    """One power_iteration, normalize and normalize_backward call over all `layers`, each
    output compared with the float64 reference of the same inputs. Returns the outputs."""
    tol = TOL[dtype]
    acc = acc_dtype(dtype)
    weights, us, vs, dims = make_layers(layers, dtype, device, seed, layout, scale)
    shapes = [w.shape for w in weights]
    us0, vs0 = [u.clone() for u in us], [v.clone() for v in vs]

    w64 = [w.double() for w in weights]
    u64 = [u.to(torch.float64, copy=True) for u in us]  # copies, also for float64 buffers
    v64 = [v.to(torch.float64, copy=True) for v in vs]
    sig_ref, uv_ref = reference_power_iteration(w64, u64, v64, dims, u_first, n_iter, EPS, training)

    poison_allocator(device)
    sigmas, uv = ops.power_iteration(weights, us, vs, dims, u_first, n_iter, EPS, training)
    assert sigmas.dtype == acc and sigmas.shape == (len(layers),)
    assert uv.dtype == acc and uv.shape == uv_ref.shape
    # σ and the vectors σ used come from float32 arithmetic on exact inputs for float16/bfloat16
    # weights too: they are held to the accumulation dtype's bound, not the weight dtype's.
    acc_tol = TOL[acc]
    for i in range(len(layers)):  # each layer to its own size (a small σ next to a big one too)
        assert_close(sigmas[i : i + 1], sig_ref[i : i + 1], acc_tol, f"sigma of layer {i} {tuple(shapes[i])}")
    uv_parts = list(zip(*_split_uv(uv, shapes, dims), *_split_uv(uv_ref, shapes, dims)))
    for i, (ku, kv, ru, rv) in enumerate(uv_parts):
        assert_close(ku, ru, acc_tol, f"uv: u of layer {i} {tuple(shapes[i])}")
        assert_close(kv, rv, acc_tol, f"uv: v of layer {i} {tuple(shapes[i])}")
        # The buffers hold the snapshot rounded to the weight dtype.
        assert torch.equal(ku.to(dtype), us[i]) and torch.equal(kv.to(dtype), vs[i]), f"uv vs u/v buffers of layer {i}"
    for i in range(len(layers)):
        if training and n_iter > 0:
            assert_close(us[i], u64[i], tol, f"u buffer of layer {i} {tuple(shapes[i])}")
            assert_close(vs[i], v64[i], tol, f"v buffer of layer {i} {tuple(shapes[i])}")
        else:
            assert torch.equal(us[i], us0[i]) and torch.equal(vs[i], vs0[i]), f"eval changed u/v of layer {i}"

    poison_allocator(device)
    w_sn, sig_copy = ops.normalize(weights, sigmas, uv, dims)
    assert torch.equal(sig_copy, sigmas) and sig_copy.data_ptr() != sigmas.data_ptr()
    s64 = sigmas.double()
    for i, (out, w) in enumerate(zip(w_sn, w64)):
        # Contiguous, as the fake kernel says (the CPU reference keeps a strided input's strides).
        assert out.dtype == dtype and out.shape == w.shape and (out.is_contiguous() or not out.is_cuda)
        assert_close(out, w / s64[i], tol, f"W/sigma of layer {i} {tuple(shapes[i])}")
        # What the kernel must store: one IEEE division in the accumulation dtype by its own σ,
        # rounded once to the weight dtype (to the nearest). Within one unit in the last place.
        exact = (weights[i].to(acc) / sigmas[i]).to(dtype).double()
        ulp = exact.abs() * torch.finfo(dtype).eps + torch.finfo(dtype).tiny
        assert ((out.double() - exact).abs() <= ulp).all(), f"W/sigma of layer {i}: more than 1 ulp off"

    gen = torch.Generator(device=device).manual_seed(seed + 1)
    grads = [make_tensor(tuple(s), dtype, device, gen, layout) for s in shapes]
    gsig = torch.randn(len(layers), generator=gen, device=device, dtype=acc) if grad_sigmas else None
    poison_allocator(device)
    d_weights = ops.normalize_backward(grads, gsig, w_sn, sigmas, uv, dims)
    u_k, v_k = _split_uv(uv.double(), shapes, dims)
    expected = reference.spectral_norm_backward(
        [g.double() for g in grads],
        (gsig.double() if grad_sigmas else torch.zeros_like(s64)).unbind(0),
        [w.double() for w in w_sn],
        s64.unbind(0),
        u_k,
        v_k,
        dims,
    )
    for i, (out, ref) in enumerate(zip(d_weights, expected)):
        assert out.dtype == dtype and out.shape == ref.shape and (out.is_contiguous() or not out.is_cuda)
        # (G − k u vᵀ)/σ: the two terms can cancel (a 1x1 layer keeps only g·σ·u·v / σ), so the
        # error is measured against the size of G/σ as well.
        scale = (grads[i].abs().max().double() / s64[i].abs()).item() if grads[i].numel() else 0.0
        assert_close(out, ref, tol, f"dL/dW of layer {i} {tuple(shapes[i])}", scale)
    return dict(sigmas=sigmas, uv=uv, us=us, vs=vs, w_sn=w_sn, d_weights=d_weights)


# ---------------------------------------------------------------- kernels vs reference
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_shapes(dtype, mode, layout):
    training, n_iter, u_first = mode
    run_and_check(ODD_LAYERS, dtype, training=training, n_iter=n_iter, u_first=u_first, layout=layout)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", MODES[:2] + MODES[4:], ids=MODE_IDS[:2] + MODE_IDS[4:])
def test_large_shapes(mode):
    training, n_iter, u_first = mode
    run_and_check(LARGE_LAYERS, torch.float32, training=training, n_iter=n_iter, u_first=u_first)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("model", list(MODEL_LAYERS))
def test_model_shapes(model):
    # Alternate the flavour's order between models; every model in training mode.
    u_first = list(MODEL_LAYERS).index(model) % 2 == 0
    run_and_check(MODEL_LAYERS[model], torch.float32, u_first=u_first)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_model_shapes_half(dtype):
    run_and_check(MODEL_LAYERS["sngan_cifar_resnet_d"], dtype, u_first=False, n_iter=2)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("grad_sigmas", [False, True])
def test_without_grad_sigmas(grad_sigmas):
    run_and_check(ODD_LAYERS, torch.float32, grad_sigmas=grad_sigmas)


# Weights so small that |W v| < eps: u, v are then not unit vectors and σ = u·W v is 1e-25 to
# 1e-33, where torch's float32 σ is still within 2e-7 of float64's but a σ taken as
# |x|²/max(|x|, eps) is not (|x|² below float32's normal range, or 0: W/σ = inf). The hook
# order shrinks σ further than the parametrization order: a larger scale keeps G/σ finite.
# (More iterations, or smaller weights, take σ or G/σ out of float32's range in torch too.)
TINY = [((40, 3), 0), ((3, 40), 0), ((16, 8, 3, 3), 0)]
TINY_CASES = {"train-param": ((True, 1, True), 1e-17), "train-hook": ((True, 1, False), 1e-16)}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode, scale", list(TINY_CASES.values()), ids=list(TINY_CASES))
def test_tiny_weights(mode, scale):
    training, n_iter, u_first = mode
    run_and_check(TINY, torch.float32, training=training, n_iter=n_iter, u_first=u_first, scale=scale)


# Layer tables are kernel parameters (csrc/layer_table.h): a call of up to 16 layers takes the
# small table, up to 64 the medium one, up to 128 the big one, and a call with more layers runs
# in chunks of 128, each numbering its items from 0 and taking the table that fits it.
TABLE_CASES = {
    "16-small": 16,
    "17-medium": 17,
    "65-big": 65,
    "145-big-then-medium": 145,  # chunks of 128 and 17
}


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", [MODES[0], MODES[3], MODES[4]], ids=["train-param", "train3-hook", "eval"])
@pytest.mark.parametrize("count", list(TABLE_CASES.values()), ids=list(TABLE_CASES))
def test_table_sizes_and_chunks(count, mode):
    training, n_iter, u_first = mode
    layers = (ODD_LAYERS * (count // len(ODD_LAYERS) + 1))[:count]
    run_and_check(layers, torch.float32, training=training, n_iter=n_iter, u_first=u_first, layout="offset")


@pytest.mark.cuda
@cuda
def test_zero_iterations_in_training_is_eval():
    # range(0) in the reference: no update, σ = u·W v from the buffers.
    run_and_check(ODD_LAYERS, torch.float32, training=True, n_iter=0)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reruns_are_bit_identical(dtype):
    layers = ODD_LAYERS + [((2048, 4608), 0), ((512, 256, 4, 4), 1)]
    for mode in (MODES[2], MODES[3], MODES[4]):
        training, n_iter, u_first = mode
        runs = [
            run_and_check(layers, dtype, training=training, n_iter=n_iter, u_first=u_first, seed=3)
            for _ in range(2)
        ]
        for key, first in runs[0].items():
            second = runs[1][key]
            pairs = zip(first, second) if isinstance(first, list) else [(first, second)]
            for i, (a, b) in enumerate(pairs):
                assert torch.equal(a, b), f"{key}[{i}] differs between two identical calls ({mode})"


# ---------------------------------------------------------------------- the op contract
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    layers = [((6, 4, 3, 3), 0), ((4, 6, 3, 3), 1), ((1, 5), 0), ((7, 3, 2), 2)]
    weights, us, vs, dims = make_layers(layers, dtype, "cuda")
    for training in (True, False):
        torch.library.opcheck(OPS.power_iteration.default, (weights, us, vs, dims, True, 1, EPS, training))
    sigmas, uv = OPS.power_iteration(weights, us, vs, dims, False, 1, EPS, True)
    leaves = [w.detach().clone().requires_grad_() for w in weights]
    torch.library.opcheck(OPS.normalize.default, (leaves, sigmas, uv, dims))
    grads = [torch.randn_like(w) for w in weights]
    w_sn = [w / 2 for w in weights]
    for gsig in (None, torch.randn_like(sigmas)):
        torch.library.opcheck(OPS.normalize_backward.default, (grads, gsig, w_sn, sigmas, uv, dims))
    for training in (True, False):
        torch.library.opcheck(torch.ops.sn_cuda.spectral_norm.default, (leaves, us, vs, dims, False, 1, EPS, training))


def _count_kernels(fn) -> int:
    """CUDA kernels `fn` launches (copies and memsets not counted)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for n in names if not n.lower().startswith(("memcpy", "memset")))


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(
    "layers, chunks",
    [(MODEL_LAYERS["biggan_deep128_d"] + ODD_LAYERS[:6], 1), ((ODD_LAYERS * 10)[:130], 2)],
    ids=["one-chunk", "two-chunks"],
)
def test_launches_per_call_and_no_sync(layers, chunks):
    weights, us, vs, dims = make_layers(layers, torch.float32, "cuda")
    grads = [torch.randn_like(w) for w in weights]

    def forward():
        sigmas, uv = OPS.power_iteration(weights, us, vs, dims, True, 1, EPS, True)
        return OPS.normalize(weights, sigmas, uv, dims), sigmas, uv

    (w_sn, _), sigmas, uv = forward()  # warm up the allocators
    grad_sigmas = torch.ones_like(sigmas)

    def backward():
        return OPS.normalize_backward(grads, grad_sigmas, w_sn, sigmas, uv, dims)

    backward()
    # (at least one: a profiler that records nothing must not pass the test)
    assert 1 <= _count_kernels(forward) <= 4 * chunks
    assert 1 <= _count_kernels(backward) <= 2 * chunks
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        forward()
        backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_vectors_sharing_memory(ops, device):
    """u and v are written in place by many blocks at once: vectors that share memory with
    themselves, each other or a weight are refused (a race on the GPU); vectors packed side by
    side in one buffer, or interleaved columns of one matrix, are not."""
    weights, us, vs, dims = make_layers([((4, 3), 0), ((4, 2), 0)], torch.float32, device)
    packed = torch.cat([us[0], vs[0]])  # u_0 and v_0 side by side: no overlap
    columns = torch.stack([us[0], us[1]], dim=1)  # u_0 and u_1 interleaved: no overlap
    for u, v in [([packed[:4], us[1]], [packed[4:], vs[1]]), ([columns[:, 0], columns[:, 1]], vs)]:
        sigmas, _ = ops.power_iteration(weights, u, v, dims, True, 1, EPS, True)
        assert sigmas.isfinite().all()
    sliced = torch.cat([us[0], vs[0][:2]])  # u_0 = sliced[:4], v_0 = sliced[2:5]: two overlap
    sliced = torch.cat([sliced, torch.zeros(1, device=device)])
    # Strided vectors, element by element: one column twice, a column that crosses a dense v,
    # a column of a weight, and a column of one matrix against another column of it that
    # starts one row down (stride 2, elements 2..8 of one buffer against 0..6).
    grid = torch.zeros(5, 2, device=device)
    cases = [
        (weights, [columns[:, 0], columns[:, 0]], vs, r"us\[[01]\] shares memory with us\[[01]\]"),
        (weights, [grid[:4, 0], us[1]], [grid.view(-1)[:3], vs[1]], r"us\[0\] shares memory with vs\[0\]"),
        (weights, [weights[0].t()[0].clone(), weights[1][:, 0]], vs, r"us\[1\] shares memory with weights\[1\]"),
        (weights, [grid[:4, 0], grid[1:, 0]], vs, r"us\[[01]\] shares memory with us\[[01]\]"),
        (weights, [torch.ones(1, device=device).expand(4), us[1]], vs, r"us\[0\] has elements that share memory"),
        (weights, [us[0], us[0]], vs, r"us\[[01]\] shares memory with us\[[01]\]"),
        (weights, [sliced[:4], us[1]], [sliced[2:5], vs[1]], r"(us\[0\] shares memory with vs\[0\]|vs\[0\] shares memory with us\[0\])"),
        (weights, [weights[0].view(-1)[:4], us[1]], vs, r"(us\[0\] shares memory with weights\[0\]|weights\[0\] shares memory with us\[0\])"),
    ]
    for ws, u, v, message in cases:
        before = [t.clone() for t in u + v]
        with pytest.raises(RuntimeError, match=message):
            ops.power_iteration(ws, u, v, dims, True, 1, EPS, True)
        for t, old in zip(u + v, before):  # refused before any launch: nothing written
            assert torch.equal(t, old)


@pytest.mark.cuda
@cuda
def test_vectors_sharing_memory_are_refused():
    check_vectors_sharing_memory(OPS, "cuda")


def check_argument_errors(ops, device, other_device):
    """Each bad argument refused with a message that names it (kernels and reference alike)."""
    weights, us, vs, dims = make_layers([((4, 3), 0), ((5, 2), 0)], torch.float32, device)
    cases = [
        ((weights, us[:1], vs, dims), "us has 1 tensors"),
        ((weights, us, vs, [0]), "dims has 1 entries"),
        ((weights, us, vs, [0, 2]), "dims[1] = 2 is out of range"),
        ((weights, [us[0], us[0]], vs, dims), "us[1] must be a vector of 5 elements"),
        ((weights, us, [vs[1], vs[1]], dims), "vs[0] must be a vector of 3 elements"),
        ((weights, [us[0], us[1].double()], vs, dims), "us[1] is Double"),
        (([weights[0], weights[1].half()], us, vs, dims), "weights[1] is Half"),
    ]
    if other_device is not None:  # (a meta tensor would send the call to the fake kernel)
        cases.append(((weights, [us[0], us[1].to(other_device)], vs, dims), f"us[1] is on {other_device}"))
    for (ws, u, v, d), message in cases:
        before = [t.clone() for t in us + vs]
        with pytest.raises(RuntimeError, match=message.replace("[", r"\[").replace("]", r"\]")):
            ops.power_iteration(ws, u, v, d, True, 1, EPS, True)
        assert all(torch.equal(t, old) for t, old in zip(us + vs, before)), message
    sigmas, uv = ops.power_iteration(weights, us, vs, dims, True, 1, EPS, True)
    with pytest.raises(RuntimeError, match="sigmas must be a vector of 2 elements"):
        ops.normalize(weights, sigmas[:1], uv, dims)
    with pytest.raises(RuntimeError, match="uv must be a vector of 14 elements"):
        ops.normalize(weights, sigmas, uv[:-1], dims)
    with pytest.raises(RuntimeError, match="grads has 1 tensors but w_sn has 2"):
        ops.normalize_backward(weights[:1], None, weights, sigmas, uv, dims)
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        ops.normalize_backward([weights[0], weights[0]], None, weights, sigmas, uv, dims)
    with pytest.raises(RuntimeError, match="grad_sigmas must be Float"):
        ops.normalize_backward(weights, sigmas.double(), weights, sigmas, uv, dims)


@pytest.mark.cuda
@cuda
def test_argument_errors_name_the_argument():
    check_argument_errors(OPS, "cuda", "cpu")


def test_argument_errors_of_the_reference():
    # The default (any device) implementations check what the kernels check, as they word it.
    check_argument_errors(OPS, "cpu", None)
    # With no tensor to dispatch on, every device's call ends here.
    with pytest.raises(RuntimeError, match="weights must hold at least one tensor"):
        OPS.power_iteration([], [], [], [], True, 1, EPS, True)


# ------------------------------------------------------------ the modules on the kernels
@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("training", [True, False])
def test_modules_match_torch_cuda_flavours(flavour, layer, training, make_twins):
    twins = make_twins(flavour, layer, device="cuda")
    twins.step([twins.input(), twins.input()], training=training)
    twins.assert_vectors_same("after two calls and one backward")


# ------------------------------------------------------- the checks themselves, on CPU
# The reference ops on the CPU stand in for the kernels: the checks must pass for them and
# fail for kernels that are slightly wrong. (The CPU reference cannot reshape a weight with
# rows = 0, hence the list without it.)
CPU_LAYERS = [layer for layer in ODD_LAYERS if layer[0] != (0, 6) and layer[0] != (24576, 20)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", [MODES[0], MODES[3], MODES[4]], ids=["train-param", "train3-hook", "eval"])
def test_checks_pass_with_the_reference_on_cpu(dtype, mode):
    training, n_iter, u_first = mode
    run_and_check(CPU_LAYERS, dtype, training=training, n_iter=n_iter, u_first=u_first, device="cpu", layout="offset")


def _perturbed(op: str, fn: Callable) -> Ops:
    return dataclasses.replace(OPS, **{op: fn})


def _off_by_a_little(out):
    """`out` with one element of its largest tensor moved by 1e-4 relative."""
    tensors = out if isinstance(out, (list, tuple)) else [out]
    flat = [t for t in tensors if isinstance(t, torch.Tensor)] + [
        t for x in tensors if isinstance(x, list) for t in x
    ]
    target = max(flat, key=lambda t: t.numel())
    with torch.no_grad():
        view = target.view(-1)
        view[view.numel() // 2] += 1e-4 * view.abs().max()
    return out


WRONG_KERNELS = {
    "sigma": _perturbed(
        "power_iteration", lambda *a: (lambda s, uv: (s * (1 + 1e-4), uv))(*OPS.power_iteration(*a))
    ),
    "uv": _perturbed("power_iteration", lambda *a: (lambda s, uv: (s, _off_by_a_little(uv)))(*OPS.power_iteration(*a))),
    "no_update": _perturbed(
        "power_iteration", lambda w, u, v, d, uf, n, eps, tr: OPS.power_iteration(w, u, v, d, uf, n, eps, False)
    ),
    "w_sn": _perturbed("normalize", lambda *a: _off_by_a_little(OPS.normalize(*a))),
    "grad": _perturbed("normalize_backward", lambda *a: _off_by_a_little(OPS.normalize_backward(*a))),
    "grad_sigmas_ignored": _perturbed(
        "normalize_backward", lambda g, gs, *rest: OPS.normalize_backward(g, None, *rest)
    ),
}


@pytest.mark.parametrize("wrong", list(WRONG_KERNELS))
def test_checks_catch_a_wrong_kernel(wrong):
    with pytest.raises(AssertionError):
        run_and_check(CPU_LAYERS, torch.float32, device="cpu", ops=WRONG_KERNELS[wrong])
