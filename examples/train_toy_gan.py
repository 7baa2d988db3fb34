"""A small SN-GAN on the ring of 8 Gaussians, trained twice: with torch's spectral norm, then
with sn_cuda batched (``sn_cuda.apply``: every Linear of D normalized in one fused call per
forward). Same seed, same data, same noise for both runs.

    python examples/train_toy_gan.py                  # 4000 steps on the GPU if present, else CPU
    python examples/train_toy_gan.py --device cpu --steps 1000

Prints each run's step time, final losses and which of the 8 modes the generator covers
(a mode is covered when at least 1% of 2000 samples land within 3 standard deviations of it),
and exits with status 1 if the two runs cover different modes. On a CPU sn_cuda computes
torch's exact op sequence, so the two runs are identical; on a GPU the fused kernels round
differently and the runs drift apart, yet must find the same modes.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import sn_cuda

N_MODES, RADIUS, STD = 8, 2.0, 0.02
Z_DIM, WIDTH, BATCH = 16, 128, 256
# Two time-scale updates (D learns faster than G), as SNGAN-style toy setups need.
LR_G, LR_D, BETAS = 2e-4, 1e-3, (0.5, 0.9)
# SN holds every layer of D to σ = 1; a fixed gain at D's input sets D's Lipschitz bound to
# D_GAIN, enough to tell modes 1.5 apart with the hinge loss's margin of 1.
D_GAIN = 10.0
EVAL_SAMPLES, MIN_SHARE = 2000, 0.01
CENTERS = torch.tensor(
    [[RADIUS * math.cos(2 * math.pi * k / N_MODES), RADIUS * math.sin(2 * math.pi * k / N_MODES)]
     for k in range(N_MODES)]
)


def sample_real(n: int, gen: torch.Generator) -> torch.Tensor:
    """n points of the ring: a random centre each, plus N(0, STD²) noise (on the CPU)."""
    modes = torch.randint(N_MODES, (n,), generator=gen)
    return CENTERS[modes] + STD * torch.randn(n, 2, generator=gen)


def mlp(d_in: int, d_out: int, act: type[nn.Module]) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d_in, WIDTH), act(), nn.Linear(WIDTH, WIDTH), act(),
        nn.Linear(WIDTH, WIDTH), act(), nn.Linear(WIDTH, d_out),
    )


class Scale(nn.Module):
    """x -> gain * x (no parameters: spectral norm leaves it alone)."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain

    def forward(self, x):
        return self.gain * x


def modes_covered(points: torch.Tensor) -> tuple[list[int], float]:
    """(modes with ≥ MIN_SHARE of the points within 3·STD, share of points within 3·STD of any)."""
    dist = torch.cdist(points, CENTERS)
    nearest_dist, nearest = dist.min(dim=1)
    good = nearest_dist < 3 * STD
    counts = torch.bincount(nearest[good], minlength=N_MODES)
    covered = [k for k in range(N_MODES) if counts[k] >= MIN_SHARE * len(points)]
    return covered, good.float().mean().item()


def evaluate(G: nn.Module, device: torch.device, seed: int) -> tuple[list[int], float]:
    """modes_covered() of EVAL_SAMPLES generator samples from fixed noise."""
    z = torch.randn(EVAL_SAMPLES, Z_DIM, generator=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        return modes_covered(G(z.to(device)).float().cpu())


def train(flavour: str, steps: int, device: torch.device, seed: int, log_every: int = 0) -> dict:
    """Train G and D (SN on every Linear of D); flavour "torch" or "sn_cuda"."""
    torch.manual_seed(seed)
    G = mlp(Z_DIM, 2, nn.ReLU).to(device)
    D = nn.Sequential(Scale(D_GAIN), mlp(2, 1, lambda: nn.LeakyReLU(0.2))).to(device)
    linears = [m for m in D.modules() if isinstance(m, nn.Linear)]
    if flavour == "torch":
        for m in linears:
            torch.nn.utils.parametrizations.spectral_norm(m)
        handle = None
    else:
        handle = sn_cuda.apply(D)  # parametrization flavour + sn_cuda.batch(D)
    opt_g = torch.optim.Adam(G.parameters(), lr=LR_G, betas=BETAS)
    opt_d = torch.optim.Adam(D.parameters(), lr=LR_D, betas=BETAS)
    # Learning rates decay linearly to 0 (as SNGAN trains), so that the final G is a settled
    # one rather than a snapshot of the oscillation GANs show at a constant rate.
    decay = [torch.optim.lr_scheduler.LambdaLR(o, lambda i: 1 - i / steps) for o in (opt_g, opt_d)]
    data_gen = torch.Generator().manual_seed(seed + 1)  # data and noise: same in both runs

    step_s, losses = [], []
    for i in range(1, steps + 1):
        real = sample_real(BATCH, data_gen).to(device)
        z_d = torch.randn(BATCH, Z_DIM, generator=data_gen).to(device)
        z_g = torch.randn(BATCH, Z_DIM, generator=data_gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        # D: hinge loss on real and fake in one forward (one SN computation per step).
        with torch.no_grad():
            fake = G(z_d)
        out = D(torch.cat([real, fake]))
        loss_d = F.relu(1.0 - out[:BATCH]).mean() + F.relu(1.0 + out[BATCH:]).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # G: the hinge generator loss.
        loss_g = -D(G(z_g)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        for sched in decay:
            sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        step_s.append(time.perf_counter() - t0)
        losses.append((loss_d.item(), loss_g.item()))
        if log_every and i % log_every == 0 and i < steps:
            covered, _ = evaluate(G, device, seed)
            print(f"  [{flavour}] step {i}: D {loss_d.item():.4f} G {loss_g.item():.4f}, "
                  f"modes covered {len(covered)}/{N_MODES}", flush=True)

    covered, good_share = evaluate(G, device, seed)
    if handle is not None:
        handle.remove()
    tail = losses[-100:]
    return {
        "step_ms": 1e3 * statistics.median(step_s[min(10, steps - 1):]),  # after warm-up
        "loss_d": statistics.fmean(l[0] for l in tail),
        "loss_g": statistics.fmean(l[1] for l in tail),
        "covered": covered,
        "good_share": good_share,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1000, help="progress line every N steps (0: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: these layers are too small to gain from more)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    print(f"8-Gaussian ring, {args.steps} steps of batch {BATCH} on {device}; "
          f"sn_cuda backend: {sn_cuda.backend()} ({sn_cuda.backend().reason})")

    results = {}
    for flavour, label in (("torch", "torch spectral_norm"), ("sn_cuda", "sn_cuda batched")):
        r = results[flavour] = train(flavour, args.steps, device, args.seed, args.log_every)
        print(f"{label:>20}: {r['step_ms']:.2f} ms/step (median), last-100-step mean losses "
              f"D {r['loss_d']:.4f} G {r['loss_g']:.4f}; modes covered {len(r['covered'])}/{N_MODES} "
              f"{r['covered']}, {100 * r['good_share']:.0f}% of samples within 3σ of a mode")

    same = results["torch"]["covered"] == results["sn_cuda"]["covered"]
    print("same modes covered by both runs:", "yes" if same else "NO")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
