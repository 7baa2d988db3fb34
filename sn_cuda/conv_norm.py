"""``sn_cuda.conv_spectral_norm``: divide a convolution kernel by the operator norm of the convolution.

Plain spectral normalization divides a kernel by σ of its reshaped (C_out, C_in·k…) matrix,
which neither bounds nor equals the Lipschitz constant of the convolution itself (stride,
padding and overlapping windows change it). This parametrization divides by the largest
singular value of the linear map ``x ↦ conv(x, W)`` (bias excluded) on inputs of one fixed
spatial shape, estimated by power iteration through the convolution and its adjoint:

    y = A u;  v = y / max(‖y‖, eps);  x = Aᵀ v;  u = x / max(‖x‖, eps);  σ = ‖A u‖

u is an input-shaped buffer ``_u`` of shape (C_in, *input_shape) (for a transposed
convolution, the input of the transposed convolution). As in torch's spectral norm, u is
updated in place under no_grad in training mode only, σ is differentiable with respect to
the kernel with u held constant, and eval mode reuses the stored u.

The adjoint of a convolution is the transposed convolution with the same stride, padding,
dilation and groups (an ``output_padding`` chosen so that it returns the input's shape), and
the adjoint of a transposed convolution is the convolution (cropped to the input's shape).
Zero padding only: reflect, replicate and circular padding are rejected.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from . import ops
from ._checks import check_power_iteration_settings

__all__ = ["ConvSpectralNorm", "conv_spectral_norm"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _spatial_shape(input_shape, spatial: int) -> tuple[int, ...] | None:
    """``input_shape`` as a tuple of ``spatial`` positive ints (numpy's too), or None."""
    try:
        items = list(input_shape)
    except TypeError:  # a bare int, None
        return None
    if len(items) != spatial or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in items
    ):
        return None
    return tuple(int(s) for s in items)


class ConvSpectralNorm(torch.nn.Module):
    """Parametrization W ↦ W / σ(conv(·, W)) for one convolution module on inputs of one shape.

    The module's stride, padding, dilation, groups (and output_padding of a transposed
    convolution) are read once, here; the module itself is not referenced afterwards.
    ``last_sigma`` holds σ of the last forward as ``(tensor of shape [1], 0)``, the
    convention of ``sn_cuda.parametrization.SpectralNorm``.
    """

    last_sigma: tuple[Tensor, int] | None = None

    def __init__(
        self,
        module: torch.nn.Module,
        input_shape: Sequence[int],
        n_power_iterations: int = 1,
        eps: float = 1e-12,
    ) -> None:
        super().__init__()
        if not isinstance(module, _ConvNd):
            raise TypeError(
                "conv_spectral_norm expects a Conv1d/2d/3d or ConvTranspose1d/2d/3d module, "
                f"got {type(module).__name__}"
            )
        weight = module.weight
        if isinstance(weight, torch.nn.parameter.UninitializedParameter):
            raise ValueError(
                "conv_spectral_norm needs an initialized weight: run a dummy forward through "
                "the lazy module first"
            )
        check_power_iteration_settings("conv_spectral_norm", n_power_iterations, eps)
        if module.padding_mode != "zeros":
            raise ValueError(
                "conv_spectral_norm supports padding_mode='zeros' only, "
                f"got padding_mode={module.padding_mode!r}"
            )
        spatial = len(module.kernel_size)
        shape = _spatial_shape(input_shape, spatial)
        if shape is None:
            raise ValueError(
                f"conv_spectral_norm: input_shape must hold {spatial} positive ints (the spatial size of one input of "
                f"{type(module).__name__}), got {input_shape!r}"
            )

        self.transposed = bool(module.transposed)
        self.input_shape = shape
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        kernel = tuple(weight.shape[2:])
        # _convt_output_padding: the output_padding of this class's conv_transpose calls, the
        # module's own for a transposed convolution, the adjoint's for a convolution.
        if self.transposed:
            self.padding = tuple(module.padding)
            self._convt_output_padding = tuple(module.output_padding)
            self._extra = (0,) * spatial
        else:
            self.padding, self._extra = self._conv_padding(module.padding, kernel)
        self._check_output_shape(kernel, type(module).__name__)
        if not self.transposed:
            self._convt_output_padding = self._adjoint_output_padding(kernel)

        with torch.no_grad():
            u = weight.new_empty((module.in_channels,) + shape).normal_(0, 1)
            self.register_buffer("_u", F.normalize(u.flatten(), dim=0, eps=eps).view_as(u))
            # Start from a reasonable u, as torch's spectral norm does (15 steps).
            self._power_method(weight, 15)

    # ---------------------------------------------------------------- shapes and padding
    def _conv_padding(self, padding, kernel) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(symmetric padding, extra zeros after the input) equal to the module's padding.

        ``padding='same'`` with an odd total pads one more zero at the end than at the
        start, as torch's convolution does; that extra zero is applied with ``F.pad``.
        """
        if padding == "valid":
            return (0,) * len(kernel), (0,) * len(kernel)
        if padding == "same":
            totals = [d * (k - 1) for d, k in zip(self.dilation, kernel)]
            return tuple(t // 2 for t in totals), tuple(t - 2 * (t // 2) for t in totals)
        return tuple(padding), (0,) * len(kernel)

    def _output_size(self, kernel) -> tuple[int, ...]:
        sizes = []
        for i, k in enumerate(kernel):
            n, s, p, d = self.input_shape[i] + self._extra[i], self.stride[i], self.padding[i], self.dilation[i]
            if self.transposed:
                sizes.append((n - 1) * s - 2 * p + d * (k - 1) + self._convt_output_padding[i] + 1)
            else:
                sizes.append((n + 2 * p - d * (k - 1) - 1) // s + 1)
        return tuple(sizes)

    def _check_output_shape(self, kernel, kind: str) -> None:
        out = self._output_size(kernel)
        if min(out) < 1:
            raise ValueError(
                f"conv_spectral_norm: input_shape {self.input_shape} is too small for this {kind}: "
                f"its output would have spatial shape {out}"
            )

    def _adjoint_output_padding(self, kernel) -> tuple[int, ...]:
        # conv_transpose maps the conv's output back to (n - 1)·s − 2p + d(k − 1) + 1 + op
        # entries; op (always < stride) makes that the padded input length again.
        out = self._output_size(kernel)
        return tuple(
            self.input_shape[i] + self._extra[i]
            - ((out[i] - 1) * self.stride[i] - 2 * self.padding[i] + self.dilation[i] * (k - 1) + 1)
            for i, k in enumerate(kernel)
        )

    def _crop(self, x: Tensor) -> Tensor:
        """The first ``input_shape`` entries of each spatial dim of x (the adjoint's extra
        entries are those of padded zeros or of inputs the map never reads)."""
        return x[(Ellipsis, *(slice(0, n) for n in self.input_shape))]

    # ---------------------------------------------------------------- the map and its adjoint
    def _apply_map(self, x: Tensor, weight: Tensor) -> Tensor:
        """The module's convolution of a batch x, without bias."""
        if self.transposed:
            return _CONV_T[len(self.input_shape)](
                x, weight, None, self.stride, self.padding, self._convt_output_padding, self.groups, self.dilation
            )
        if any(self._extra):
            x = F.pad(x, [p for e in reversed(self._extra) for p in (0, e)])
        return _CONV[len(self.input_shape)](
            x, weight, None, self.stride, self.padding, self.dilation, self.groups
        )

    def _apply_adjoint(self, y: Tensor, weight: Tensor) -> Tensor:
        if self.transposed:
            x = _CONV[len(self.input_shape)](
                y, weight, None, self.stride, self.padding, self.dilation, self.groups
            )
        else:
            x = _CONV_T[len(self.input_shape)](
                y, weight, None, self.stride, self.padding, self._convt_output_padding, self.groups, self.dilation
            )
        return self._crop(x)

    @torch.no_grad()
    def _power_method(self, weight: Tensor, n_power_iterations: int) -> None:
        u = self._u
        for _ in range(n_power_iterations):
            y = self._apply_map(u.unsqueeze(0), weight)
            y = F.normalize(y.flatten(), dim=0, eps=self.eps).view_as(y)
            x = self._apply_adjoint(y, weight)[0]
            # out=, not copy_: inside a torch.func transform x is a wrapped tensor, which
            # functorch refuses to copy_ into the plain buffer (as torch's spectral norm does).
            F.normalize(x.flatten(), dim=0, eps=self.eps, out=u.view(-1))

    # ---------------------------------------------------------------- parametrization
    def forward(self, weight: Tensor) -> Tensor:
        if self.training:
            self._power_method(weight, self.n_power_iterations)
        # A copy, so that updating _u in a later forward does not invalidate the autograd
        # graph of this one (two discriminator calls, one backward), as in torch's SN.
        u = self._u.clone(memory_format=torch.contiguous_format)
        sigma = torch.linalg.vector_norm(self._apply_map(u.unsqueeze(0), weight))
        ops.record_sigma(self, sigma.reshape(1), 0)
        return weight / sigma

    def right_inverse(self, value: Tensor) -> Tensor:
        # Assigning module.weight sets the raw kernel (σ is recomputed on the next forward).
        return value

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, n_power_iterations={self.n_power_iterations}, "
            f"eps={self.eps}"
        )


def conv_spectral_norm(
    module: torch.nn.Module,
    input_shape: Sequence[int],
    n_power_iterations: int = 1,
    eps: float = 1e-12,
) -> torch.nn.Module:
    """Divide ``module.weight`` by the operator norm of ``module``'s convolution (bias excluded)
    on inputs of spatial shape ``input_shape``, estimated by power iteration.

    ``module``: Conv1d/2d/3d or ConvTranspose1d/2d/3d (zero padding). ``input_shape``: the
    spatial size of one input, e.g. ``(32, 32)`` for a Conv2d on 32×32 images. The bound holds
    for that input size only. Registered with ``torch.nn.utils.parametrize``: the state_dict
    holds ``parametrizations.weight.original`` and ``parametrizations.weight.0._u`` (shape
    ``(in_channels, *input_shape)``); remove it with ``parametrize.remove_parametrizations``.
    """
    parametrize.register_parametrization(
        module, "weight", ConvSpectralNorm(module, input_shape, n_power_iterations, eps)
    )
    return module
