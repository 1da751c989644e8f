"""Softmax-attention family adapter: transformers' Llama and Qwen2 (and their GQA variants).

Nothing is sliced: the weights stay as they are and the selection is realized in attention.
`apply` installs, on every attention module, a `KeyChannelPlan` and switches the model to the
attention function registered here (`harness_kcache`), which
- reads a `PrunedKCache` (middle keys with kept channels only) when one is passed, and
  `generate` gets one by default, so a long context really holds fewer bytes;
- otherwise (no cache, or a plain DynamicCache) computes the dense reference with the dropped
  channels of middle keys masked (`harness.kernels.pruned_attention.masked_attention`).
The same attention function captures post-RoPE queries and keys for calibration. `zero` is the
same realization without the pruned cache: the dense twin for equivalence tests.
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import Callable, Iterable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from harness.families.base import FamilyAdapter, decoder_layers, forward_batches, host, stream_factor
from harness.kcache import KeyChannelPlan, PrunedKCache, PrunedKLayer
from harness.kernels.pruned_attention import masked_attention, pads_from_mask, pruned_cache_attention
from harness.kernels.pruned_decode import pruned_decode_attention
from harness.method import ACTIVATIONS, ATTENTION_PART, LayerData
from harness.registry import build_method
from harness.selection import DEFAULT_RECENT, DEFAULT_SINK, ChannelSelection
from harness.suite import Metric

ATTN_IMPLEMENTATION = "harness_kcache"


def prefill_chooser(selection: ChannelSelection):
    """The `choose_at_prefill(query, keys, pads) -> (B, Hkv, n_keep)` of the method that made a
    query-dependent selection (ThinK), or None for a static selection."""
    spec = selection.meta.get("prefill_chooser")
    if not spec:
        return None
    return functools.partial(
        build_method(spec["method"], spec["params"], seed=0).choose_at_prefill, count=spec["count"]
    )


def _plain_attention(query, key, value, mask, scaling):
    n_rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(n_rep, 1) if n_rep > 1 else key
    v = value.repeat_interleave(n_rep, 1) if n_rep > 1 else value
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        k,
        v,
        attn_mask=mask,
        scale=scaling,
        is_causal=mask is None and query.shape[2] > 1,
    ).transpose(1, 2)


def kcache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function `apply` installs (registered as `harness_kcache`)."""
    scaling = module.scaling if scaling is None else scaling
    capture = getattr(module, "harness_capture", None)
    if capture is not None:
        capture(query, key if torch.is_tensor(key) else None)
    plan: KeyChannelPlan | None = getattr(module, "key_plan", None)
    if plan is None:
        return _plain_attention(query, key, value, attention_mask, scaling), None
    if isinstance(key, PrunedKLayer):
        layer = key
        first = layer.pads is None
        if first:
            pads = pads_from_mask(attention_mask, query.shape[0], layer.get_seq_length())
            layer.start(pads, None if plan.kept is not None else plan.chooser(query, layer.win_k, pads))
        if first and plan.full_prefill:
            out = _plain_attention(query, layer.win_k, layer.win_v, attention_mask, scaling)
        elif query.shape[2] == 1 and query.is_cuda:  # a decode step: the Triton kernel streams the middle once
            out = pruned_decode_attention(query, layer, attention_mask, scaling=scaling)
        else:
            out = pruned_cache_attention(query, layer, attention_mask, scaling=scaling)
        layer.compact()
        return out, None
    # dense reference: full K/V (no cache, or a DynamicCache)
    total, length = key.shape[2], query.shape[2]
    pads = pads_from_mask(attention_mask, query.shape[0], total)
    scale = getattr(module, "key_scale_override", None)  # LeanK's trainable alpha
    if scale is None and plan.kept is not None:
        scale = module.key_channel_mask  # built once by `apply`
    elif scale is None:  # chosen at prefill: a new prefill (no past) chooses, decode steps reuse it
        if total == length or getattr(module, "_prefill_choice", None) is None:
            kept = plan.chooser(query, key, pads)
            module._prefill_choice = torch.zeros(*kept.shape[:2], plan.head_dim, device=key.device).scatter_(
                -1, kept, 1.0
            )
        scale = module._prefill_choice
    full_queries = getattr(module, "full_queries", 0)
    if plan.full_prefill and total == length:
        full_queries = total
    out = masked_attention(
        query,
        key,
        value,
        attention_mask,
        key_scale=scale,
        sink=plan.sink,
        recent=plan.recent,
        scaling=scaling,
        pads=pads,
        full_queries=full_queries,
    )
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, kcache_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)  # always a materialized 4D mask


def _generate_with_pruned_cache(self, *args, **kwargs):
    """`generate` of a model realized with a pruned K cache: supplies a PrunedKCache unless the
    caller passes a cache or disables caching."""
    if kwargs.get("past_key_values") is None and kwargs.get("use_cache", True) and self.harness_pruned_cache:
        modules = attention_modules(self)
        kwargs["past_key_values"] = PrunedKCache(
            [m.key_plan for m in modules], [m.layer_idx for m in modules], len(decoder_layers(self))
        )
    return type(self).generate(self, *args, **kwargs)


@contextlib.contextmanager
def attention_implementation(model, name: str):
    """Context: the model's attention runs through the registered implementation `name` (the
    previous one restored after)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention_modules(model) -> list[torch.nn.Module]:
    """The softmax-attention modules, in layer order (in a hybrid model: only its attention layers)."""
    return [b.self_attn for b in decoder_layers(model) if getattr(b, "self_attn", None) is not None]


class SoftmaxAdapter(FamilyAdapter):
    family = "llama"
    kind = "softmax"
    model_types = ("llama",)

    @classmethod
    def matches(cls, model) -> bool:
        return getattr(getattr(model, "config", None), "model_type", None) in cls.model_types

    def geometry(self, model) -> dict[int, tuple[int, int, int]]:
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return {i: (c.num_key_value_heads, head_dim, head_dim) for i in range(len(attention_modules(model)))}

    # --- calibration -----------------------------------------------------------------------
    def capture(
        self, model, batches: Iterable[torch.Tensor], needs: frozenset[str], advance: Callable[[], None] | None = None
    ) -> list[LayerData]:
        """Post-RoPE queries and keys, streamed per KV head into Gram-exact factors; a KV head's
        queries are the rows of all query heads that share it (GQA)."""
        store: dict[tuple[int, str], torch.Tensor] = {}
        modules = attention_modules(model)

        def hook(query, key, i):
            hkv, d = key.shape[1], key.shape[3]
            rows = {"q": query.detach().reshape(query.shape[0], hkv, -1, d), "k": key.detach()}  # (B, Hkv, n, d)
            for name, x in rows.items():
                x = x.transpose(0, 1).reshape(hkv, -1, d).double().cpu()
                store[(i, name)] = stream_factor(store.get((i, name)), x)

        if ACTIVATIONS in needs:
            with self.realized(model):
                for i, m in enumerate(modules):
                    m.harness_capture = functools.partial(hook, i=i)
                try:
                    forward_batches(model, batches, advance)
                finally:
                    for m in modules:
                        del m.harness_capture
        out = []
        geometry = self.geometry(model)
        for i, m in enumerate(modules):
            hkv, d, dv = geometry[i]
            data = LayerData(
                index=i,
                num_heads=hkv,
                head_dim=d,
                value_dim=dv,
                q_weight=host(m.q_proj.weight),
                k_weight=host(m.k_proj.weight),
            )
            if ACTIVATIONS in needs:
                data.q = store.pop((i, "q")).transpose(0, 1).float()
                data.k = store.pop((i, "k")).transpose(0, 1).float()
            out.append(data)
        return out

    @staticmethod
    def realized(model):
        """Context: the model runs through `harness_kcache` (restores the previous implementation)."""
        return attention_implementation(model, ATTN_IMPLEMENTATION)

    @contextlib.contextmanager
    def key_scaling(self, model, scales: torch.Tensor, *, sink: int, recent: int, full_queries: int = 0):
        """Training-time realization (LeanK): middle keys of layer l multiplied by `scales[l]`
        (KV heads x channels, differentiable); query slots before `full_queries` attend fully."""
        modules = attention_modules(model)
        saved = [(m, getattr(m, "key_plan", None)) for m in modules]
        geometry = self.geometry(model)
        try:
            for i, m in enumerate(modules):
                hkv, d, dv = geometry[i]
                m.key_plan = KeyChannelPlan(
                    hkv, d, dv, tuple(tuple(range(d)) for _ in range(hkv)), sink=sink, recent=recent
                )
                m.key_scale_override, m.full_queries = scales[i], full_queries
            with self.realized(model):
                yield
        finally:
            for m, plan in saved:
                del m.key_scale_override, m.full_queries
                if plan is None:
                    del m.key_plan
                else:
                    m.key_plan = plan

    # --- realization -----------------------------------------------------------------------
    def plans(self, model, selection: ChannelSelection, chooser: Callable | None = None) -> list[KeyChannelPlan]:
        geometry = self.geometry(model)
        if set(selection.layers) != set(geometry):
            raise ValueError(f"selection covers layers {sorted(selection.layers)}, model has {sorted(geometry)}")
        window = selection.meta.get("cache", {})
        plans = []
        for i, (hkv, d, dv) in sorted(geometry.items()):
            sel = selection.layers[i]
            if (sel.num_heads, sel.head_dim) != (hkv, d):
                raise ValueError(f"layer {i}: selection is for {sel.num_heads}x{sel.head_dim}, model has {hkv}x{d}")
            if sel.projection is not None:
                raise ValueError("a projection cannot be realized in a K cache; choose a channel-selecting method")
            plans.append(
                KeyChannelPlan(
                    hkv,
                    d,
                    dv,
                    None if chooser else sel.kept,
                    sink=int(window.get("sink", DEFAULT_SINK)),
                    recent=int(window.get("recent", DEFAULT_RECENT)),
                    value_sum=bool(window.get("value_sum", True)),
                    full_prefill=bool(window.get("full_prefill", False)),
                    chooser=chooser,
                    count=sel.kept_counts[0] if chooser else 0,
                )
            )
        return plans

    def apply(self, model, selection: ChannelSelection, *, pruned_cache: bool = True) -> None:
        chooser = prefill_chooser(selection)
        for module, plan in zip(attention_modules(model), self.plans(model, selection, chooser)):
            module.key_plan = plan
            if plan.kept is not None:
                module.key_channel_mask = plan.key_scale(device=module.k_proj.weight.device)
            elif hasattr(module, "key_channel_mask"):  # chosen per sequence: no static mask to show
                del module.key_channel_mask
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        model.harness_pruned_cache = pruned_cache
        model.generate = types.MethodType(_generate_with_pruned_cache, model)

    def zero(self, model, selection: ChannelSelection) -> None:
        self.apply(model, selection, pruned_cache=False)

    # --- memory -----------------------------------------------------------------------------
    def bytes_metrics(self, model, selection: ChannelSelection, *, context: int = 4096, batch: int = 1) -> list[Metric]:
        """KV bytes a PrunedKCache really allocates for `batch` sequences of `context` tokens
        (filled with zeros: allocation does not depend on the values), vs dense."""
        dtype = next(model.parameters()).dtype
        count = selection.layers[min(selection.layers)].kept_counts[0]

        def first_channels(_query, keys, _pads):  # a per-sequence choice allocates by its count only
            return torch.arange(count).expand(keys.shape[0], keys.shape[1], count)

        chooser = first_channels if prefill_chooser(selection) is not None else None
        plans = self.plans(model, selection, chooser)
        cache = PrunedKCache(plans)
        for layer, plan in zip(cache.layers, plans):
            k = torch.zeros(batch, plan.num_heads, context, plan.head_dim, dtype=dtype)
            v = torch.zeros(batch, plan.num_heads, context, plan.value_dim, dtype=dtype)
            layer.update(k, v)
            layer.start(torch.zeros(batch, dtype=torch.long), chooser(None, k, None) if chooser else None)
            layer.compact()
        used = cache.nbytes()
        elem = torch.finfo(dtype).bits // 8
        dense_k = sum(p.num_heads * p.head_dim for p in plans) * context * batch * elem
        dense_v = sum(p.num_heads * p.value_dim for p in plans) * context * batch * elem
        unit = f"bytes, batch {batch} x {context} tokens, {str(dtype).removeprefix('torch.')}"
        kv, dense = used["keys"] + used["values"], dense_k + dense_v
        return [
            Metric("kept_ratio", selection.kept_ratio, "fraction of key channels (middle tokens)"),
            Metric("kv_bytes_dense", dense, unit),
            Metric("kv_bytes", kv, unit, {"keys": used["keys"], "values": used["values"]}),
            Metric("kv_reduction", 1 - kv / dense, "fraction"),
            Metric("k_reduction", 1 - used["keys"] / dense_k, "fraction"),
            Metric("v_reduction", 1 - used["values"] / dense_v, "fraction"),
        ]


class Qwen2Adapter(SoftmaxAdapter):
    family = "qwen2"
    model_types = ("qwen2",)


class HybridAttentionAdapter(SoftmaxAdapter):
    """The softmax-attention layers of a transformers hybrid model (Qwen3.5, Qwen3-Next,
    OLMo-hybrid): the same K-cache realization, on the layers that have `self_attn`. Layer
    indices are positions among the attention layers; `HybridAdapter` maps them to the model's."""

    family = ATTENTION_PART
    model_types = ()  # never picked on its own: part of `harness.families.hybrid.HybridAdapter`
