"""The one switch: route fla's Triton entry points to plain-torch references for CPU tensors.

``install()`` replaces the functions (and two ``forward`` methods) that fla's DeltaNet, Gated
DeltaNet and Kimi Delta Attention (KDA) models call with thin wrappers. A wrapper looks at the tensors it is given: if every one
of them is on the CPU it calls the reference from :mod:`harness.kernels`; otherwise (CUDA, or any
other device) it calls the original fla object untouched, so GPU runs are bit-for-bit what fla
does, with one exception: the two ``fused_recurrent_*`` wrappers and ``causal_conv1d_update`` hand
one-token decode steps on CUDA to our Triton steps (:mod:`harness.kernels.fla_decode` and
:mod:`harness.kernels.conv_decode`, bracketed in the table below, which say which calls qualify;
``HARNESS_FLA_DECODE=fla`` sends them to fla again, read at call time).
``install()`` is idempotent, ``installed()`` says whether the switch is on, ``uninstall()`` puts
the originals back, and ``patches()`` lists every attribute that was replaced. The switch
keeps no state of its own: the wrappers in fla's modules are the state (each remembers its
original), so a reloaded or second copy of this module agrees with the first. Every patch of fla
lives in this module.

What is replaced (fla 0.6.0), original -> reference (CPU tensors) [-> GPU fast path, else fla]:

====================================================================  ============================================
``fla.ops.delta_rule.chunk_delta_rule``                               ``delta_rule.delta_rule_chunk``
``fla.ops.delta_rule.fused_recurrent_delta_rule``                     ``delta_rule.delta_rule_recurrent``
                                                                      [-> ``fla_decode.delta_rule_decode``]
``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` (= ``chunk_gdn``)  ``delta_rule.gated_delta_rule_chunk``
``fla.ops.gated_delta_rule.fused_recurrent_gated_delta_rule``          ``delta_rule.gated_delta_rule_recurrent``
                                                                      [-> ``fla_decode.gated_delta_rule_decode``]
``fla.ops.kda.chunk_kda``                                              ``kda.chunk_kda``
``fla.ops.kda.fused_recurrent_kda``                                    ``kda.fused_recurrent_kda``
``fla.modules.causal_conv1d.causal_conv1d`` (ShortConvolution.forward,  ``conv.causal_conv1d``
GatedDeltaNet's fused q/k/v conv)
``fla.modules.causal_conv1d.causal_conv1d_update`` (ShortConvolution    ``conv.causal_conv1d_update``
decode step)                                                          [-> ``conv_decode.causal_conv1d_update_decode``]
``fla.modules.norm.layernorm.rms_norm`` / ``layer_norm`` (RMSNorm,      ``norm.rms_norm`` / ``norm.layer_norm``
LayerNorm, fused prenorm + residual)
``fla.modules.norm.fused_norm_gate.rms_norm_gated`` /                   ``norm.rms_norm_gated`` / ``norm.layer_norm_gated``
``layer_norm_gated`` (FusedRMSNormGated, FusedLayerNormGated)
``fla.modules.activations.swiglu`` / ``swiglu_linear`` (GatedMLP)       ``activations.swiglu`` / ``swiglu_linear``
``fla.modules.fused_cross_entropy.cross_entropy_loss``                  ``loss.cross_entropy_loss``
``FusedCrossEntropyLoss.forward`` (method; fla's asserts a GPU device)  ``loss.fused_cross_entropy_forward``
``FusedLinearCrossEntropyLoss.forward`` (method)                        ``loss.fused_linear_cross_entropy_forward``
====================================================================  ============================================

A function is replaced in its defining module *and* in every loaded ``fla.*`` module that holds
the same object under any name (``from ... import`` copies: ``fla.layers.delta_net``,
``fla.layers.gated_deltanet``, ``fla.modules.mlp``, the ``fla.modules.conv*`` alias modules, ...);
``install()`` imports ``fla.layers`` and ``fla.models`` first so those copies exist. Modules
imported later get the wrapper because they import it from a patched module.

Not covered (they never run in DeltaNet / Gated DeltaNet / KDA with the default configs): fla's other
layers' own ops, ``fused_attnres`` (``attnres_block_size``), ``powglu`` (``hidden_act='powlu'``),
``ShortConvolution``'s ``backend='cuda'`` decode path (needs the ``causal_conv1d`` package), the
per-key/per-value decays ``gk``/``gv``, and context parallelism. ``elu_p1``, ``l2_warp`` and the
unpad/repad index helpers of ``fla.layers.utils`` are already plain torch on CPU.

Why patch module attributes instead of using ``fla.backends``? fla 0.6 does have a backend
registry (``fla.backends.dispatch`` / ``register``; a backend's per-call verifier even sees the
arguments, so it could decide by device). Checked against fla 0.6.0:

* of the entry points the layers call, only ``chunk_gated_delta_rule`` (operation registry
  ``'gated_delta_rule'``), ``causal_conv1d_update``, ``swiglu_linear`` and ``cross_entropy_loss``
  are dispatched, and for KDA ``chunk_kda`` (``fused_recurrent_kda`` only through its inner
  ``fused_recurrent_kda_fwd``). ``chunk_delta_rule``, ``fused_recurrent_delta_rule``,
  ``fused_recurrent_gated_delta_rule``, ``causal_conv1d``, ``rms_norm``, ``rms_norm_gated`` and
  ``swiglu`` are not; for those only inner Triton launchers are (``layer_norm_fwd``/``_bwd``,
  ``layer_norm_gated_fwd``/``_bwd``, ``causal_conv1d_fwd``/``_bwd``, ``swiglu_fwd``/``fwdbwd``,
  ``l2norm_fwd``/``_bwd``, ``chunk_gated_delta_rule_fwd_h``, ...). Hooking those would mean
  re-implementing fla's private forward/backward contracts (saved statistics, hand-written
  backward kernels) instead of letting autograd differentiate a plain reference, and the
  ``fused_recurrent_*`` entry points have no hook at any level;
* ``FusedCrossEntropyLoss.forward`` asserts a CUDA/NPU/XPU device before it reaches the
  dispatched ``cross_entropy_loss``, so a registered backend would never be asked;
* ``FLA_DISABLE_BACKEND_DISPATCH=1`` turns every dispatch point into the plain Triton function
  (registered backends are never consulted), which would silently send CPU tensors back to Triton.

So the backend registry could serve at most five of the seventeen entry points replaced here; one
mechanism for all of them (replace the entry point, decide by device) is simpler and has no such
escape hatch.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import activations, conv, conv_decode, delta_rule, fla_decode, kda, loss, norm

__all__ = ["install", "installed", "patches", "uninstall", "use_reference", "wants_reference_device"]

# (defining module, attribute, reference)
_FUNCTIONS: tuple[tuple[str, str, Callable], ...] = (
    ("fla.ops.delta_rule.chunk", "chunk_delta_rule", delta_rule.delta_rule_chunk),
    ("fla.ops.delta_rule.fused_recurrent", "fused_recurrent_delta_rule", delta_rule.delta_rule_recurrent),
    ("fla.ops.gated_delta_rule.chunk", "chunk_gated_delta_rule", delta_rule.gated_delta_rule_chunk),
    (
        "fla.ops.gated_delta_rule.fused_recurrent",
        "fused_recurrent_gated_delta_rule",
        delta_rule.gated_delta_rule_recurrent,
    ),
    ("fla.ops.kda.chunk", "chunk_kda", kda.chunk_kda),
    ("fla.ops.kda.fused_recurrent", "fused_recurrent_kda", kda.fused_recurrent_kda),
    ("fla.modules.causal_conv1d.ops", "causal_conv1d", conv.causal_conv1d),
    ("fla.modules.causal_conv1d.ops", "causal_conv1d_update", conv.causal_conv1d_update),
    ("fla.modules.norm.layernorm", "rms_norm", norm.rms_norm),
    ("fla.modules.norm.layernorm", "layer_norm", norm.layer_norm),
    ("fla.modules.norm.fused_norm_gate", "rms_norm_gated", norm.rms_norm_gated),
    ("fla.modules.norm.fused_norm_gate", "layer_norm_gated", norm.layer_norm_gated),
    ("fla.modules.activations.ops", "swiglu", activations.swiglu),
    ("fla.modules.activations.ops", "swiglu_linear", activations.swiglu_linear),
    ("fla.modules.fused_cross_entropy.ops", "cross_entropy_loss", loss.cross_entropy_loss),
)

# attribute -> fast path for non-CPU calls, taking fla's original first (it falls back to it)
_DEVICE_PATHS: dict[str, Callable] = {
    "fused_recurrent_delta_rule": fla_decode.delta_rule_decode,
    "fused_recurrent_gated_delta_rule": fla_decode.gated_delta_rule_decode,
    "causal_conv1d_update": conv_decode.causal_conv1d_update_decode,
}

# (defining module, class, method, reference taking the module instance first)
_METHODS: tuple[tuple[str, str, str, Callable], ...] = (
    ("fla.modules.fused_cross_entropy.ops", "FusedCrossEntropyLoss", "forward", loss.fused_cross_entropy_forward),
    (
        "fla.modules.fused_linear_cross_entropy.ops",
        "FusedLinearCrossEntropyLoss",
        "forward",
        loss.fused_linear_cross_entropy_forward,
    ),
)

# every fla module the three model families import, so that copies of the functions exist to patch
_PRELOAD = ("fla.layers", "fla.models", "fla.modules", "fla.ops.delta_rule", "fla.ops.gated_delta_rule", "fla.ops.kda")

_lock = threading.RLock()


# --------------------------------------------------------------------------------------------
# routing


def wants_reference_device(device: torch.device | str) -> bool:
    """The device rule: CPU tensors go to the torch references, every other device to fla."""
    return torch.device(device).type == "cpu"


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (tuple, list)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


def use_reference(args: tuple, kwargs: dict) -> bool:
    """True when a call should take the reference: it has tensors and all of them are on the CPU.

    A single tensor elsewhere (q on CUDA with a ``cu_seqlens_cpu`` helper, say) sends the call to
    fla; a call without tensors goes to fla too.
    """
    found = False
    for t in _tensors(args, kwargs):
        if not wants_reference_device(t.device):
            return False
        found = True
    return found


def _route(original: Callable, reference: Callable, name: str) -> Callable:
    """A wrapper calling ``reference`` for all-CPU calls and ``original`` (or its fast path) otherwise."""
    fast = _DEVICE_PATHS.get(name)
    on_device = functools.partial(fast, original) if fast is not None else original

    def wrapper(*args, **kwargs):
        if use_reference(args, kwargs):
            return reference(*args, **kwargs)
        return on_device(*args, **kwargs)

    try:
        functools.update_wrapper(wrapper, original)
    except (AttributeError, TypeError):  # e.g. a bound autograd.Function.apply
        pass
    wrapper.__name__ = getattr(original, "__name__", name)
    wrapper.__wrapped__ = original
    wrapper._harness_original = original
    wrapper._harness_reference = reference
    return wrapper


def _is_wrapper(obj: Any) -> bool:
    return callable(obj) and hasattr(obj, "_harness_reference") and hasattr(obj, "_harness_original")


# --------------------------------------------------------------------------------------------
# the switch. Its state lives in fla itself (the wrappers), not here, so a second copy of this
# module (a reload, or this folder imported under another name) sees the same truth.


def _fla_modules() -> list:
    """Loaded fla modules, each once (fla registers some modules under several alias names)."""
    found = {
        id(m): m
        for name, m in list(sys.modules.items())
        if m is not None and (name == "fla" or name.startswith("fla."))
    }
    return list(found.values())


def _classes() -> list[type]:
    return [getattr(importlib.import_module(mod), cls) for mod, cls, _, _ in _METHODS]


def _primary_targets() -> Iterator[tuple[Any, str]]:
    for module_name, attr, _ in _FUNCTIONS:
        yield importlib.import_module(module_name), attr
    for (_, _, method, _), cls in zip(_METHODS, _classes()):
        yield cls, method


def _wrapped_attributes() -> Iterator[tuple[Any, str, Any]]:
    """(owner, attribute, wrapper) for every routing wrapper currently held by fla."""
    for owner in (*_fla_modules(), *_classes()):
        try:
            items = list(vars(owner).items())
        except TypeError:  # an odd sys.modules entry without a __dict__
            continue
        for key, value in items:
            if _is_wrapper(value):
                yield owner, key, value


def _name(owner: Any) -> str:
    return f"{owner.__module__}.{owner.__qualname__}" if isinstance(owner, type) else owner.__name__


def installed() -> bool:
    """Whether the switch is on: every entry point listed above currently holds a routing wrapper."""
    if "fla" not in sys.modules:
        return False
    with _lock:
        return all(_is_wrapper(vars(owner).get(attr)) for owner, attr in _primary_targets())


def install() -> None:
    """Route fla's entry points to the CPU references for CPU tensors. Safe to call repeatedly."""
    with _lock:
        for name in _PRELOAD:
            importlib.import_module(name)
        if installed():
            return
        modules = _fla_modules()
        for module_name, attr, reference in _FUNCTIONS:
            original = getattr(importlib.import_module(module_name), attr)
            if _is_wrapper(original):
                continue
            wrapper = _route(original, reference, attr)
            for module in modules:
                for key, value in list(getattr(module, "__dict__", {}).items()):
                    if value is original:
                        setattr(module, key, wrapper)
        for (_, cls_name, method, reference), cls in zip(_METHODS, _classes()):
            original = vars(cls)[method]
            if not _is_wrapper(original):
                setattr(cls, method, _route(original, reference, f"{cls_name}.{method}"))


def uninstall() -> None:
    """Put every original back (mainly for tests and for comparing against fla)."""
    with _lock:
        for owner, key, wrapper in list(_wrapped_attributes()):
            setattr(owner, key, wrapper._harness_original)


def patches() -> list[str]:
    """``module.attribute`` / ``Class.method`` names currently routed by ``install()``."""
    with _lock:
        return sorted(f"{_name(owner)}.{key}" for owner, key, _ in _wrapped_attributes())
