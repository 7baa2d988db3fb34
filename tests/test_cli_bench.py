"""`python -m sn_cuda bench`: the CLI runs on CPU, writes the documented JSON schema and the
markdown table; the suites match model_shapes.json; every method times the same step.
No timing assertions: the numbers depend on the machine."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types
from importlib import resources

import pytest
import torch

from sn_cuda.__main__ import main as dispatch
from sn_cuda.bench import cli, methods, report, suites
from sn_cuda.bench.run import backward_into, prepare_suite_step, suite_grads
from sn_cuda.bench.sngan import ResDiscriminator32, make_train_step, sn_layers
from sn_cuda.bench.timing import measure
from sn_cuda.reference import default_dim

CPU = torch.device("cpu")


# ------------------------------------------------------------------------ JSON schema
def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_timing(m: dict) -> None:
    for key in ("median_us", "min_us", "max_us", "first_call_s"):
        assert _is_num(m[key]) and m[key] > 0, key
    assert m["min_us"] <= m["median_us"] <= m["max_us"]
    assert isinstance(m["repeats"], int) and m["repeats"] >= 1
    assert m["speedup"] is None or (_is_num(m["speedup"]) and m["speedup"] > 0)


def check_schema(doc: dict) -> None:
    """The schema documented in sn_cuda/bench/report.py."""
    assert doc["schema"] == report.SCHEMA
    env = doc["environment"]
    for key in ("device", "device_name", "torch", "python", "sn_cuda", "backend", "backend_reason", "date"):
        assert isinstance(env[key], str) and env[key], key
    assert env["device"] in ("cpu", "cuda")
    assert env["commit"] is None or isinstance(env["commit"], str)
    assert env["commit_dirty"] in (None, True, False)
    assert _is_num(env["copy_gbps"]) and env["copy_gbps"] > 0
    assert isinstance(env["cpu_threads"], int)
    s = doc["settings"]
    assert s["dtype"] in ("fp32", "bf16", "fp16") and isinstance(s["quick"], bool)
    assert s["command"].startswith("python -m sn_cuda bench")
    for name, suite in doc["suites"].items():
        spec = suites.get_suite(name)
        assert suite["layers"] == len(spec.layers) and suite["params"] == spec.numel
        assert suite["bytes_per_step"] == 8 * spec.numel * torch.empty((), dtype=_dtype(s)).element_size()
        assert set(suite["methods"]) | set(suite["skipped"]) <= set(methods.METHODS)
        assert not set(suite["methods"]) & set(suite["skipped"])
        for method, m in suite["methods"].items():
            _check_timing(m)
            assert m["bytes"] == suite["bytes_per_step"]
            assert m["gbps"] == pytest.approx(m["bytes"] / (m["median_us"] * 1e-6) / 1e9)
            assert m["copy_fraction"] == pytest.approx(m["gbps"] / env["copy_gbps"])
            if "torch_hook" in suite["methods"]:
                hook = suite["methods"]["torch_hook"]["median_us"]
                assert m["speedup"] == pytest.approx(hook / m["median_us"])
        for why in list(suite["skipped"].values()) + list(suite["failed"].values()):
            assert isinstance(why, str) and why
    e2e = doc["end_to_end"]
    if e2e is not None:
        assert e2e["image_size"] == 32 and e2e["loss"] == "hinge" and e2e["batch"] >= 1
        for method, m in e2e["methods"].items():
            _check_timing(m)
            assert m["vs_no_sn"] == pytest.approx(m["median_us"] / e2e["methods"]["none"]["median_us"])


def _dtype(settings: dict) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[settings["dtype"]]


# -------------------------------------------------------------------------- CLI runs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One CPU run of the smoke-test suite with every method: (stdout, JSON document)."""
    path = tmp_path_factory.mktemp("bench") / "out" / "tiny.json"  # "out/" does not exist yet
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = cli.main(["--suite", "tiny_mixed", "--device", "cpu", "--quick", "--repeats", "2",
                       "--json", str(path)])
    assert rc == 0
    return stdout.getvalue(), json.loads(path.read_text())


def test_json_schema(tiny_run):
    _, doc = tiny_run
    check_schema(doc)
    assert doc["environment"]["device"] == "cpu" and doc["settings"]["quick"] is True
    suite = doc["suites"]["tiny_mixed"]
    # torch.compile is GPU-only: skipped with its reason on CPU; the rest ran.
    assert "torch_compile" in suite["skipped"]
    expected = {"torch_hook", "torch_param", "sn_cuda_layer", "sn_cuda_batched"}
    assert set(suite["methods"]) == expected
    assert suite["methods"]["torch_hook"]["speedup"] == pytest.approx(1.0)
    assert suite["failed"] == {}
    assert doc["end_to_end"] is None  # only the SNGAN CIFAR D suite brings the training step


def test_markdown_table(tiny_run):
    stdout, doc = tiny_run
    assert stdout == report.markdown(doc)
    lines = stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("| suite |"))
    assert "median µs" in lines[header] and "speedup vs hook" in lines[header] and "% of copy" in lines[header]
    rows = [l for l in lines[header + 2:] if l.startswith("| tiny_mixed |")]
    assert len(rows) == len(doc["suites"]["tiny_mixed"]["methods"])
    labels = {r.split("|")[4].strip() for r in rows}
    assert labels == {methods.LABELS[m] for m in doc["suites"]["tiny_mixed"]["methods"]}
    assert any("torch.compile(parametrization): skipped" in l for l in lines)


def test_end_to_end_step_line(tmp_path, capsys):
    path = tmp_path / "e2e.json"
    cli.main(["--suite", "sngan_cifar_resnet_d", "--device", "cpu", "--method", "torch_hook",
              "--repeats", "1", "--warmup", "1", "--e2e-batch", "1", "--json", str(path)])
    doc = json.loads(path.read_text())
    check_schema(doc)
    e2e = doc["end_to_end"]
    assert e2e["batch"] == 1 and set(e2e["methods"]) == {"none", "torch_hook"}
    stdout = capsys.readouterr().out
    assert "End-to-end SNGAN CIFAR ResNet D training step" in stdout
    assert "| no SN |" in stdout and "| torch hook |" in stdout


def test_a_failing_method_is_reported_and_the_rest_still_run(monkeypatch, tmp_path, capsys):
    real_apply = methods.apply

    def apply(method, model, layers):
        if method == "torch_param":
            raise RuntimeError("boom")
        return real_apply(method, model, layers)

    monkeypatch.setattr(methods, "apply", apply)
    path = tmp_path / "f.json"
    rc = cli.main(["--suite", "tiny_mixed", "--device", "cpu", "--method", "torch_hook", "torch_param",
                   "--repeats", "1", "--warmup", "1", "--json", str(path)])
    assert rc == 1
    doc = json.loads(path.read_text())
    check_schema(doc)
    suite = doc["suites"]["tiny_mixed"]
    assert suite["failed"] == {"torch_param": "RuntimeError: boom"}
    assert set(suite["methods"]) == {"torch_hook"}
    captured = capsys.readouterr()
    assert "torch parametrization: FAILED (RuntimeError: boom)" in captured.out
    assert "FAILED (RuntimeError: boom)" in captured.err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as e:
        cli.main(["--suite", "tiny_mixed", "--device", "cpu", "--plot", str(tmp_path / "p.png")])
    assert e.value.code == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_plot_writes_png(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "speedups.png"
    report.plot(tiny_run[1], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments(capsys):
    for argv in (["--suite", "no_such_suite"], ["--repeats", "0"], ["--dtype", "fp8"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
    assert "unknown suite 'no_such_suite'" in capsys.readouterr().err


def test_quick_cpu_keeps_small_standard_suites():
    quick = [s.name for s in cli.select_suites(None, True, CPU)]
    assert quick == [n for n in suites.STANDARD if suites.get_suite(n).numel <= cli.QUICK_CPU_MAX_PARAMS]
    assert "sngan_cifar_resnet_d" in quick and "biggan128_d" not in quick
    assert [s.name for s in cli.select_suites(None, False, CPU)] == list(suites.STANDARD)
    assert [s.name for s in cli.select_suites(["biggan128_d"], True, CPU)] == ["biggan128_d"]


# ---------------------------------------------------------------------- the dispatcher
def test_python_m_sn_cuda_bench_list():
    out = subprocess.run(
        [sys.executable, "-m", "sn_cuda", "bench", "--list"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for name in suites.all_suites():
        assert name in out.stdout


def test_dispatcher_inspect(monkeypatch, capsys):
    seen = []
    fake = types.ModuleType("sn_cuda.inspect")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "sn_cuda.inspect", fake)
    assert dispatch(["inspect", "model.pt", "--x"]) == 0
    assert seen == [["model.pt", "--x"]]
    with pytest.raises(SystemExit):
        dispatch(["no_such_command"])


# -------------------------------------------------------------- suites and methods
def test_suites_match_model_shapes():
    models = json.loads(resources.files("sn_cuda").joinpath("data/model_shapes.json").read_text())["models"]
    for name, model in models.items():
        suite = suites.get_suite(name)
        assert suite.numel == model["numel"] and len(suite.layers) == model["n_layers"]
        with torch.device("meta"):
            layers = [suites.make_layer(spec) for spec in suite.layers]
        for layer, entry in zip(layers, model["layers"]):
            assert list(layer.weight.shape) == entry["shape"], (name, entry["name"])
            dim = default_dim(layer)  # the matrix power iteration runs on, as torch picks it
            rows = layer.weight.shape[dim]
            assert [rows, layer.weight.numel() // rows] == entry["matrix"], (name, entry["name"])


def test_sngan_discriminator_matches_model_shapes():
    model = json.loads(resources.files("sn_cuda").joinpath("data/model_shapes.json").read_text())
    expected = [(l["name"], l["shape"]) for l in model["models"]["sngan_cifar_resnet_d"]["layers"]]
    d = ResDiscriminator32()
    layers = set(map(id, sn_layers(d)))
    assert [(n, list(m.weight.shape)) for n, m in d.named_modules() if id(m) in layers] == expected
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1)


def test_every_method_computes_the_same_step():
    """The parametrization-based methods start from the same u, v and must give torch's
    gradients (on CPU, bit for bit); the hook flavour must reach every weight too."""
    suite = suites.get_suite("tiny_mixed")
    grads = suite_grads(suite, CPU, torch.float32)
    results = {}
    for method in ("torch_hook", "torch_param", "sn_cuda_layer", "sn_cuda_batched"):
        if methods.unavailable_reason(method, CPU):
            continue
        prepared = prepare_suite_step(suite, method, grads, CPU, torch.float32)
        prepared.zero_grads()
        prepared.step()
        assert all(p.grad is not None for p in prepared.params), method
        results[method] = [p.grad.clone() for p in prepared.params]
        prepared.zero_grads()
        assert all(p.grad is None for p in prepared.params)
    for method in ("sn_cuda_layer", "sn_cuda_batched"):
        if method in results:
            for got, want in zip(results[method], results["torch_param"]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_backward_into_is_torch_autograd_backward():
    # The harness's backward skips torch.autograd.backward's Python checks, nothing else.
    torch.manual_seed(0)
    leaves = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    grads = (torch.randn(3, 4), torch.randn(5))

    def outputs():
        return [leaves[0].sin() * 2, leaves[1].exp()]

    torch.autograd.backward(outputs(), list(grads))
    want = [p.grad.clone() for p in leaves]
    backward_into(outputs(), grads)  # accumulates, as the step does before zero_grads()
    for p, w in zip(leaves, want):
        torch.testing.assert_close(p.grad, 2 * w, rtol=0, atol=0)


def test_end_to_end_methods_train_alike_on_cpu():
    """Two D training steps with sn_cuda (per layer, batched) leave the parameters torch's
    parametrization flavour leaves (on CPU, bit for bit): the end-to-end line times real SN."""
    after = {}
    for method in ("torch_param", "sn_cuda_layer", "sn_cuda_batched"):
        if methods.unavailable_reason(method, CPU):
            continue
        torch.manual_seed(0)
        model = ResDiscriminator32(ch=16)
        step = make_train_step(methods.apply(method, model, sn_layers(model)), model, 2, CPU, torch.float32)
        step()
        step()
        after[method] = [p.detach().clone() for p in model.parameters()]
    for method in ("sn_cuda_layer", "sn_cuda_batched"):
        if method in after:
            for got, want in zip(after[method], after["torch_param"]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batched_method_batches_every_layer():
    suite = suites.get_suite("tiny_mixed")
    model = suites.build(suite, CPU, torch.float32)
    methods.apply("sn_cuda_batched", model, list(model.layers))
    assert len(model._sn_cuda_batch_handle) == len(suite.layers)


def test_measure_counts_and_orders():
    calls, before = [], []
    t = measure(lambda: calls.append(1), CPU, warmup=3, repeats=5, budget_s=60.0,
                before=lambda: before.append(1))
    assert len(calls) == 3 + 5 and len(before) == len(calls)
    assert t.repeats == 5 and t.min_us <= t.median_us <= t.max_us
