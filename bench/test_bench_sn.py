"""One benchmark per (suite, method): spectral norm forward + backward of every layer, and
the end-to-end SNGAN CIFAR D training step with each SN method and without SN."""

from __future__ import annotations

import pytest
import torch

from sn_cuda.bench import methods
from sn_cuda.bench.run import prepare_e2e_step, prepare_suite_step, suite_grads
from sn_cuda.bench.suites import get_suite
from sn_cuda.bench.timing import synchronize


def _synchronized(step, device):
    """pytest-benchmark's timer is the wall clock: wait for the device inside the timed call."""

    def timed():
        step()
        synchronize(device)

    return timed


def _skip_unavailable(method, device):
    why = methods.unavailable_reason(method, device)
    if why is not None:
        pytest.skip(why)


def test_sn_step(benchmark, suite_name, method, bench_device, bench_dtype, rounds):
    _skip_unavailable(method, bench_device)
    suite = get_suite(suite_name)
    grads = suite_grads(suite, bench_device, bench_dtype)
    prepared = prepare_suite_step(suite, method, grads, bench_device, bench_dtype)

    def setup():
        prepared.zero_grads()
        synchronize(bench_device)

    nbytes = 8 * suite.numel * torch.empty((), dtype=bench_dtype).element_size()
    benchmark.group = suite_name
    benchmark.extra_info.update(layers=len(suite.layers), params=suite.numel, bytes_per_step=nbytes)
    benchmark.pedantic(_synchronized(prepared.step, bench_device), setup=setup, iterations=1, **rounds)
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed run)
        benchmark.extra_info["gbps_at_median"] = nbytes / benchmark.stats.stats.median / 1e9
    # The last timed step ran after a zero_grads(): it must have reached every original weight.
    assert all(p.grad is not None for p in prepared.params)


def test_sngan_d_step(benchmark, e2e_method, bench_device, bench_dtype, rounds):
    if e2e_method != "none":
        _skip_unavailable(e2e_method, bench_device)
    # 64 real + 64 fake images on the GPU; 2 + 2 on a CPU, where convolutions dominate anyway.
    batch = 64 if bench_device.type == "cuda" else 2
    step = prepare_e2e_step(e2e_method, bench_device, bench_dtype, batch)
    benchmark.group = f"sngan_cifar_resnet_d end-to-end D step (batch {batch}+{batch})"
    benchmark.pedantic(
        _synchronized(step, bench_device), setup=lambda: synchronize(bench_device), iterations=1, **rounds
    )
