"""``python -m sn_cuda bench``: spectral norm timed on public model shapes, torch vs sn_cuda.

suites.py    the suites (model_shapes.json + synthetic) built as nn.Modules
methods.py   the SN flavours compared (torch hook / parametrization / compile, sn_cuda)
timing.py    warm-up + median of repeats (CUDA events on the GPU), copy bandwidth
sngan.py     the SNGAN CIFAR ResNet D for the end-to-end training step
run.py       runs it all into one result dict;  report.py  table, JSON schema, plot
cli.py       the command line
"""

from .cli import main

__all__ = ["main"]
