"""pytest-benchmark benches: the suites of ``python -m sn_cuda bench``, one test per
(suite, method), and the end-to-end SNGAN CIFAR D training step.

    pytest bench/ --benchmark-only                                   # standard suites
    pytest bench/ --benchmark-only --sn-device cuda --sn-dtype bf16 --sn-suite biggan128_g

Default device: cuda when present, else cpu; on a CPU only the standard suites up to 4M
parameters run unless --sn-suite names others. The step is the CLI's (sn_cuda.bench.run);
pytest-benchmark times it on the wall clock, so on CUDA each timed call ends with a
synchronize and starts from an idle device.
"""

from __future__ import annotations

import pytest
import torch

from sn_cuda.bench.cli import QUICK_CPU_MAX_PARAMS
from sn_cuda.bench.methods import METHODS
from sn_cuda.bench.run import DTYPES, E2E_METHODS
from sn_cuda.bench.suites import STANDARD, get_suite


def pytest_addoption(parser):
    group = parser.getgroup("sn_cuda bench")
    group.addoption("--sn-device", choices=("cpu", "cuda"), help="default: cuda when present, else cpu")
    group.addoption("--sn-dtype", choices=tuple(DTYPES), default="fp32")
    group.addoption("--sn-suite", action="append", metavar="NAME",
                    help="suite to bench (repeatable; `python -m sn_cuda bench --list` lists them)")


def _device(config) -> torch.device:
    name = config.getoption("--sn-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    if "suite_name" in metafunc.fixturenames:
        names = config.getoption("--sn-suite")
        if not names:
            names = [n for n in STANDARD if _device(config).type == "cuda"
                     or get_suite(n).numel <= QUICK_CPU_MAX_PARAMS]
        metafunc.parametrize("suite_name", names)
    if "method" in metafunc.fixturenames:
        metafunc.parametrize("method", METHODS)
    if "e2e_method" in metafunc.fixturenames:
        metafunc.parametrize("e2e_method", E2E_METHODS)


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    device = _device(pytestconfig)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--sn-device cuda: no CUDA device is available to torch")
    return device


@pytest.fixture(scope="session")
def bench_dtype(pytestconfig) -> torch.dtype:
    return DTYPES[pytestconfig.getoption("--sn-dtype")]


@pytest.fixture(scope="session")
def rounds(bench_device) -> dict:
    """pedantic() rounds: the CLI's repeat counts, fewer on a CPU."""
    if bench_device.type == "cuda":
        return {"rounds": 50, "warmup_rounds": 10}
    return {"rounds": 10, "warmup_rounds": 2}
