"""What a result was measured on: device, versions, commit, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

import sn_cuda

__all__ = ["describe"]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _git(*args: str) -> str | None:
    """Output of a read-only git command in the checkout sn_cuda is imported from, if any."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(sn_cuda.__file__)))
    try:
        out = subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def describe(device: torch.device) -> dict:
    """The "environment" block of the result, less the copy bandwidth (measured by the run)."""
    backend = sn_cuda.backend()
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "sn_cuda": sn_cuda.__version__,
        "backend": str(backend),
        "backend_reason": backend.reason,
        "commit": commit,
        "commit_dirty": None if status is None else bool(status),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        # Other work on the machine skews CPU timings: the 1-minute load when the run started.
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
