"""sn_cuda: spectral normalization for PyTorch, fused on the GPU, equal to torch's numbers.

    sn_cuda.spectral_norm(module)          # = torch.nn.utils.parametrizations.spectral_norm
    sn_cuda.legacy.spectral_norm(module)   # = torch.nn.utils.spectral_norm
    sn_cuda.patch_torch()                  # torch's two functions build sn_cuda layers
    sn_cuda.batch(model)                   # all SN layers of a model in one fused call
    sn_cuda.apply(model)                   # SN on every Conv/Linear/Embedding, batched
    sn_cuda.sigmas(model)                  # {layer: sigma of the last forward}
    sn_cuda.SpectralPenalty(model)         # sum of sigma^2 over a model's weights, as a loss
    sn_cuda.conv_spectral_norm(conv, input_shape=...)  # by the convolution's operator norm
    sn_cuda.backend()                      # "cuda" or "torch", and .reason
"""

from . import legacy, ops, reference
from ._extension import backend
from .batch import apply, batch
from .layers import sigmas
from .parametrization import spectral_norm
from .patch import patch_torch
from .penalty import SpectralPenalty
from .conv_norm import conv_spectral_norm

__version__ = "0.1.0"

__all__ = [
    "spectral_norm",
    "legacy",
    "patch_torch",
    "backend",
    "batch",
    "apply",
    "sigmas",
    "SpectralPenalty",
    "conv_spectral_norm",
    "ops",
    "reference",
]
