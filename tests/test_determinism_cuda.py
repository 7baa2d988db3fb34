"""Determinism on the GPU: identical inputs give bit-identical outputs and buffers, every run.

The kernels reduce in a fixed order (no float atomics whose order depends on scheduling), so
two runs of the same computation must agree to the bit: W/σ, σ, the u/v updates and ∂L/∂W,
for layers large enough to spread over many blocks, in every dtype; and whole models, batched
or per layer (cuDNN's own convolution algorithms are pinned to deterministic ones there, as
this is about sn_cuda's numbers). The CPU runs check the test itself where no GPU is lent.
"""

import pytest
import torch
from torch import nn

import sn_cuda
import sn_cuda.legacy
from sn_cuda import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SN = {"param": sn_cuda.spectral_norm, "legacy": sn_cuda.legacy.spectral_norm}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def layer_shapes(device):
    """(shape, dim): tall, wide, dim 1 (ConvTranspose), one row, odd sizes; big on the GPU."""
    if device == "cuda":
        return [((4096, 4096), 0), ((24576, 20), 0), ((7, 30001), 0), ((256, 512, 3, 3), 0),
                ((512, 256, 4, 4), 1), ((1, 1000), 0), ((3, 5, 7), 1)]
    return [((64, 48), 0), ((300, 5), 0), ((8, 16, 3, 3), 1), ((1, 33), 0)]


def op_run(device, dtype, u_first, training):
    """One fused call and its backward from a fixed RNG state: everything it produces."""
    gen = torch.Generator(device=device).manual_seed(0)
    weights, us, vs, dims, grads = [], [], [], [], []
    for shape, dim in layer_shapes(device):
        w = torch.randn(shape, device=device, generator=gen).to(dtype).requires_grad_()
        rows = shape[dim]
        cols = w.numel() // rows
        us.append(nn.functional.normalize(torch.randn(rows, device=device, generator=gen), dim=0).to(dtype))
        vs.append(nn.functional.normalize(torch.randn(cols, device=device, generator=gen), dim=0).to(dtype))
        grads.append(torch.randn(shape, device=device, generator=gen).to(dtype))
        weights.append(w)
        dims.append(dim)
    w_sn, sigmas = ops.spectral_norm(weights, us, vs, dims, u_first, 2, 1e-12, training)
    d_weights = torch.autograd.grad(w_sn, weights, grads)
    return [*w_sn, sigmas, *us, *vs, *d_weights]


def assert_bit_identical(first, second):
    assert len(first) == len(second)
    for i, (a, b) in enumerate(zip(first, second)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), f"tensor {i} differs between identical runs"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("u_first", [True, False], ids=["param_order", "hook_order"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_call_is_bit_reproducible(device, dtype, u_first, training):
    if device == "cuda":
        assert ops.uses_kernels(torch.empty(1, device=device, dtype=dtype))
    first = op_run(device, dtype, u_first, training)
    for _ in range(2):
        assert_bit_identical(first, op_run(device, dtype, u_first, training))


def model_run(device, dtype, flavour, batched):
    torch.manual_seed(0)
    # Multi-block sizes on the GPU (a 57600 x 256 linear); a quick check of the test on the CPU.
    width, size, hidden = (64, 16, 256) if device == "cuda" else (4, 6, 8)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3), nn.LeakyReLU(0.2), nn.ConvTranspose2d(width, width, 4, stride=2),
        nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(width * (2 * size - 2) ** 2, hidden),
        nn.LeakyReLU(0.2), nn.Linear(hidden, 1),
    )
    torch.manual_seed(1)
    for i in (0, 2, 5, 7):
        SN[flavour](model[i])
    model = model.to(device=device, dtype=dtype)
    if batched:
        sn_cuda.batch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator(device=device).manual_seed(2)
    out = []
    for _ in range(2):  # two training steps: D(real), D(fake), one backward
        real = torch.randn(4, 3, size, size, device=device, generator=gen).to(dtype)
        fake = torch.randn(4, 3, size, size, device=device, generator=gen).to(dtype)
        opt.zero_grad(set_to_none=True)
        outs = [model(real), model(fake)]
        (nn.functional.softplus(-outs[0]).mean() + nn.functional.softplus(outs[1]).mean()).backward()
        out += [o.detach() for o in outs] + [p.grad.clone() for p in model.parameters()]
        opt.step()
    model.eval()
    with torch.no_grad():
        out.append(model(torch.randn(4, 3, size, size, device=device, generator=gen).to(dtype)))
    return out + [v.clone() for v in model.state_dict().values()]


@pytest.mark.parametrize("batched", [False, True], ids=["per_layer", "batched"])
@pytest.mark.parametrize("flavour", ["param", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_training_is_bit_reproducible(device, dtype, flavour, batched, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    first = model_run(device, dtype, flavour, batched)
    assert_bit_identical(first, model_run(device, dtype, flavour, batched))
