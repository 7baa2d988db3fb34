"""DDP and FSDP2: two processes, gloo on localhost (CPU), each flavour and batch().

Each rank trains a copy of the same spectral-normalized model on its half of every global
batch, for a few optimizer steps. Checked after every step:

* u and v are bit-identical on both ranks (DDP broadcasts rank 0's buffers before each
  forward, and both ranks iterate on identical weights);
* the gradients DDP leaves (averaged over the ranks) equal, to float tolerance, those of a
  single process on the concatenated batch, and the buffers follow the single process too.

The same holds under FSDP2 (``fully_shard`` on each spectral-normalized layer and the root,
after ``sn_cuda.batch``): the weights are sharded between forwards, so batch() leaves those
layers to compute in their own forward, where FSDP has gathered them.

One spawn runs every configuration, to keep the two interpreters' start-up (torch imports)
paid once.
"""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import sn_cuda
import sn_cuda.legacy

WORLD = 2
STEPS = 3
PER_RANK = 3
# torch_flavours_batched: torch's two flavours (mixed) taken over by sn_cuda.batch.
CONFIGS = ["legacy", "param", "param_batched", "torch_flavours_batched"]
FSDP_CONFIGS = ["legacy", "param", "legacy_batched", "param_batched", "torch_flavours_batched"]
SN_LAYERS = (0, 2, 4, 6)


def build(config: str) -> nn.Module:
    """The same model in every process (seeded): convs, a transposed conv, a linear head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.LeakyReLU(0.2), nn.ConvTranspose2d(6, 4, 2, stride=2),
        nn.LeakyReLU(0.2), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 1),
    )
    torch.manual_seed(1)
    layers = [model[i] for i in SN_LAYERS]
    for i, layer in enumerate(layers):
        if config.startswith("legacy"):
            sn_cuda.legacy.spectral_norm(layer)
        elif config.startswith("param"):
            sn_cuda.spectral_norm(layer)
        elif i % 2:  # torch's own flavours, mixed, taken over by batch()
            torch.nn.utils.spectral_norm(layer)
        else:
            torch.nn.utils.parametrizations.spectral_norm(layer)
    if config.endswith("batched"):
        sn_cuda.batch(model)
    return model


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    return nn.functional.softplus(-out).mean()  # the GAN discriminator's loss on real data


def train(model, batches, wrap=None):
    """STEPS optimizer steps; per step the gradients (before the step) and the buffers."""
    net = wrap(model) if wrap else model
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    record = []
    for x in batches:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x)).backward()
        grads = {k: _whole(p.grad) for k, p in model.named_parameters()}
        opt.step()
        record.append((grads, {k: b.clone() for k, b in model.named_buffers()}))
    return record


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t.clone()


def load_vectors_on_rank_0(model: nn.Module) -> None:
    """What rank 0 alone loading a checkpoint leaves: u, v of its own (seeded), relying on
    DDP to broadcast them to the other ranks."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for buffer in model.buffers():
            buffer.copy_(nn.functional.normalize(torch.randn(buffer.shape, generator=gen), dim=0))


def batch_of_ddp(model: nn.Module) -> nn.Module:
    net = DDP(model)
    sn_cuda.batch(net)
    return net


def fsdp(model: nn.Module) -> nn.Module:
    for i in SN_LAYERS:
        fully_shard(model[i])
    return fully_shard(model)


def _worker(rank, init_file, out_dir, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for config in CONFIGS:
            mine = [x[rank * PER_RANK : (rank + 1) * PER_RANK] for x in data]
            results[config] = train(build(config), mine, wrap=DDP)
        for config in FSDP_CONFIGS:
            mine = [x[rank * PER_RANK : (rank + 1) * PER_RANK] for x in data]
            results[f"fsdp_{config}"] = train(build(config), mine, wrap=fsdp)
        # batch() given the DDP wrapper, with u, v loaded on rank 0 only: the layers must use
        # the vectors DDP broadcasts.
        model = build("param")
        net = batch_of_ddp(model)
        if rank == 0:  # after DDP's own broadcast at construction
            load_vectors_on_rank_0(model)
        results["batch_of_ddp"] = train(model, mine, wrap=lambda _: net)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    torch.manual_seed(2)
    data = [torch.randn(WORLD * PER_RANK, 3, 6, 6) for _ in range(STEPS)]
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(init_file, tmp, data), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    return data, ranks


@pytest.mark.parametrize("config", CONFIGS + [f"fsdp_{c}" for c in FSDP_CONFIGS])
def test_ddp_matches_one_process_on_the_whole_batch(config, ddp_results):
    data, ranks = ddp_results
    single = train(build(config.removeprefix("fsdp_")), data)
    for step in range(STEPS):
        (g0, b0), (g1, b1) = ranks[0][config][step], ranks[1][config][step]
        g_ref, b_ref = single[step]
        assert list(b0) == list(b_ref) and len(b0) == 8  # u and v of the four layers
        for key in b0:
            assert torch.equal(b0[key], b1[key]), f"{key} differs across ranks at step {step}"
            torch.testing.assert_close(b0[key], b_ref[key], rtol=1e-5, atol=1e-6, msg=f"{key}, step {step}")
        assert list(g0) == list(g_ref)
        for key in g0:
            assert torch.equal(g0[key], g1[key]), f"grad of {key} differs across ranks"
            torch.testing.assert_close(g0[key], g_ref[key], rtol=1e-4, atol=1e-6, msg=f"grad of {key}, step {step}")


def test_batch_of_the_ddp_wrapper_uses_the_broadcast_vectors(ddp_results):
    # DDP's forward broadcasts rank 0's buffers, then runs its module: batch(ddp) stages the
    # layers there, so rank 1 computes with rank 0's u, v, as a single process would.
    data, ranks = ddp_results
    model = build("param")
    load_vectors_on_rank_0(model)
    single = train(model, data)
    for step in range(STEPS):
        (g0, b0), (g1, b1) = ranks[0]["batch_of_ddp"][step], ranks[1]["batch_of_ddp"][step]
        g_ref, b_ref = single[step]
        for key in b0:
            assert torch.equal(b0[key], b1[key]), f"{key} differs across ranks at step {step}"
            torch.testing.assert_close(b0[key], b_ref[key], rtol=1e-5, atol=1e-6, msg=f"{key}, step {step}")
        for key in g0:
            assert torch.equal(g0[key], g1[key]), f"grad of {key} differs across ranks"
            torch.testing.assert_close(g0[key], g_ref[key], rtol=1e-4, atol=1e-6, msg=f"grad of {key}, step {step}")
