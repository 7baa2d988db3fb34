"""What both flavours must do alike, checked once for each: sn_cuda.spectral_norm against
torch.nn.utils.parametrizations.spectral_norm and sn_cuda.legacy.spectral_norm against
torch.nn.utils.spectral_norm (the ``flavour`` fixture of conftest.py).

Parity with torch itself over train/eval sequences on every layer kind, with arguments, with
an eps that matters and in float64; then torch's own semantics checks that read the same for
both (default dims, u/v updated in place and only in training, eval reusing the stored
vectors, two forwards before one backward, gradcheck). What only one flavour has is in
test_parametrization.py and test_legacy.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call


# ------------------------------------------------------------------- parity with torch
def test_parity_over_train_eval_sequence(flavour, layer, device, make_twins):
    twins = make_twins(flavour, layer, device)
    twins.assert_state_same("after registration")
    x = twins.input
    twins.step([x()], training=True)
    twins.step([x(), x()], training=True)  # D(real), D(fake), one backward
    twins.step([x()], training=False)
    twins.step([x(), x()], training=False)
    twins.step([x()], training=True)
    twins.assert_state_same("after the sequence")


@pytest.mark.parametrize("n_power_iterations, eps", [(3, 1e-12), (1, 1e-3)])
def test_parity_with_arguments(flavour, layers, make_twins, n_power_iterations, eps):
    for name in ("conv2d_groups", "convtranspose2d_groups"):
        twins = make_twins(flavour, layers[name], n_power_iterations=n_power_iterations, eps=eps)
        twins.assert_state_same("after registration")
        twins.step([twins.input(), twins.input()], training=True)
        twins.step([twins.input()], training=False)


def test_parity_when_eps_matters(flavour, layers, make_twins):
    # eps above σ(W): every normalization is clamped by eps, so only an eps passed through
    # unchanged gives torch's numbers.
    layer = layers["conv2d_groups"]
    torch.manual_seed(0)
    sigma_max = torch.linalg.matrix_norm(layer.make().weight.detach().flatten(1), ord=2).item()
    twins = make_twins(flavour, layer, eps=1.2 * sigma_max)
    twins.assert_state_same("after registration")
    twins.step([twins.input()], training=True)
    twins.step([twins.input()], training=False)
    twins.step([twins.input()], training=True)


@pytest.mark.filterwarnings("ignore:Complex modules are a new feature")
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_parity_complex_weights(flavour, layers, make_twins, dtype):
    # torch's own code computes them (σ differs between torch's flavours: vdot, and the hook
    # flavour's unconjugated dot).
    for name in ("linear", "conv2d_groups"):
        twins = make_twins(flavour, layers[name], dtype=dtype)
        twins.assert_state_same("after registration")
        twins.step([twins.input(), twins.input()], training=True)
        twins.step([twins.input()], training=False)


def test_parity_fp64(flavour, layers, make_twins):
    twins = make_twins(flavour, layers["conv3d_groups"], dtype=torch.float64)
    twins.step([twins.input(), twins.input()], training=True)
    twins.step([twins.input()], training=False)


# -------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("kind, default", [(nn.ConvTranspose1d, 1), (nn.ConvTranspose2d, 1), (nn.ConvTranspose3d, 1), (nn.Conv2d, 0)])
def test_default_dim(flavour, kind, default):
    m = flavour.sn_fn(kind(4, 6, 3))
    assert flavour.normalizer(m).dim == default
    u, _ = flavour.vectors(m)
    assert u.shape == (flavour.original(m).shape[default],)
    assert flavour.normalizer(flavour.sn_fn(kind(4, 6, 3), dim=0)).dim == 0


def test_vectors_change_in_place_and_only_in_training(flavour):
    m = flavour.sn_fn(nn.Conv2d(3, 5, 3))
    x = torch.randn(2, 3, 6, 6)
    vectors = flavour.vectors(m)
    ptrs = [b.data_ptr() for b in vectors]
    before = [b.clone() for b in vectors]
    m(x)
    # In place (DataParallel replicas share the buffers' storage), and a real update. The
    # parametrization flavour starts 15 iterations in, where one of u, v may already be at
    # its float32 fixed point; the hook flavour starts from random draws, so both move.
    assert [b.data_ptr() for b in flavour.vectors(m)] == ptrs
    moved = [not torch.equal(b, old) for b, old in zip(vectors, before)]
    assert all(moved) if flavour.is_legacy else any(moved)
    m.eval()
    before = [b.clone() for b in vectors]
    m(x)
    m(x)
    assert all(torch.equal(b, old) for b, old in zip(vectors, before))
    assert [b.data_ptr() for b in flavour.vectors(m)] == ptrs


def test_eval_output_equals_last_training_output(flavour):
    m = flavour.sn_fn(nn.Linear(6, 4))
    x = torch.randn(3, 6)
    for _ in range(3):
        out_train = m(x)
    m.eval()
    assert torch.equal(m(x), out_train)
    assert torch.equal(m(x), out_train)


def test_two_forwards_one_backward(flavour):
    # The GAN pattern: u, v are updated again by the second call before the first backward.
    m = flavour.sn_fn(nn.Linear(6, 4))
    loss = m(torch.randn(3, 6)).sum() - m(torch.randn(3, 6)).sum()
    loss.backward()
    assert flavour.original(m).grad is not None


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck(flavour, training):
    torch.manual_seed(0)
    m = flavour.sn_fn(nn.Linear(4, 3).double()).train(training)
    vectors = flavour.vectors(m)
    saved = [b.clone() for b in vectors]
    key = flavour.original_key()

    def two_calls(x, weight):
        # Every evaluation starts from the same u, v, so finite differences see one function.
        with torch.no_grad():
            for b, s in zip(vectors, saved):
                b.copy_(s)
        return functional_call(m, {key: weight}, (x,)) + functional_call(m, {key: weight}, (x * 2,))

    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    # In training, u and v depend on W through power iteration, which torch treats as a
    # constant: the weight gradient is checked in eval mode only (and by the formula tests).
    weight = flavour.original(m).detach().clone().requires_grad_(not training)
    assert torch.autograd.gradcheck(two_calls, (x, weight))
    if not training:
        assert torch.autograd.gradgradcheck(two_calls, (x, weight))
