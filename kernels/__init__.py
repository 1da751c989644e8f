"""Plain-torch references for fla's Triton kernels, and the switch that routes fla to them.

``harness.kernels.install()`` (= ``fla_cpu.install``) makes fla's DeltaNet / Gated DeltaNet / KDA
models run on CPU tensors; CUDA tensors still take fla's own kernels, except one-token decode
steps, which take our Triton step (``fla_decode``; ``HARNESS_FLA_DECODE=fla`` keeps fla's). The
references can also be called directly: ``delta_rule_chunk``, ``gated_delta_rule_recurrent``,
``causal_conv1d``, ...

Imports inside this package are relative on purpose: with the repository root on ``sys.path``
(``python -m pytest`` run there) this folder is also visible as a top-level ``kernels``, a name
transformers probes for the Hugging Face ``kernels`` package; it must then still import cleanly
(it has no ``__version__``, so transformers sees no usable ``kernels`` and moves on).
"""

from .activations import swiglu, swiglu_linear
from .conv import causal_conv1d, causal_conv1d_update
from .delta_rule import (
    delta_rule_chunk,
    delta_rule_recurrent,
    gated_delta_rule_chunk,
    gated_delta_rule_recurrent,
    gdn_gate,
    l2norm,
)
from .fla_cpu import install, installed, patches, uninstall
from .loss import cross_entropy_loss
from .norm import layer_norm, layer_norm_gated, rms_norm, rms_norm_gated

__all__ = [
    "causal_conv1d",
    "causal_conv1d_update",
    "cross_entropy_loss",
    "delta_rule_chunk",
    "delta_rule_recurrent",
    "gated_delta_rule_chunk",
    "gated_delta_rule_recurrent",
    "gdn_gate",
    "install",
    "installed",
    "l2norm",
    "layer_norm",
    "layer_norm_gated",
    "patches",
    "rms_norm",
    "rms_norm_gated",
    "swiglu",
    "swiglu_linear",
    "uninstall",
]
