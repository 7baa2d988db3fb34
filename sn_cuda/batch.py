"""Every spectral-normalized layer of a model in one fused call per forward.

``sn_cuda.batch(model)`` finds the spectral norms under ``model`` — torch's or sn_cuda's, of
either flavour — and registers a forward pre-hook on ``model`` that computes all of their W/σ
with one ``sn_cuda.ops.spectral_norm`` call per (device, dtype, flavour, settings) group, then
hands each layer its result (a "staged" weight, read by the layer's own spectral-norm object
instead of computing it). Nothing in the state_dict changes.

How a layer takes its staged weight: torch's spectral-norm objects are switched to
sn_cuda's subclasses of them (``__class__`` assignment, undone by ``.remove()``), which return
the staged value while the root's forward runs. State, keys and hooks are untouched. In the
parametrization flavour the layer's ``ParametrizationList`` is switched too
(``_StagedParametrizations``): reading ``module.weight`` then returns the staged value without
the two module calls of torch's parametrization chain (6 µs a read on a 2-core EPYC, 1.3 µs
with the switch: bench/RESULTS.md).

Where this differs from torch: one power iteration step (of ``n_power_iterations``) per layer
per forward of ``model``. torch iterates each time the layer runs (hook flavour) or each time
the parametrized weight is read (parametrization flavour). In the common case — each layer
runs once per forward of the model — the two are the same; a layer that runs twice in one
forward of ``model`` iterates once here, twice in torch, and a layer that does not run in a
forward (a head the forward did not pick) iterates here, not in torch. A layer called outside
a forward of ``model`` computes its own weight, as without batching; so does a layer whose
spectral norm was removed since (one applied to it again is a new one, per layer until the
model is batched again), and, inside ``parametrize.cached()``, a weight already cached.
``n_power_iterations`` and ``eps`` are read on every forward, as torch's layers read them.
The layers are those under ``model`` when ``batch()`` runs: one added later computes per
layer, and one replaced or deleted (``model.head = new_head``) is still computed by the fused
call, and kept alive, until ``.remove()``. After changing which layers a model holds, remove
the handle and batch again.

Gradients: a batched layer that a forward does not use (a head it did not pick) gets no
gradient, as in torch, except under torch.compile, where it gets a zero one: the root's
pre-hook is traced as a graph of its own, whose unused outputs AOTAutograd gives zero
gradients (an optimizer with momentum or weight decay then moves that layer).

Copies: a deepcopy or pickle of the whole batched model is batched by its own copy of the
handle. A copy of a submodule (``copy.deepcopy(gan.G)`` for an EMA generator, where ``gan``
was batched) carries no handle and nothing of the rest of the root: it computes per layer, and
can be batched on its own.

Activation checkpointing: ``torch.utils.checkpoint`` of the whole model, and of any region
with ``use_reentrant=True``, gives torch's numbers. With ``use_reentrant=False``, a region
inside the model's forward that holds batched layers fails in the backward with torch's
``CheckpointError``: the region's forward used the staged weights, its recomputation (after
the root's forward) computes them per layer, and the saved tensors differ. Batch a module that
leaves such regions out, or use ``use_reentrant=True`` there.

Not batched (left to the per-layer path, still correct): 1-D weights, complex weights, and
parametrization chains where spectral norm is not the first parametrization. Nor the replicas
of ``nn.DataParallel``: they share the root's hooks but not its layers, and each runs in its own
thread, so the hook leaves them to compute their own weights, as torch does (batching the
model it was given from every replica thread would update its u, v once per replica).
``DistributedDataParallel`` keeps one model per process and is batched as usual;
``batch(ddp_model)`` batches the module it wraps, whose forward runs after DDP has broadcast
rank 0's buffers (u, v), as the layers' own would. Nor layers
whose weight is sharded when the root's forward starts (FSDP2's ``fully_shard``: a DTensor,
gathered only in its own module's forward): each computes its own weight there, as torch does.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.nn.utils import parametrize
from torch.nn.utils.parametrize import ParametrizationList

from . import legacy, ops, parametrization
from ._checks import check_module, check_power_iteration_settings
from ._staged import Staged
from .layers import SpectralNormLayer, has_spectral_norm, select_modules, spectral_norm_layers

__all__ = ["batch", "apply", "BatchHandle", "batch_owner"]

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed
    _DTensor = ()  # isinstance(x, ()) is False


class _StagedParametrizations(Staged, ParametrizationList):
    """A ParametrizationList that returns the weight staged by ``sn_cuda.batch`` when spectral
    norm is its only parametrization (a chain still runs, its spectral norm staged)."""

    def _get_name(self) -> str:
        return "ParametrizationList"  # the repr of a batched model: the same as before batch()

    def __call__(self, *args, **kwargs):
        staged = self._staged
        if staged is not None and len(self._modules) == 1:
            return staged
        return super().__call__(*args, **kwargs)


def _batchable(layer: SpectralNormLayer) -> bool:
    if layer.param_flavour and "_u" not in layer.sn._buffers:
        return False  # a 1-D weight: torch's parametrization keeps no vectors for it
    weight = layer.params.get(layer.wkey)  # None: not a parameter (FSDP1, prune), per layer
    if weight is None or weight.ndim < 2 or weight.is_complex():
        return False
    # Spectral norm must be the first parametrization: its input is then the original tensor.
    return not layer.param_flavour or (layer.plist.is_tensor and layer.plist[0] is layer.sn)


# Which handle batches a layer: its spectral-norm object -> a weak reference to the handle.
# Kept here, not on the object, so that a copy or pickle of a submodule of a batched model
# does not carry the handle along (and through it the whole root model, D with G): such a copy
# computes per layer and can be batched on its own. A copy of the whole root copies its
# handle (the root's hooks hold it), which registers the copied layers (__setstate__).
_owners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def batch_owner(sn) -> "BatchHandle | None":
    """The live handle that batches the spectral-norm object ``sn``, if any."""
    ref = _owners.get(sn)
    return None if ref is None else ref()


class BatchHandle:
    """Returned by ``sn_cuda.batch``. ``.remove()`` restores per-layer spectral norm."""

    def __init__(self, model: nn.Module):
        layers = [l for l in spectral_norm_layers(model) if _batchable(l)]
        for layer in layers:
            if batch_owner(layer.sn) is not None:
                raise ValueError(
                    f"batch(model): layer '{layer.name}' is already batched by another "
                    "sn_cuda.batch handle; call .remove() on that handle first"
                )
        # Switch torch's objects to sn_cuda's subclasses (same state, same keys).
        for layer in layers:
            target = parametrization.SpectralNorm if layer.param_flavour else legacy.SpectralNorm
            if not isinstance(layer.sn, target):
                layer.torch_class = type(layer.sn)
                layer.sn.__class__ = target
            if layer.param_flavour and not isinstance(layer.plist, _StagedParametrizations):
                layer.plist_class = type(layer.plist)
                layer.plist.__class__ = _StagedParametrizations
            # An instance attribute where the class's was read: a model compiled before batch()
            # fails torch.compile's guards on it and is traced again, now batched (sn_cuda's own
            # hooks change class in no other way that a guard would see).
            layer.sn.__dict__["_staged"] = None
        self.model = model
        self.layers = layers
        self._own()
        # First of the root's pre-hooks: a legacy spectral norm on the root itself (registered
        # before) then finds its weight staged instead of iterating on its own as well.
        self._pre = model.register_forward_pre_hook(self._stage, prepend=True)
        self._post = model.register_forward_hook(self._clear, always_call=True)

    # -- the hot path: once per forward of the root ------------------------------------------
    def _stage(self, module, args):
        if module is not self.model:
            return  # an nn.DataParallel replica (it shares the root's hooks): see the module docs
        # Every forward of the root stages afresh, and nothing else carries over from one
        # forward to the next: a forward stopped by a BaseException (KeyboardInterrupt), which
        # skips the forward hooks, leaves no state that the next forward would trust. (A
        # forward of the root nested in another restages; its end clears, and the rest of the
        # outer forward computes per layer.)
        cache = parametrize._cache if parametrize._cache_enabled else None
        groups: dict = {}
        for layer in self.layers:
            if layer.registry.get(layer.registry_key) is not layer.registered:
                continue  # its spectral norm was removed since (or removed and applied again)
            weight = layer.params.get(layer.wkey)
            if weight is None or isinstance(weight, _DTensor):
                # Taken out of the parameters (FSDP1's flat parameter, torch.nn.utils.prune),
                # or sharded by FSDP2 (whole only inside its own module's forward): per layer,
                # as torch.
                continue
            if cache is not None and (id(layer.module), layer.tensor_name) in cache:
                continue  # inside parametrize.cached(), computed once already, as torch does
            sn = layer.sn
            # n_power_iterations and eps read each time, as torch's layers do.
            key = (weight.device, weight.dtype, layer.mode.training, layer.param_flavour,
                   sn.n_power_iterations, sn.eps)
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [], [], [], [])
            ws, us, vs, dims, members = group
            ws.append(weight)
            us.append(layer.buffers[layer.ukey])
            vs.append(layer.buffers[layer.vkey])
            dims.append(sn.dim)
            members.append(layer)
        record = not ops.in_functorch_transform()  # as ops.record_sigma, asked once
        for (_, _, training, param_flavour, n_iter, eps), (ws, us, vs, dims, layers) in groups.items():
            # The parametrization flavour updates u first, the hook flavour v first.
            u_first = param_flavour
            w_sn, sig = ops.spectral_norm(ws, us, vs, dims, u_first, n_iter, eps, training)
            sig = sig.detach()
            # Straight into the instance dicts: nn.Module.__setattr__ costs ~2 µs a call, per layer.
            # (Each __dict__ read from its module here, not kept: torch.compile tracks writes
            # to a module's attributes only through the module.)
            for i, (layer, w) in enumerate(zip(layers, w_sn)):
                state = layer.sn.__dict__
                state["_staged"] = w
                if record:
                    state["last_sigma"] = (sig, i)
                if layer.plist is not None:
                    layer.plist.__dict__["_staged"] = w

    def _clear(self, module, args, output):
        if module is not self.model:
            return
        for layer in self.layers:
            layer.sn.__dict__["_staged"] = None
            if layer.plist is not None:
                layer.plist.__dict__["_staged"] = None

    # -- lifecycle ---------------------------------------------------------------------------
    def _own(self) -> None:
        ref = weakref.ref(self)
        for layer in self.layers:
            _owners[layer.sn] = ref

    def __setstate__(self, state) -> None:
        # A copy (deepcopy, or pickle and load) of the whole batched root: its layers are the
        # copy's, batched by this copy of the handle.
        self.__dict__.update(state)
        self._own()

    def remove(self) -> None:
        """Per-layer spectral norm again; torch's layers get torch's classes back."""
        self._pre.remove()
        self._post.remove()
        for layer in self.layers:
            layer.sn.__dict__.pop("_staged", None)
            if layer.plist is not None:
                layer.plist.__dict__.pop("_staged", None)
            _owners.pop(layer.sn, None)
            if layer.plist_class is not None:
                layer.plist.__class__ = layer.plist_class
            if layer.torch_class is not None:
                layer.sn.__class__ = layer.torch_class
                # legacy.SpectralNorm's weak reference: torch's class would try to pickle it.
                layer.sn.__dict__.pop("_set_weight", None)
        self.layers = []

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"BatchHandle({len(self.layers)} layers of {type(self.model).__name__})"


def batch(model: nn.Module) -> BatchHandle:
    """Compute every spectral-normalized layer under ``model`` in one fused call per forward.

    Works on layers made by torch's ``spectral_norm`` functions (either flavour) and by
    sn_cuda's; the state_dict is unchanged. Returns a handle whose ``.remove()`` restores the
    per-layer behaviour. Iteration count: one power iteration step per layer per forward of
    ``model`` — equal to torch when each layer runs once per forward (see the module docs for
    the difference when a layer runs twice in one forward).
    """
    check_module("batch(model)", model)
    return _batch(model, "batch(model)")


def _batch(model: nn.Module, caller: str) -> BatchHandle:
    if isinstance(model, DistributedDataParallel):
        # Its forward broadcasts rank 0's buffers (u, v) and then runs its module: the layers
        # are staged in the module's forward, after the broadcast, not before it.
        model = model.module
    handle = BatchHandle(model)
    if not handle.layers:  # most likely batch() before spectral norm was applied
        warnings.warn(
            f"{caller}: found no spectral norm under {type(model).__name__} that it can batch "
            "(a real weight of 2 or more dims, spectral norm first among its parametrizations); "
            "the handle does nothing",
            stacklevel=3,
        )
    return handle


def apply(
    model: nn.Module,
    n_power_iterations: int = 1,
    eps: float = 1e-12,
    include=None,
    exclude=None,
) -> BatchHandle:
    """Spectral norm (parametrization flavour) on every Conv*/ConvTranspose*/Linear/Embedding
    weight under ``model``, then ``batch(model)``; returns the batch handle.

    ``include`` replaces the default set of module types; ``exclude`` removes modules; each is
    a module type, an fnmatch pattern on the qualified module name (``"head.*"``), or a list
    of those. Modules whose weight is already spectral-normalized are left as they are. All
    arguments and modules are checked before any module is changed.
    """
    check_module("apply(model)", model)
    check_power_iteration_settings("apply()", n_power_iterations, eps)
    already = {id(l.module) for l in spectral_norm_layers(model)}
    chosen = [
        module for _, module in select_modules(model, include, exclude, "apply()")
        # Not those with a spectral norm already (also conv_spectral_norm's), nor weightless.
        if id(module) not in already and not has_spectral_norm(module)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]
    # Registration checks everything torch checks; on a failure, undo what was done.
    done = []
    try:
        for module in chosen:
            parametrization.spectral_norm(module, "weight", n_power_iterations, eps)
            done.append(module)
        return _batch(model, "apply()")
    except BaseException:
        for module in done:  # only the spectral norm this call appended; the rest as it was
            plist = module.parametrizations["weight"]
            if len(plist) == 1:
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            else:
                del plist[-1]
        raise


