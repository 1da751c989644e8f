"""Published architectures without their weights: configs to build random-weight models with
the real geometry (on the meta device they take no memory), for byte counts and timings.

    from harness.model_shapes import random_model
    model = random_model("qwen3.5-0.8b")            # meta device: shapes only
    model = random_model("qwen3.5-0.8b", "cpu")     # real random weights

Sources: Llama-3.1-8B's config.json (meta-llama). Qwen3.5-0.8B: 24 layers, hidden 1024, 8 query /
2 KV heads, 6 attention layers (every 4th), vocabulary 248,320 from its model card; Gated DeltaNet
layers of 16 heads with d_k = d_v = 128 as described publicly; head_dim 256, the conv kernel and
the MLP width are the Qwen3.5 family's values (transformers' Qwen3_5TextConfig defaults).
DeltaNet-1.3B: fla's DeltaNet at 1.3B (fla-hub's delta_net-1.3B: hidden 2048, 24 layers, 16 heads,
d_k = d_v = 128, vocabulary 32,000). Gated DeltaNet "1.3B" here is the same geometry with fla's
Gated DeltaNet layers (16 heads, d_k = d_v = 128), the shape the decode benchmarks time; fla's own
GatedDeltaNetConfig defaults are another 1.3B geometry (6 heads of d_k 256, d_v 512, 21 layers).
"""

from __future__ import annotations

from typing import Any

import torch

from harness.errors import HarnessError
from harness.family_names import LINEAR_FAMILIES, model_types

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.1-8b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=14336,
            vocab_size=128256,
            rope_theta=500000.0,
            max_position_embeddings=131072,
        ),
    ),
    "qwen3.5-0.8b": (
        "qwen3_5_text",
        dict(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=256,
            linear_num_key_heads=16,
            linear_num_value_heads=16,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            linear_conv_kernel_dim=4,
            full_attention_interval=4,
            intermediate_size=3584,
            vocab_size=248320,
            tie_word_embeddings=True,
            max_position_embeddings=262144,
        ),
    ),
    "deltanet-1.3b": (
        "delta_net",
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            num_heads=16,
            expand_k=1.0,
            expand_v=1.0,
            hidden_ratio=4,
            use_short_conv=True,
            conv_size=4,
            vocab_size=32000,
        ),
    ),
    "gated-deltanet-1.3b": (
        "gated_deltanet",
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            num_heads=16,
            head_dim=128,
            expand_v=1.0,
            hidden_ratio=4,
            use_short_conv=True,
            conv_size=4,
            vocab_size=32000,
        ),
    ),
}
FLA_MODEL_TYPES = model_types(LINEAR_FAMILIES)  # known to AutoConfig only once fla.models is imported


def config(name: str):
    from transformers import AutoConfig

    try:
        model_type, values = SHAPES[name]
    except KeyError:
        raise HarnessError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}") from None
    if model_type in FLA_MODEL_TYPES:
        from harness.loader import _register_fla

        _register_fla()
    return AutoConfig.for_model(model_type, **values)


def random_model(name: str, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    """A causal LM with `name`'s architecture and random weights (none at all on "meta")."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config(name), dtype=dtype)
    return model.eval()
