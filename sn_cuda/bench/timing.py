"""Timing one step: warm-up first, then the median of repeats (CUDA events on the GPU).

Each repeat starts from an idle device (synchronize, then record the start event), so a
sample is the latency of one step, launch overhead included, and repeats do not overlap.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Timing", "measure", "copy_bandwidth", "synchronize"]


@dataclass
class Timing:
    median_us: float
    min_us: float
    max_us: float
    repeats: int
    first_call_s: float  # wall time of the very first step (compilation, lazy init)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    step: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
    budget_s: float,
    min_repeats: int = 3,
    before: Callable[[], object] | None = None,
) -> Timing:
    """Time ``step``: ``warmup`` untimed calls (the first one also timed on the wall clock),
    then up to ``repeats`` timed ones, stopping early once ``budget_s`` seconds of repeats
    have passed and ``min_repeats`` are done. ``before`` runs untimed before every call."""
    if before is not None:
        before()
    t0 = time.perf_counter()
    step()
    synchronize(device)
    first_call_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        if before is not None:
            before()
        step()
    synchronize(device)

    cuda = device.type == "cuda"
    samples_us: list[float] = []
    events = []
    deadline = time.perf_counter() + budget_s
    for i in range(max(repeats, 1)):
        if before is not None:
            before()
        if cuda:
            synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        else:
            t = time.perf_counter()
            step()
            samples_us.append((time.perf_counter() - t) * 1e6)
        if i + 1 >= min_repeats and time.perf_counter() > deadline:
            break
    if cuda:
        synchronize(device)
        samples_us = [start.elapsed_time(end) * 1e3 for start, end in events]
    return Timing(
        median_us=statistics.median(samples_us),
        min_us=min(samples_us),
        max_us=max(samples_us),
        repeats=len(samples_us),
        first_call_s=first_call_s,
    )


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Device copy bandwidth in GB/s (10⁹ bytes/s): bytes read + bytes written by
    ``dst.copy_(src)`` of ``nbytes``, median of ``repeats``. The ceiling to compare SN with."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device, warmup=2, repeats=repeats, budget_s=2.0)
    return 2 * src.numel() * 4 / (timing.median_us * 1e-6) / 1e9
