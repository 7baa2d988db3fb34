"""Rendering a bench result: the markdown table, the JSON file, the PNG plot.

The result is one plain dict, written as is by ``--json``. Schema ``sn_cuda-bench/1``::

    {
      "schema": "sn_cuda-bench/1",
      "environment": {
        "device": "cuda" | "cpu",          "device_name": str,   # GPU name or CPU model
        "torch": str,  "python": str,      "sn_cuda": str,       # versions
        "backend": "cuda" | "torch",       "backend_reason": str,  # sn_cuda.backend()
        "commit": str | null,              "commit_dirty": bool | null,  # git HEAD of the checkout
        "date": str,                       # ISO 8601, UTC
        "cpu_threads": int,               "load_avg_1min": float | null,
        "copy_gbps": float                 # dst.copy_(src) bandwidth measured on this device, GB/s
      },
      "settings": {"dtype": "fp32" | "bf16" | "fp16", "quick": bool, "warmup": int,
                   "repeats": int, "budget_s": float, "command": str},
      "suites": {
        NAME: {
          "title": str, "source": str, "layers": int, "params": int,
          "bytes_per_step": int,           # 8 passes x params x element size (DESIGN.md)
          "methods": {
            METHOD: {"median_us": float, "min_us": float, "max_us": float, "repeats": int,
                     "first_call_s": float,
                     "bytes": int,             # = bytes_per_step
                     "gbps": float,            # bytes / median
                     "copy_fraction": float,   # gbps / copy_gbps
                     "speedup": float | null}  # torch_hook median / this median
          },
          "skipped": {METHOD: reason},     # not run here (e.g. torch.compile on CPU)
          "failed": {METHOD: "ExceptionType: message"}   # raised while timing
        }
      },
      "end_to_end": null | {               # SNGAN CIFAR ResNet D training step
        "model": str, "batch": int, "image_size": 32, "loss": "hinge", "optimizer": str,
        "methods": {METHOD: {"median_us", "min_us", "max_us", "repeats", "first_call_s",
                             "speedup": float | null,        # torch_hook median / this median
                             "vs_no_sn": float | null}},     # this median / no-SN median
        "skipped": {METHOD: reason}, "failed": {METHOD: message}
      }
    }

METHOD is one of ``methods.METHODS`` ("none" too, in end_to_end). Times are microseconds
per step: every normalized weight in training mode plus the backward into the originals.
"""

from __future__ import annotations

import json
import os

from .methods import LABELS

__all__ = ["SCHEMA", "markdown", "failures", "write_json", "plot", "plot_unavailable_reason"]

SCHEMA = "sn_cuda-bench/1"


def _params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)


def _speedup(x) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _us(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    commit = env["commit"] or "unknown"
    if env["commit_dirty"]:
        commit += " (uncommitted changes)"
    lines = [
        f"**{env['device_name']}** ({env['device']}), {settings['dtype']}, torch {env['torch']}, "
        f"sn_cuda backend `{env['backend']}`, commit {commit}, {env['date']}",
        f"Copy bandwidth measured: {env['copy_gbps']:.1f} GB/s. "
        "One step = every normalized weight (training mode) + backward into the originals; "
        "median µs of repeats; bytes = 8 × |W| per step.",
        "",
        "| suite | layers | params | method | median µs | min–max µs | speedup vs hook | GB/s | % of copy |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    skipped: dict[tuple[str, str], list[str]] = {}  # (method, reason) -> suites
    for name, suite in result["suites"].items():
        for method, m in suite["methods"].items():
            lines.append(
                f"| {name} | {suite['layers']} | {_params(suite['params'])} | {LABELS[method]} "
                f"| {_us(m['median_us'])} | {_us(m['min_us'])}–{_us(m['max_us'])} "
                f"| {_speedup(m['speedup'])} | {m['gbps']:.1f} | {100 * m['copy_fraction']:.1f}% |"
            )
        for method, why in suite["skipped"].items():
            skipped.setdefault((method, why), []).append(name)
    notes = [
        f"{LABELS[method]}: skipped on "
        f"{'every suite' if len(names) == len(result['suites']) else ', '.join(names)} ({why})"
        for (method, why), names in skipped.items()
    ]
    notes += [f"{where} / {LABELS[method]}: FAILED ({why})" for where, method, why in failures(result)]
    e2e = result.get("end_to_end")
    if e2e:
        lines += [
            "",
            f"End-to-end {e2e['model']} training step ({e2e['batch']} real + {e2e['batch']} fake "
            f"{e2e['image_size']}×{e2e['image_size']} images, {e2e['loss']} loss, {e2e['optimizer']}):",
            "",
            "| method | median µs | min–max µs | vs no SN | speedup vs hook |",
            "|---|---:|---:|---:|---:|",
        ]
        for method, m in e2e["methods"].items():
            vs_none = "–" if m["vs_no_sn"] is None else f"{m['vs_no_sn']:.2f}×"
            lines.append(
                f"| {LABELS[method]} | {_us(m['median_us'])} | {_us(m['min_us'])}–{_us(m['max_us'])} "
                f"| {vs_none} | {_speedup(m['speedup'])} |"
            )
        for method, why in e2e["skipped"].items():
            notes.append(f"end-to-end / {LABELS[method]}: skipped ({why})")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def failures(result: dict) -> list[tuple[str, str, str]]:
    """(suite or "end-to-end", method, message) for every method that raised while timed."""
    out = [(name, m, why) for name, suite in result["suites"].items() for m, why in suite["failed"].items()]
    if result.get("end_to_end"):
        out += [("end-to-end", m, why) for m, why in result["end_to_end"]["failed"].items()]
    return out


def write_json(result: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


def plot_unavailable_reason() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed: pip install 'sn_cuda[plot]' (or pip install matplotlib)"
    return None


def plot(result: dict, path: str) -> None:
    """A PNG of each method's speedup over torch's hook flavour, grouped by suite."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    suites = [n for n, s in result["suites"].items() if any(m["speedup"] for m in s["methods"].values())]
    methods = []
    for n in suites:
        methods += [m for m in result["suites"][n]["methods"] if m not in methods]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(suites) + 2), 4.5))
    width = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, ys = [], []
        for i, n in enumerate(suites):
            m = result["suites"][n]["methods"].get(method)
            if m and m["speedup"]:
                xs.append(i + (j - (len(methods) - 1) / 2) * width)
                ys.append(m["speedup"])
        # Bars grow from 1× (up: faster than torch's hook flavour, down: slower).
        bars = ax.bar(xs, [y - 1 for y in ys], width, bottom=1.0, label=LABELS[method])
        ax.bar_label(bars, labels=[f"{y:.2g}" for y in ys], fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(suites)), suites, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
    # Minor ticks at 2× and 5× of each decade (0.2, 0.5, 2, 5, 20, ...) are labelled too.
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda y, _: f"{y:g}×" if f"{y:.0e}"[0] in "25" else ""))
    ax.set_ylabel("speedup over torch's hook flavour")
    env = result["environment"]
    ax.set_title(f"SN forward+backward step, {env['device_name']}, {result['settings']['dtype']}, {env['date'][:10]}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
