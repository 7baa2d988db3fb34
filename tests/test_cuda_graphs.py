"""A whole training step with sn_cuda.batch captured in a CUDA graph, replayed, equals eager.

The step is the GAN discriminator's: D(real), D(fake), one backward, one SGD (momentum)
step — torch's "whole network capture" recipe (warm-up on a side stream, ``zero_grad(
set_to_none=True)`` before capture, static inputs refilled before each replay). Capturing at
all means the fused forward, the power-iteration update of u/v and the backward make no host
synchronisation and no pageable copies; replaying must then move parameters, u/v and the σ
that ``sn_cuda.sigmas`` reports exactly as an eager twin does, step after step.
"""

import pytest
import torch
from torch import nn

import sn_cuda
import sn_cuda.legacy

pytestmark = pytest.mark.cuda

SN = {"param": sn_cuda.spectral_norm, "legacy": sn_cuda.legacy.spectral_norm}


def build(flavour: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.LeakyReLU(0.2), nn.ConvTranspose2d(32, 16, 2, stride=2), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(16 * 16 * 16, 1),
    )
    torch.manual_seed(1)
    for i in (0, 2, 4, 7):
        SN[flavour](model[i])
    model = model.cuda()
    sn_cuda.batch(model)
    return model


def train_step(model, opt, real, fake):
    out_real, out_fake = model(real), model(fake)
    loss = nn.functional.softplus(-out_real).mean() + nn.functional.softplus(out_fake).mean()
    loss.backward()
    opt.step()
    return loss


def batches(n):
    gen = torch.Generator(device="cuda").manual_seed(2)
    return [
        (torch.randn(8, 3, 16, 16, device="cuda", generator=gen),
         torch.randn(8, 3, 16, 16, device="cuda", generator=gen))
        for _ in range(n)
    ]


@pytest.mark.parametrize("flavour", ["param", "legacy"])
def test_captured_training_step_replays_like_eager(flavour):
    graphed, eager = build(flavour), build(flavour)
    opt_g = torch.optim.SGD(graphed.parameters(), lr=0.05, momentum=0.9)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    warmup, replays = batches(3), batches(4)

    # Warm-up (allocator, optimizer state) on a side stream, then the same steps on the twin.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for real, fake in warmup:
            opt_g.zero_grad(set_to_none=True)
            train_step(graphed, opt_g, real, fake)
    torch.cuda.current_stream().wait_stream(side)
    for real, fake in warmup:
        opt_e.zero_grad(set_to_none=True)
        train_step(eager, opt_e, real, fake)

    static_real, static_fake = (t.clone() for t in replays[0])
    graph = torch.cuda.CUDAGraph()
    opt_g.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = train_step(graphed, opt_g, static_real, static_fake)
    captured = {k: v.clone() for k, v in graphed.state_dict().items()}  # capture runs nothing

    tol = dict(rtol=1e-5, atol=1e-6)
    for step, (real, fake) in enumerate(replays):
        static_real.copy_(real)
        static_fake.copy_(fake)
        graph.replay()
        opt_e.zero_grad(set_to_none=True)
        loss = train_step(eager, opt_e, real, fake)
        torch.cuda.synchronize()
        when = f"replay {step}"
        torch.testing.assert_close(static_loss, loss, **tol, msg=f"loss, {when}")
        for (key, a), b in zip(graphed.named_parameters(), eager.parameters()):
            torch.testing.assert_close(a, b, **tol, msg=f"{key}, {when}")
            torch.testing.assert_close(a.grad, b.grad, **tol, msg=f"grad of {key}, {when}")
        for (key, a), b in zip(graphed.named_buffers(), eager.buffers()):
            torch.testing.assert_close(a, b, **tol, msg=f"{key}, {when}")
        # σ of the last forward lives in the graph's memory: the replay refreshed it.
        sig_g, sig_e = sn_cuda.sigmas(graphed), sn_cuda.sigmas(eager)
        assert sig_g.keys() == sig_e.keys() == {"0", "2", "4", "7"}
        for key in sig_g:
            assert sig_g[key] == pytest.approx(sig_e[key], rel=1e-5), f"sigma of {key}, {when}"
    # The replays trained: parameters and u/v moved away from where the capture found them.
    for key, value in graphed.state_dict().items():
        assert not torch.equal(value, captured[key]), f"{key} did not move over the replays"


# The three ops alone, captured with many layers: the layer tables are kernel parameters (16,
# 64 or 128 layers; more run in chunks, csrc/layer_table.h), so a replay must not depend on
# any host memory the capture saw. Pinned host blocks are allocated and overwritten between
# replays, as a data loader would: a table copied from pinned memory at capture would be read
# from a block reused for something else.
@pytest.mark.parametrize("count", [20, 130], ids=["one-chunk", "two-chunks"])
def test_captured_op_calls_replay_like_eager(count):
    ops = torch.ops.sn_cuda
    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = [((4 + i % 5, 3 + i % 7, 3, 3), 1 if i % 4 == 3 else 0) for i in range(count)]
    weights = [torch.randn(shape, device="cuda", generator=gen) for shape, _ in shapes]
    dims = [dim for _, dim in shapes]
    rows = [w.shape[d] for w, d in zip(weights, dims)]
    us = [torch.nn.functional.normalize(torch.randn(r, device="cuda", generator=gen), dim=0) for r in rows]
    vs = [torch.nn.functional.normalize(torch.randn(w.numel() // r, device="cuda", generator=gen), dim=0)
          for w, r in zip(weights, rows)]
    grads = [torch.randn_like(w) for w in weights]
    grad_sigmas = torch.randn(count, device="cuda", generator=gen)

    def call(us, vs):
        sigmas, uv = ops.power_iteration(weights, us, vs, dims, True, 1, 1e-12, True)
        w_sn, _ = ops.normalize(weights, sigmas, uv, dims)
        d_weights = ops.normalize_backward(grads, grad_sigmas, w_sn, sigmas, uv, dims)
        return [sigmas, uv, *w_sn, *d_weights]

    us_g, vs_g = [u.clone() for u in us], [v.clone() for v in vs]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(us_g, vs_g)  # warm-up: one iteration, as on the eager twin below
    torch.cuda.current_stream().wait_stream(side)
    call(us, vs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = call(us_g, vs_g)

    for replay in range(3):
        graph.replay()
        for _ in range(4):
            torch.empty(1 << 16, dtype=torch.uint8, pin_memory=True).fill_(255)
        expected = call(us, vs)
        torch.cuda.synchronize()
        # The same kernels on the same inputs, with fixed-order reductions: bit-identical.
        for i, (a, b) in enumerate(zip(static_out, expected)):
            assert torch.equal(a, b), f"output {i} differs from eager at replay {replay}"
        for i in range(count):
            assert torch.equal(us_g[i], us[i]) and torch.equal(vs_g[i], vs[i]), f"u/v of layer {i}, replay {replay}"
