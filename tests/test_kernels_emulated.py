"""The CUDA kernels, run on the CPU by a small CUDA emulator, against the float64 reference.

csrc/cuda/*.cu are compiled here as plain C++ with ``SN_CUDA_EMULATE`` and the emulator
(tests/cuda_emu/cuda_emu.h) force-included: the same kernels and the same host code (checks,
plans, layer-table chunks, launch sequence), registered for CPU tensors in a test-only
namespace, ``sn_cuda_emu``, with sn_cuda's schemas. Every thread of a launch runs as a fiber
with real barriers and warp shuffles, at most three blocks per launch (all at once) so that
the grid-stride loops run as well. The checks are test_kernels_cuda.py's ``run_and_check``;
the last test runs sn_cuda's modules on the emulated kernels against torch (module_parity.py).

So every kernel line runs in CI, without a GPU: indexing, tiling, tails, misaligned and
strided inputs, every dtype, the "last block" protocols, the reductions' fixed order, and the
chunks of more than 128 layers. What only the GPU tests can show: the memory model (fences,
caches), real concurrency, launch limits, speed.

Uninitialised memory is poisoned as on the GPU: under ``torch.use_deterministic_algorithms``
torch fills every new CPU tensor with NaN (0xFF bytes for the scratch), and the emulator fills
shared memory with 0xFF bytes at the start of every block, so an output, a counter or a
shared slot the kernels forget to write shows up. A misaligned 16-byte access, a divergent
barrier, a shuffle after lanes exited or a deadlock raise a RuntimeError naming it. Needs a
C++ compiler and ucontext (Linux).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_kernels_cuda as K  # noqa: E402  (run_and_check and the layer lists)
from cuda_emu import build  # noqa: E402

# test_kernels_cuda's odd shapes without the two largest (slow here), and a tall layer that
# still has several row chunks in launch B (1100 > 512 rows per chunk for 20 columns).
LAYERS = [layer for layer in K.ODD_LAYERS if math.prod(layer[0]) < 100_000] + [((1100, 20), 0)]


@pytest.fixture(scope="module")
def emulated():
    """The three ops of the emulated build (built on first use, ~30 s, then cached)."""
    why_not = build.unavailable()
    if why_not:
        pytest.skip(why_not)
    lib = build.load()
    emu = torch.ops.sn_cuda_emu
    emu.set_schedule(0, 0)
    yield K.Ops(power_iteration=emu.power_iteration, normalize=emu.normalize, normalize_backward=emu.normalize_backward)
    del lib


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """New CPU tensors filled with NaN / 0xFF bytes, as poison_allocator does on the GPU."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert torch.empty(1).isnan().all(), "torch no longer fills new tensors in deterministic mode"
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def check(emulated, layers, dtype=torch.float32, mode=K.MODES[0], **kwargs):
    training, n_iter, u_first = mode
    return K.run_and_check(
        layers, dtype, training=training, n_iter=n_iter, u_first=u_first, device="cpu", ops=emulated, **kwargs
    )


@pytest.mark.parametrize("layout", ["contiguous", "offset", "strided"])
@pytest.mark.parametrize("mode", K.MODES, ids=K.MODE_IDS)
@pytest.mark.parametrize("dtype", K.DTYPES, ids=str)
def test_odd_shapes(emulated, dtype, mode, layout):
    check(emulated, LAYERS, dtype, mode, layout=layout)


@pytest.mark.parametrize("grad_sigmas", [False, True])
def test_without_grad_sigmas(emulated, grad_sigmas):
    check(emulated, LAYERS, grad_sigmas=grad_sigmas)


@pytest.mark.parametrize("mode, scale", list(K.TINY_CASES.values()), ids=list(K.TINY_CASES))
def test_tiny_weights(emulated, mode, scale):
    check(emulated, K.TINY, mode=mode, scale=scale)


def test_zero_iterations_in_training_is_eval(emulated):
    check(emulated, LAYERS, mode=(True, 0, True))


# Up to 16 layers take the small table, up to 64 the medium one, up to 128 the big one; more
# run in chunks of 128 (csrc/layer_table.h).
@pytest.mark.parametrize("mode", [K.MODES[0], K.MODES[3], K.MODES[4]], ids=["train-param", "train3-hook", "eval"])
@pytest.mark.parametrize("count", [16, 17, 65, 145])
def test_table_sizes_and_chunks(emulated, count, mode):
    layers = (LAYERS * (count // len(LAYERS) + 1))[:count]
    check(emulated, layers, mode=mode, layout="offset")


@pytest.mark.parametrize("model", ["sngan_cifar_resnet_d", "sngan_cifar_cnn_d_table3"])
def test_model_shapes(emulated, model):
    check(emulated, K.MODEL_LAYERS[model], mode=K.MODES[1])


# A launch's threads between barriers in reverse and in random orders (random blockIdx too): a
# kernel that reads what another thread or block wrote without a barrier or arrive_last between
# them fails here (in fiber order it may not).
@pytest.mark.parametrize("order", [1, 2], ids=["reverse", "random"])
@pytest.mark.parametrize("mode", [K.MODES[0], K.MODES[3], K.MODES[4]], ids=["train-param", "train3-hook", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thread_orders(emulated, dtype, mode, order):
    torch.ops.sn_cuda_emu.set_schedule(order, 1234)
    try:
        check(emulated, LAYERS, dtype, mode, layout="offset")
    finally:
        torch.ops.sn_cuda_emu.set_schedule(0, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reruns_are_bit_identical(emulated, dtype):
    # The same inputs under different thread and block orders (fiber order, reverse, random):
    # the reductions' order must not depend on which block finishes first.
    runs = []
    for order in (0, 1, 2):
        torch.ops.sn_cuda_emu.set_schedule(order, 99)
        try:
            runs.append(check(emulated, LAYERS, dtype, mode=K.MODES[3], seed=3))
        finally:
            torch.ops.sn_cuda_emu.set_schedule(0, 0)
    for run in runs[1:]:
        for key, first in runs[0].items():
            pairs = zip(first, run[key]) if isinstance(first, list) else [(first, run[key])]
            for i, (a, b) in enumerate(pairs):
                assert torch.equal(a, b), f"{key}[{i}] differs between two schedules"


def test_argument_errors_name_the_argument(emulated):
    K.check_argument_errors(emulated, "cpu", None)
    weights, us, vs, dims = K.make_layers([((4, 3), 0), ((5, 2), 0)], torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="weights must be float32, float16, bfloat16 or float64"):
        emulated.power_iteration([w.int() for w in weights], us, vs, dims, True, 1, K.EPS, True)


def test_vectors_sharing_memory_are_refused(emulated):
    K.check_vectors_sharing_memory(emulated, "cpu")


def test_modules_on_the_emulated_kernels_match_torch():
    """sn_cuda's modules, batch(), the C++ autograd and the kernels together, against torch's
    spectral norm, in a process of its own (tests/cuda_emu/module_parity.py says why)."""
    why_not = build.unavailable(as_sn_cuda=True)
    if why_not:
        pytest.skip(why_not)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu", "module_parity.py")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "module_parity: ok" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
