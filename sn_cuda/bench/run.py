"""Running the suites and the end-to-end step; assembling the result dict (see report.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from . import methods as methods_mod
from .environment import describe
from .report import SCHEMA
from .sngan import ResDiscriminator32, make_train_step, sn_layers
from .suites import Suite, build
from .timing import Timing, copy_bandwidth, measure

__all__ = [
    "Settings", "run", "print_progress", "suite_grads", "prepare_suite_step", "SuiteStep",
    "backward_into",
    "prepare_e2e_step",
    "DTYPES", "E2E_METHODS", "E2E_SUITE",
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
E2E_METHODS = ("none", "torch_hook", "torch_param", "sn_cuda_layer", "sn_cuda_batched")
E2E_SUITE = "sngan_cifar_resnet_d"  # selecting this suite also runs the training step


def print_progress(line: str) -> None:
    """Progress lines go to stderr, so stdout holds only the table."""
    print(line, file=sys.stderr, flush=True)


@dataclass
class Settings:
    device: torch.device
    dtype: str = "fp32"
    quick: bool = False
    warmup: int = 10
    repeats: int = 50
    budget_s: float = 10.0  # stop repeating a measurement after this long (min 3 repeats)
    e2e_batch: int = 64
    methods: tuple[str, ...] = methods_mod.METHODS
    command: str = "python -m sn_cuda bench"


def _timing_dict(t: Timing) -> dict:
    return {
        "median_us": t.median_us, "min_us": t.min_us, "max_us": t.max_us,
        "repeats": t.repeats, "first_call_s": t.first_call_s,
    }


def suite_grads(suite: Suite, device, dtype: torch.dtype) -> list[torch.Tensor]:
    """One fixed random ∂L/∂W_sn per layer, the same for every method."""
    gen = torch.Generator(device=device).manual_seed(1)
    return [torch.randn(l.shape, generator=gen, device=device, dtype=dtype) for l in suite.layers]


def backward_into(outputs, grads: tuple) -> None:
    """``torch.autograd.backward(outputs, grads)``, straight to autograd's engine.

    That function first checks every gradient against its output in Python (``_make_grads``):
    half of its time for a list of tiny tensors (41 of 90 µs for 11, 235 of 485 µs for 64, on
    a 2-core EPYC), which a training step, whose backward starts from one scalar loss, never
    pays. The step of every method is timed through this, so the table shows what SN costs,
    not what the harness's call does. ``grads`` is a tuple of the right shapes and dtypes."""
    torch.autograd.Variable._execution_engine.run_backward(
        tuple(outputs), grads, False, False, (), True, True  # keep_graph, create_graph, inputs,
    )  # allow_unreachable, accumulate_grad


@dataclass
class SuiteStep:
    """What ``prepare_suite_step`` builds. ``step()``: every normalized weight in training mode,
    then the backward of the fixed gradients into the original weights. ``zero_grads()``
    (untimed, before each step) drops accumulated gradients, as ``optimizer.zero_grad()``
    does. ``params``: the original weights."""

    step: Callable[[], None]
    zero_grads: Callable[[], None]
    params: list[torch.Tensor]


def prepare_suite_step(
    suite: Suite, method: str, grads: list[torch.Tensor], device, dtype: torch.dtype
) -> SuiteStep:
    model = build(suite, device, dtype)
    torch.manual_seed(0)  # the same initial u, v for every method
    forward = methods_mod.apply(method, model, list(model.layers))
    params = list(model.parameters())  # the originals, after SN registered them
    grads = tuple(grads)

    def step():
        backward_into(forward(), grads)

    def zero_grads():
        for p in params:
            p.grad = None

    return SuiteStep(step, zero_grads, params)


def prepare_e2e_step(method: str, device, dtype: torch.dtype, batch: int) -> Callable[[], None]:
    """One SNGAN CIFAR D training step with ``method``'s SN ("none": without SN)."""
    torch.manual_seed(0)
    model = ResDiscriminator32().to(device=device, dtype=dtype)
    forward = methods_mod.apply(method, model, sn_layers(model))
    return make_train_step(forward, model, batch, device, dtype)


def _time_suite_method(suite: Suite, method: str, grads: list[torch.Tensor], s: Settings) -> Timing:
    try:
        prepared = prepare_suite_step(suite, method, grads, s.device, DTYPES[s.dtype])
        return measure(
            prepared.step, s.device, warmup=s.warmup, repeats=s.repeats, budget_s=s.budget_s,
            before=prepared.zero_grads,
        )
    finally:
        if method == "torch_compile":
            torch._dynamo.reset()  # the compiled graphs hold the model: free it now


def _time_e2e(method: str, s: Settings) -> Timing:
    step = prepare_e2e_step(method, s.device, DTYPES[s.dtype], s.e2e_batch)
    return measure(step, s.device, warmup=s.warmup, repeats=s.repeats, budget_s=s.budget_s)


def _time_or_fail(timer: Callable[[], Timing], entry: dict, method: str, progress: "_Progress") -> Timing | None:
    """Run ``timer``; on an exception, record it under entry["failed"] and go on with the
    other methods (a crash of one must not lose minutes of others' timings)."""
    try:
        return timer()
    except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
        entry["failed"][method] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        progress.finish(f"FAILED ({entry['failed'][method]})")
        return None


class _Progress:
    """"[ 3/15] suite / method: " when a measurement starts, its outcome when it ends (stderr)."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def start(self, what: str) -> None:
        self.done += 1
        sys.stderr.write(f"[{self.done:{len(str(self.total))}d}/{self.total}] {what}: ")
        sys.stderr.flush()

    def finish(self, outcome: str) -> None:
        print(outcome, file=sys.stderr, flush=True)


def run(suites: list[Suite], s: Settings) -> dict:
    """Time every (suite, method) and, when the SNGAN CIFAR D suite is selected, the
    end-to-end D training step. Returns the result dict documented in report.py."""
    env = describe(s.device)
    copy_bytes = (256 << 20) if s.device.type == "cuda" else (64 << 20)
    env["copy_gbps"] = copy_bandwidth(s.device, copy_bytes)
    print_progress(
        f"{env['device_name']}: copy bandwidth {env['copy_gbps']:.1f} GB/s; "
        f"sn_cuda backend {env['backend']} ({env['backend_reason']})"
    )
    e2e = any(suite.name == E2E_SUITE for suite in suites)
    e2e_methods = [m for m in E2E_METHODS if m == "none" or m in s.methods]
    progress = _Progress(len(suites) * len(s.methods) + (len(e2e_methods) if e2e else 0))
    elem = torch.empty((), dtype=DTYPES[s.dtype]).element_size()

    result = {
        "schema": SCHEMA,
        "environment": env,
        "settings": {
            "dtype": s.dtype, "quick": s.quick, "warmup": s.warmup, "repeats": s.repeats,
            "budget_s": s.budget_s, "command": s.command,
        },
        "suites": {},
        "end_to_end": None,
    }
    for suite in suites:
        nbytes = 8 * suite.numel * elem
        entry = {
            "title": suite.title, "source": suite.source, "layers": len(suite.layers),
            "params": suite.numel, "bytes_per_step": nbytes, "methods": {}, "skipped": {},
            "failed": {},
        }
        grads = suite_grads(suite, s.device, DTYPES[s.dtype])

        def bandwidth(t: Timing, nbytes=nbytes) -> dict:
            gbps = nbytes / (t.median_us * 1e-6) / 1e9
            return {"bytes": nbytes, "gbps": gbps, "copy_fraction": gbps / env["copy_gbps"]}

        _time_methods(
            entry, s.methods, suite.name, s.device, progress,
            lambda method, grads=grads: _time_suite_method(suite, method, grads, s), bandwidth,
        )
        result["suites"][suite.name] = entry
        del grads

    if e2e:
        entry = {
            "model": "SNGAN CIFAR ResNet D", "batch": s.e2e_batch, "image_size": 32, "loss": "hinge",
            "optimizer": "Adam", "methods": {}, "skipped": {}, "failed": {},
        }
        _time_methods(
            entry, e2e_methods, "end-to-end SNGAN D step", s.device, progress,
            lambda method: _time_e2e(method, s), lambda t: {"vs_no_sn": None},
        )
        none = entry["methods"].get("none")
        for m in entry["methods"].values():
            m["vs_no_sn"] = m["median_us"] / none["median_us"] if none else None
        result["end_to_end"] = entry
    return result


def _time_methods(entry: dict, methods, label: str, device, progress, time_method, extra) -> None:
    """Time each of ``methods`` (``time_method(method) -> Timing``) into ``entry``: its timing
    plus ``extra(timing)`` under "methods", why not under "skipped" or "failed"; then the
    speedups over torch's hook flavour."""
    for method in methods:
        progress.start(f"{label} / {methods_mod.LABELS[method]}")
        why = methods_mod.unavailable_reason(method, device)
        if why is not None:
            entry["skipped"][method] = why
            progress.finish(f"skipped ({why})")
            continue
        t = _time_or_fail(partial(time_method, method), entry, method, progress)
        if t is None:
            continue
        entry["methods"][method] = {**_timing_dict(t), **extra(t), "speedup": None}
        progress.finish(f"{t.median_us:.0f} µs median of {t.repeats}")
    _fill_speedups(entry["methods"])


def _fill_speedups(timed: dict) -> None:
    hook = timed.get("torch_hook")
    for m in timed.values():
        m["speedup"] = hook["median_us"] / m["median_us"] if hook else None
