"""The SNGAN CIFAR-10 ResNet discriminator, for the end-to-end training-step benchmark.

Layout of the ``sngan_cifar_resnet_d`` entry of model_shapes.json (ResDiscriminator32 of
w86763777/pytorch-gan-collections, ch=128): the module names below are the ones listed there,
so the SN layers can be checked against the file. One training step of D: 64 real and 64 fake
32x32 images through D in one forward (as that code does, so each SN layer runs once per
step), hinge loss, backward, Adam (lr 2e-4, betas (0, 0.9)).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResDiscriminator32", "sn_layers", "make_train_step"]


class OptimizedResDisBlock(nn.Module):
    """First block: conv-relu-conv-pool, shortcut pool-conv1x1."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.shortcut = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(in_ch, out_ch, 1))
        self.residual = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(),
            nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.AvgPool2d(2),
        )

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class ResDisBlock(nn.Module):
    """relu-conv-relu-conv(-pool); a 1x1 conv shortcut when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, down: bool = False):
        super().__init__()
        shortcut = []
        if in_ch != out_ch or down:
            shortcut.append(nn.Conv2d(in_ch, out_ch, 1))
        if down:
            shortcut.append(nn.AvgPool2d(2))
        self.shortcut = nn.Sequential(*shortcut)
        residual = [
            nn.ReLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1),
            nn.ReLU(), nn.Conv2d(out_ch, out_ch, 3, padding=1),
        ]
        if down:
            residual.append(nn.AvgPool2d(2))
        self.residual = nn.Sequential(*residual)

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class ResDiscriminator32(nn.Module):
    def __init__(self, ch: int = 128):
        super().__init__()
        self.model = nn.Sequential(
            OptimizedResDisBlock(3, ch),
            ResDisBlock(ch, ch, down=True),
            ResDisBlock(ch, ch),
            ResDisBlock(ch, ch),
            nn.ReLU(),
        )
        self.linear = nn.Linear(ch, 1)

    def forward(self, x):
        return self.linear(self.model(x).sum(dim=(2, 3)))


def sn_layers(model: nn.Module) -> list[nn.Module]:
    """The layers SNGAN spectral-normalizes: every Conv2d and Linear."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def make_train_step(
    forward: Callable, model: nn.Module, batch: int, device, dtype, seed: int = 0
) -> Callable[[], None]:
    """One D step on fixed random 'real' and 'fake' images (the generator is not part of it)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(2 * batch, 3, 32, 32, generator=gen).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4, betas=(0.0, 0.9))

    def step():
        opt.zero_grad(set_to_none=True)
        out = forward(images)
        loss = F.relu(1.0 - out[:batch]).mean() + F.relu(1.0 + out[batch:]).mean()
        loss.backward()
        opt.step()

    return step
