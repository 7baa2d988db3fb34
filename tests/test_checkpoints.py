"""Checkpoints cross-load between torch's spectral norm and sn_cuda's, both flavours.

A state_dict written by torch loads into sn_cuda (and back) with strict=True, carries the
same keys, values and metadata, and the loaded module then computes exactly what the writer
would have; old version-less hook-flavour checkpoints are upgraded as torch's version hook
does; bad checkpoints fail with torch's errors.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn


def _through_file(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _trained(twins):
    """Change weights and u/v away from what a fresh module has: two training steps."""
    twins.step([twins.input(), twins.input()], training=True)
    with torch.no_grad():
        for m in twins.modules:
            for p in m.parameters():
                p.sub_(0.1 * p.grad)
    twins.step([twins.input()], training=True)
    return twins


@pytest.mark.parametrize("direction", ["torch_to_sn_cuda", "sn_cuda_to_torch"])
def test_cross_load(flavour, layer, make_twins, direction):
    written = _trained(make_twins(flavour, layer, seed=0))
    fresh = make_twins(flavour, layer, seed=10)
    # Wrapped in a container, so that keys and metadata carry a prefix.
    writers = [nn.Sequential(m) for m in written.modules]
    readers = [nn.Sequential(m) for m in fresh.modules]
    if direction == "torch_to_sn_cuda":
        writer, reader = writers[0], readers[1]
        written.sn = fresh.sn  # compare the writer with the reader from here on
    else:
        writer, reader = writers[1], readers[0]
        written.torch = fresh.torch
    result = written
    state = writer.state_dict()
    reader.load_state_dict(_through_file(state), strict=True)
    loaded = reader.state_dict()
    assert list(loaded) == list(state)
    for key in state:
        assert torch.equal(loaded[key], state[key]), key
    assert loaded._metadata == state._metadata
    if flavour.is_legacy:
        assert loaded._metadata["0"]["spectral_norm"] == {f"{layer.param}.version": 1}
    # The reader now computes what the writer does: in eval, then over more training.
    result.step([result.input()], training=False)
    result.step([result.input(), result.input()], training=True)
    result.assert_state_same("after training the loaded module")


@pytest.mark.parametrize("kind", ["linear", "conv2d_groups", "convtranspose2d_groups"])
def test_old_versionless_legacy_checkpoint(legacy_flavour, layers, make_twins, kind):
    # Checkpoints from before the version metadata hold weight_orig, weight_u and the
    # normalized weight, and no weight_v: torch's hook solves for v so that u·W v = σ.
    source = _trained(make_twins(legacy_flavour, layers[kind], seed=0)).torch.eval()
    x = layers[kind].input()
    expected = source(x)
    old = {k: v for k, v in source.state_dict().items() if k != "weight_v"}
    old["weight"] = source.weight.detach().clone()
    old = _through_file(old)  # a plain dict: no metadata, so no version

    fresh = make_twins(legacy_flavour, layers[kind], seed=10)
    for m in fresh.modules:
        m.load_state_dict(dict(old), strict=True)
    fresh.assert_state_same("after loading the old checkpoint")
    assert "weight" not in fresh.sn.state_dict()
    fresh.train(False)
    torch.testing.assert_close(fresh.sn(x), expected, rtol=1e-4, atol=1e-5)
    fresh.step([x], training=False)
    fresh.step([x, layers[kind].input()], training=True)


def test_versionless_checkpoint_in_the_new_format_loads_as_is(legacy_flavour, layers, make_twins):
    source = _trained(make_twins(legacy_flavour, layers["linear"], seed=0)).torch
    plain = dict(source.state_dict())  # weight_orig, weight_u, weight_v; no metadata
    fresh = make_twins(legacy_flavour, layers["linear"], seed=10)
    for m in fresh.modules:
        m.load_state_dict(plain, strict=True)
        for key, value in plain.items():
            assert torch.equal(m.state_dict()[key], value), key


def test_loading_a_checkpoint_without_spectral_norm_fails_as_torchs(flavour, layers, make_twins):
    plain = nn.Linear(5, 7).state_dict()
    twins = make_twins(flavour, layers["linear"])
    errors = []
    for m in twins.modules:
        before = {k: v.clone() for k, v in m.state_dict().items()}
        with pytest.raises(RuntimeError) as info:
            m.load_state_dict(plain, strict=True)
        errors.append(str(info.value))
        assert list(m.state_dict()) == list(before)
    assert errors[1] == errors[0]
    assert "Missing key(s)" in errors[0]
