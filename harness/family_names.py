"""The family vocabulary, in one place: the transformers model types the harness loads, the
harness family of each, and which families hold which kind of attention.

Methods declare the families they support with these names (`Method.families`); a hybrid model's
parts are seen by methods as `LINEAR_PART` and `ATTENTION_PART`.
"""

from __future__ import annotations

# transformers model_type -> harness family
FAMILY_OF_MODEL_TYPE = {
    "delta_net": "deltanet",
    "gated_deltanet": "gated_deltanet",
    "kda": "kda",  # fla's Kimi Delta Attention (a decay per key channel)
    "llama": "llama",
    "qwen2": "qwen2",
    # hybrids (Gated DeltaNet + attention layers); the multimodal qwen3_5 configs load their text model
    "qwen3_5_text": "qwen3_5",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen3_5_moe": "qwen3_5_moe",
    "qwen3_next": "qwen3_next",
    "olmo_hybrid": "olmo_hybrid",
}

LINEAR_FAMILIES = ("deltanet", "gated_deltanet", "kda")  # a recurrent state of d_k x d_v per head
# a K cache of tokens x d per KV head; "attention": the attention layers of a hybrid model
SOFTMAX_FAMILIES = ("llama", "qwen2", "attention")
# transformers models with both kinds of layer: each kind is compressed by a method of its family
# (the linear layers are Gated DeltaNet, methods see them as "gated_deltanet")
HYBRID_FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next", "olmo_hybrid")
LINEAR_PART, ATTENTION_PART = "gated_deltanet", "attention"  # the families methods see in a hybrid


def model_types(families: tuple[str, ...]) -> tuple[str, ...]:
    """The model types whose family is one of `families`."""
    return tuple(t for t, family in FAMILY_OF_MODEL_TYPE.items() if family in families)
