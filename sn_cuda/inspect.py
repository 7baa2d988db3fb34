"""``python -m sn_cuda inspect PATH [--exact]``: the spectral norms stored in a checkpoint.

Reads a file written by ``torch.save``: a module's state_dict, or a dict holding one under
``"state_dict"`` or ``"model"`` (nested dicts, e.g. ``{"G": ..., "D": ...}``, are walked and
their keys joined with "."). For every layer weight of 2 or more dims it prints the layer
name, the flavour of spectral norm found, the shape, σ estimated from the stored vectors
(σ = u·W v, as the spectral norm's eval mode computes it; "-" where the file holds no u, v)
and with ``--exact`` the largest singular value of the weight's matrix view (an SVD). The
last row is the product over layers: for a feed-forward network of these layers with
1-Lipschitz activations, an upper bound of its Lipschitz constant.

Flavours (torch and sn_cuda write the same keys, so the file cannot tell them apart):

* ``parametrization``: ``P.parametrizations.X.original`` with ``P.parametrizations.X.<i>._u``
  and ``._v`` (``torch.nn.utils.parametrizations.spectral_norm``, ``sn_cuda.spectral_norm``);
* ``legacy``: ``P.X_orig``, ``P.X_u``, ``P.X_v`` (``torch.nn.utils.spectral_norm``,
  ``sn_cuda.legacy.spectral_norm``);
* ``conv-operator``: ``sn_cuda.conv_spectral_norm``, whose ``_u`` is input-shaped: its σ is
  the convolution's operator norm, which needs the module's stride and padding, so "-";
* ``plain``: a ``P.weight`` without spectral norm.

The stored weight is the raw one (before division by σ). The row dim of the matrix view is
the one u's length fits (dim 1 for ConvTranspose); when several do, the one whose stored
u, v give the largest σ. Files are loaded with ``torch.load(weights_only=True)``; ``--trust``
unpickles anything (which runs code from the file: only for files you trust).
Exit status: 0, or 2 with a one-line error (unreadable file, no layer weights, bad arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .layers import layer_name
from .reference import weight_matrix

__all__ = [
    "LayerReport", "InspectError", "load_state_dict", "find_layers", "add_exact", "format_table", "main",
]

_PARAM_ORIGINAL = re.compile(r"^(?:(?P<prefix>.*)\.)?parametrizations\.(?P<tensor>[^.]+)\.original$")
_LEGACY_ORIGINAL = re.compile(r"^(?:(?P<prefix>.*)\.)?(?P<tensor>[^.]+)_orig$")


class InspectError(Exception):
    """A problem with the input file, reported as one line and exit status 2."""


@dataclasses.dataclass
class LayerReport:
    name: str  # the module's qualified name ("P", or "P.X" for a tensor not named weight)
    flavour: str  # parametrization | legacy | conv-operator | plain
    shape: tuple[int, ...]
    dim: int  # row dim of the matrix view
    sigma: float | None  # u·W v from the stored vectors; None without them
    weight: Tensor = dataclasses.field(repr=False)
    exact: float | None = None  # largest singular value (filled in by add_exact)
    dim_assumed: bool = False  # u, v fit more than one view and tell none apart: dim 0 assumed


# ------------------------------------------------------------------------------ loading
def _one_line(text: str, fallback: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = lines[0] if lines else fallback
    return text if len(text) <= 200 else text[:197] + "..."


def _flatten(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)


def load_state_dict(path: str, trust: bool = False) -> dict[str, Tensor]:
    """The tensors of the checkpoint at ``path``, by qualified key (see the module doc)."""
    if not os.path.exists(path):
        raise InspectError(f"{path}: no such file")
    if os.path.isdir(path):
        raise InspectError(f"{path}: is a directory, not a checkpoint file")
    if os.path.getsize(path) == 0:
        raise InspectError(f"{path}: is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # torch.load raises many types for a bad file
        message = str(e)
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if not trust and refused:
            raise InspectError(
                f"{path}: holds {refused.group(1)} objects, which torch.load(weights_only=True) "
                "refuses; rerun with --trust to unpickle it (this runs code from the file: only "
                "for files you trust)"
            ) from None
        # torch's weights-only message is a paragraph; its cause follows this marker.
        cause = message.partition("WeightsUnpickler error:")[2] or message
        reason = _one_line(cause, type(e).__name__)
        raise InspectError(f"{path}: cannot read it as a torch checkpoint ({reason})") from None
    if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), (Mapping, torch.nn.Module)):
                obj = obj[key]
                break
    tensors: dict[str, Tensor] = {}
    _flatten(obj, "", tensors)
    return tensors


# ----------------------------------------------------------------------------- analysis
def _matrix(weight: Tensor, dim: int) -> Tensor:
    return weight_matrix(weight.detach().to(torch.complex128 if weight.is_complex() else torch.float64), dim)


def _estimate(weight: Tensor, u: Tensor, v: Tensor) -> tuple[int, float, bool] | None:
    """(dim, σ = u·W v, dim assumed?) for the matrix view that u and v fit; None if none does.

    Where the sizes fit more than one view (a square kernel: dim 0 and dim 1 both give
    C × C·k·k), the one whose stored vectors are a power-iteration pair: after any step, the
    vector updated last is the other one through W (v ∝ Wᵀu in the parametrization flavour,
    u ∝ W v in the hook flavour), which no other view satisfies. Vectors never iterated (a hook
    flavour saved before its first training forward) tell nothing: dim 0, the usual one.
    """
    fits = []
    for dim in range(weight.ndim):
        if weight.shape[dim] != u.numel() or weight.numel() // max(weight.shape[dim], 1) != v.numel():
            continue
        mat = _matrix(weight, dim)
        uu, vv = u.to(mat.dtype), v.to(mat.dtype)
        wv = mat @ vv
        sigma = torch.vdot(uu, wv).real.item()
        scale = max(abs(sigma), 1e-30)
        residual = min(
            torch.linalg.vector_norm(wv - sigma * uu).item() / scale,
            torch.linalg.vector_norm(mat.mH @ uu - sigma * vv).item() / scale,
        )
        fits.append((residual if math.isfinite(residual) else math.inf, dim, sigma))
    if not fits:
        return None
    best = min(fits)
    assumed = len(fits) > 1 and not best[0] < _PAIR_RESIDUAL
    if assumed:
        best = next((fit for fit in fits if fit[1] == 0), fits[0])
    return best[1], best[2], assumed


# Relative residual under which stored u, v count as a power-iteration pair of a view (float16
# vectors round at ~1e-3; a view they do not belong to gives ~1).
_PAIR_RESIDUAL = 1e-2


def _display_name(prefix: str | None, tensor: str) -> str:
    return layer_name(prefix or "", tensor) or "(root)"  # the names sn_cuda.sigmas gives


def _report(name: str, flavour: str, weight: Tensor, u: Tensor | None, v: Tensor | None) -> LayerReport:
    estimate = None
    if u is not None and v is not None and u.ndim == 1 and v.ndim == 1:
        estimate = _estimate(weight, u, v)
    dim, sigma, assumed = estimate if estimate is not None else (0, None, False)
    return LayerReport(name, flavour, tuple(weight.shape), dim, sigma, weight, dim_assumed=assumed)


def find_layers(tensors: Mapping[str, Tensor]) -> list[LayerReport]:
    """One report per layer weight of 2 or more dims, in the order of the keys (no --exact)."""
    reports: list[LayerReport] = []
    for key, weight in tensors.items():
        if not (isinstance(weight, Tensor) and weight.ndim >= 2):
            continue
        if not (weight.is_floating_point() or weight.is_complex()):
            continue
        if match := _PARAM_ORIGINAL.match(key):
            # Its spectral norm's vectors: parametrizations.X.<i>._u / ._v (i = 0 unless
            # another parametrization comes first).
            base = key[: -len("original")]
            u_keys = sorted(k for k in tensors if k.startswith(base) and k.endswith("._u"))
            u = tensors[u_keys[0]] if u_keys else None
            v = tensors.get(u_keys[0][: -len("_u")] + "_v") if u_keys else None
            flavour = "conv-operator" if u is not None and u.ndim > 1 else "parametrization"
            name = _display_name(match["prefix"], match["tensor"])
            reports.append(_report(name, flavour, weight, u, v))
            continue
        match = _LEGACY_ORIGINAL.match(key)
        stem = key[: -len("_orig")]
        if match and stem + "_u" in tensors and stem + "_v" in tensors:
            name = _display_name(match["prefix"], match["tensor"])
            reports.append(_report(name, "legacy", weight, tensors[stem + "_u"], tensors[stem + "_v"]))
        elif key.rsplit(".", 1)[-1] == "weight":
            name = _display_name(key[: -len("weight")].rstrip("."), "weight")
            reports.append(_report(name, "plain", weight, None, None))
    return reports


def add_exact(reports: Sequence[LayerReport]) -> None:
    """Fill in ``exact``: the largest singular value of each weight's matrix view (nan for a
    weight with NaN/Inf, a diverged model's; 0 for an empty one). Not for conv_spectral_norm's
    layers: their norm is the convolution's, whose stride, padding and dilation a checkpoint
    does not hold (σ of the reshaped kernel would be another number)."""
    for report in reports:
        if report.flavour == "conv-operator":
            continue
        mat = _matrix(report.weight, report.dim)
        if mat.numel() == 0:
            report.exact = 0.0
        elif not torch.isfinite(mat).all():
            report.exact = math.nan
        else:
            report.exact = torch.linalg.matrix_norm(mat, ord=2).item()


# ------------------------------------------------------------------------------- output
def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.6g}"


def format_table(reports: Sequence[LayerReport], exact: bool) -> str:
    """The per-layer table and the product row."""
    header = ["layer", "flavour", "shape", "sigma (u, v)"] + (["sigma (exact)"] if exact else [])
    rows = [
        [r.name, r.flavour, "x".join(map(str, r.shape)), _fmt(r.sigma)] + ([_fmt(r.exact)] if exact else [])
        for r in reports
    ]
    estimated = [r.sigma for r in reports if r.sigma is not None]
    product = ["product", "", "", _fmt(math.prod(estimated)) if estimated else "-"]
    if exact:
        product.append(_fmt(math.prod(r.exact for r in reports if r.exact is not None)))
    widths = [max(len(row[i]) for row in [header, *rows, product]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows, product]]
    if estimated and len(estimated) < len(reports):
        lines.append(
            f"(sigma (u, v) product over the {len(estimated)} of {len(reports)} layers "
            "with stored u, v)"
        )
    assumed = [r.name for r in reports if r.dim_assumed]
    if assumed:
        lines.append(
            f"(never iterated u, v fit more than one matrix view of {', '.join(assumed)}: the "
            "rows are taken on dim 0, which a ConvTranspose's are not)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sn_cuda inspect",
        description="Per-layer spectral norms stored in a checkpoint or state_dict file.",
    )
    parser.add_argument("path", metavar="PATH", help="a file written by torch.save")
    parser.add_argument(
        "--exact", action="store_true",
        help="also compute the largest singular value of each weight (an SVD per layer)",
    )
    parser.add_argument(
        "--trust", action="store_true",
        help="load with torch.load(weights_only=False): runs code from the file, only for "
        "files you trust",
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # --help (0) or a usage error (2): return, do not exit
        return 0 if e.code is None else int(e.code)
    try:
        tensors = load_state_dict(args.path, trust=args.trust)
        reports = find_layers(tensors)
        if not reports:
            raise InspectError(
                f"{args.path}: holds no layer weights (no 'weight', 'X_orig' or "
                "'parametrizations.X.original' tensor of 2 or more dims)"
            )
    except InspectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.exact:
        add_exact(reports)
    print(f"{args.path}: {len(reports)} layer{'s' if len(reports) != 1 else ''}")
    print(format_table(reports, args.exact))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
