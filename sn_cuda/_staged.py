"""What ``sn_cuda.batch`` hands a layer's spectral-norm object, and what ``sn_cuda.sigmas``
reads from it: the one contract between the batching layer and the two flavours.

Mixed into both flavours' ``SpectralNorm`` and into batch.py's ``_StagedParametrizations``:
``_staged`` is W/σ computed by the fused call while the root's forward runs (read first by the
object, instead of computing it), ``last_sigma`` σ of the last forward as ``(tensor, index)``.
A copy or pickle leaves ``_staged`` out: taken during a batched forward (from a forward hook),
it would carry a non-leaf that deepcopy refuses and that belongs to the original's forward.
"""

from __future__ import annotations

from torch import Tensor


class Staged:
    last_sigma: tuple[Tensor, int] | None = None
    _staged: Tensor | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_staged", None)
        return state
