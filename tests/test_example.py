"""examples/train_toy_gan.py: a short CPU run of both trainings (smoke test) and its mode count.
The full run (4000 steps, all 8 modes) takes minutes; bench/RESULTS.md records one."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_toy_gan.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("train_toy_gan", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_modes_covered(toy):
    at_centres = toy.CENTERS.repeat(10, 1)
    assert toy.modes_covered(at_centres) == (list(range(8)), 1.0)
    # Half the points at mode 3, half far from every mode (the origin).
    points = torch.cat([toy.CENTERS[3].repeat(50, 1), torch.zeros(50, 2)])
    assert toy.modes_covered(points) == ([3], 0.5)
    # Below 1% of the samples, a mode does not count as covered.
    points = torch.cat([toy.CENTERS[5].repeat(1, 1), torch.zeros(199, 2)])
    assert toy.modes_covered(points)[0] == []


def test_short_run_on_cpu(toy, capsys):
    # --threads: keep this pytest process's thread count as it is.
    rc = toy.main(["--device", "cpu", "--steps", "10", "--log-every", "5",
                   "--threads", str(torch.get_num_threads())])
    out = capsys.readouterr().out
    lines = {name: re.search(rf"{name}: .*", out) for name in ("torch spectral_norm", "sn_cuda batched")}
    assert all(lines.values()), out
    assert "[torch] step 5:" in out and "[sn_cuda] step 5:" in out
    # On CPU sn_cuda performs torch's exact op sequence: the two runs' losses and modes agree
    # to the last digit (only the step times differ).
    drop_time = [re.sub(r"[\d.]+ ms/step", "", m.group(0).split(": ", 1)[1]) for m in lines.values()]
    assert drop_time[0] == drop_time[1]
    assert "same modes covered by both runs: yes" in out and rc == 0
