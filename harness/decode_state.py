"""What a model keeps between decode steps, allocated once for (batch, capacity), per family: the
state the static decode loop (`harness.graph_decode`) prefills and then steps.

Both kinds give the loop the same interface: `prefill_rows` (a forward over some rows' prompts,
of one length, writing them into the state; their last logits), `step` (one token a row, the
state updated in place; the logits), `context` (what the model must run inside), `reset`, and
their bytes. A step reads and writes only tensors allocated here, so a CUDA graph replays it.

- `SoftmaxState`: Llama and Qwen2 (plain, or realized with a channel selection): the static
  pruned K cache (`harness.static_kcache`; a plain model gets its dense twin). The decoder
  layers run one by one with the cache as their cache; positions are the rows' lengths.
- `HybridState`: transformers' Gated DeltaNet hybrids (Qwen3.5 and its MoE, Qwen3-Next,
  OLMo-hybrid: Gated DeltaNet layers and attention layers):
  the attention layers' static pruned K cache (the same one) and the linear layers' conv and
  recurrent states, transformers' own linear-attention cache layers allocated once for the batch
  (they copy every update into place); each row's prompt is prefilled into fresh ones and copied in.
  A decode step runs the linear layers' conv and delta-rule steps on our kernels, in place
  (`harness.families.hf_linear.decode_ops`), where transformers would run its torch conv update
  and fla's or its own recurrent op, and every RMSNorm as one launch (`fused_norms`).
  A mixture-of-experts MLP steps through transformers' `batched_mm` experts (each token gathers
  its experts' weights: fixed shapes), since the default routing reads on the host which experts
  were hit, which a replayed step cannot do; prefill keeps the model's own.
- `RecurrentState`: fla DeltaNet and Gated DeltaNet (dense or with a sliced d_k): the model's own
  fla Cache, whose short-convolution and recurrent states are allocated for the whole batch once
  and overwritten row by row by each prefill. A decode step is the model's own forward over one
  token a row with no mask: the convolution's decode step and the delta-rule decode step
  (`harness.kernels.fla_decode`, ours on CUDA) both update the state in place. Linear attention
  has no positions, so rows of different lengths need no padding: each row's prompt is
  prefilled on its own (rows of one length together) and its final state copied into its row.
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from harness.family_names import LINEAR_FAMILIES, SOFTMAX_FAMILIES, model_types
from harness.kcache import KeyChannelPlan
from harness.static_kcache import ATTN_IMPLEMENTATION, StaticKCache, all_channels

SOFTMAX_MODEL_TYPES = model_types(SOFTMAX_FAMILIES)
# not KDA: its decode step is fla's, which returns a new state tensor (no in-place step of ours)
RECURRENT_MODEL_TYPES = model_types(tuple(f for f in LINEAR_FAMILIES if f != "kda"))
# Gated DeltaNet layers + attention layers (transformers); the MoE ones step with graph-safe experts
HYBRID_MODEL_TYPES = ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next", "olmo_hybrid")
GRAPH_SAFE_EXPERTS = "batched_mm"  # transformers' experts forward with no host-read routing (fixed shapes)
DENSE_WINDOW = (16, 64)  # sink, recent of a plain model's dense twin (any window gives the same attention)


def reason(model) -> str | None:
    """Why the static decode loop does not apply to `model` (None when it does)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in RECURRENT_MODEL_TYPES:
        from harness.kernels import fla_decode

        if next(model.parameters()).is_cuda and fla_decode.decode_backend() == "fla":
            return (
                f"{fla_decode.ENV}=fla: fla's decode step returns a new state tensor at every step, which a "
                "replayed step cannot follow (ours updates it in place)"
            )
        return None
    if model_type not in SOFTMAX_MODEL_TYPES + HYBRID_MODEL_TYPES:
        return (
            f"model type {model_type!r} (the static decode loop covers "
            f"{', '.join(SOFTMAX_MODEL_TYPES + RECURRENT_MODEL_TYPES + HYBRID_MODEL_TYPES)})"
        )
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in (
        getattr(config, "layer_types", None) or ()
    ):
        return "sliding-window attention layers"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "dynamic" in str(rope.get("rope_type", "")) or rope.get("rope_type") == "longrope":
        return f"rope type {rope.get('rope_type')!r} recomputes frequencies on the host"
    if any(getattr(m, "key_scale_override", None) is not None for m in _attention_modules(model)):
        return "a trainable key scale is installed (LeanK training)"
    return None


def state_for(model, batch: int, capacity: int):
    """The decode state of `model` for `batch` rows of up to `capacity` tokens."""
    why = reason(model)
    if why is not None:
        raise ValueError(f"the static decode loop does not apply: {why}")
    model_type = model.config.model_type
    kind = (
        RecurrentState
        if model_type in RECURRENT_MODEL_TYPES
        else HybridState
        if model_type in HYBRID_MODEL_TYPES
        else SoftmaxState
    )
    return kind(model, batch, capacity)


def _attention_modules(model):
    from harness.families.hf_softmax import attention_modules

    return attention_modules(model)


def plans(model) -> dict[int, KeyChannelPlan]:
    """Each attention layer's plan by its layer index: the installed one (a realized selection) or,
    for a plain model, the dense twin (every channel kept)."""
    config = model.config
    out = {}
    for module in _attention_modules(model):
        plan = getattr(module, "key_plan", None)
        if plan is None:
            hkv = config.num_key_value_heads
            d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            plan = all_channels(KeyChannelPlan(hkv, d, d, None, sink=DENSE_WINDOW[0], recent=DENSE_WINDOW[1]))
        out[module.layer_idx] = plan
    return out


class SoftmaxState:
    """Llama / Qwen2: the static pruned K cache, the decoder layers run one by one over it."""

    def __init__(self, model, batch: int, capacity: int):
        param = next(model.parameters())
        self.model, self.device = model, param.device
        self.cache = self._make_cache(batch, capacity, param.dtype)
        layer = model.model.layers[0]
        self.cache_kw = "cache" if "cache" in inspect.signature(layer.forward).parameters else "past_key_values"

    def _make_cache(self, batch: int, capacity: int, dtype):
        return StaticKCache(plans(self.model), batch, capacity, dtype, self.device)

    def context(self):
        from harness.families.hf_softmax import attention_implementation

        return attention_implementation(self.model, ATTN_IMPLEMENTATION)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits of each row's last position; ids, positions (n, L)."""
        inner = self.model.model
        hidden = inner.embed_tokens(ids)
        embeddings = inner.rotary_emb(hidden, positions)
        for layer in inner.layers:
            hidden = layer(
                hidden,
                attention_mask=None,
                position_ids=positions,
                position_embeddings=embeddings,
                **{self.cache_kw: self.cache},
            )
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.model.lm_head(inner.norm(hidden[:, -1:]))[:, -1]

    def prefill_rows(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        positions = torch.arange(length, device=self.device)[None, :].expand(len(rows), -1)
        with self.context(), self.cache.prefilling(rows):
            logits = self._forward(ids, positions).float()
        self.cache.set_lengths(rows, length)
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self._forward(ids, self.cache.lengths[:, None].long())
        self.cache.advance()
        return logits

    def reset(self) -> None:
        self.cache.reset()

    def set_lengths(self, rows: list[int], length: int) -> None:
        self.cache.set_lengths(rows, length)

    def nbytes(self) -> dict[str, int]:
        return self.cache.nbytes()

    def read_bytes(self, length: int) -> int:
        """Bytes a decode step reads from the cache at `length` tokens a row."""
        return self.cache.read_bytes(length)


class HybridCache(StaticKCache):
    """The attention layers' static pruned K cache, and the linear layers' states: transformers'
    `LinearAttentionLayer`s holding the whole batch (the methods a Gated DeltaNet layer calls on
    its cache are here). While `prefilling(rows)`, the linear layers get fresh layers for those
    rows, whose final states are then copied into the batch's."""

    def __init__(self, plans, linear_ids: list[int], batch: int, capacity: int, dtype, device):
        from transformers.cache_utils import LinearAttentionLayer

        super().__init__(plans, batch, capacity, dtype, device)
        self._new_layer = LinearAttentionLayer
        self.linear = {i: LinearAttentionLayer() for i in linear_ids}
        self._prefill_linear: dict | None = None

    def _layer(self, layer_idx: int):
        return (self._prefill_linear if self._prefill_linear is not None else self.linear)[layer_idx]

    def get_conv_state(self, layer_idx: int, state_idx: int = 0):
        layer = self._layer(layer_idx)
        return layer.conv_states[state_idx] if layer.has_previous_state[state_idx] else None

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0):
        layer = self._layer(layer_idx)
        return layer.recurrent_states[state_idx] if layer.has_previous_state[state_idx] else None

    def update_conv_state(self, conv_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._layer(layer_idx).update_conv_state(conv_states, state_idx, **kwargs)

    def update_recurrent_state(self, recurrent_states, layer_idx: int, state_idx: int = 0, **kwargs):
        return self._layer(layer_idx).update_recurrent_state(recurrent_states, state_idx, **kwargs)  # a copy, in place

    def is_recording_past(self, layer_idx: int) -> bool:
        return False

    def linear_states(self, layer) -> list[torch.Tensor]:
        return [t for t in (*layer.conv_states.values(), *layer.recurrent_states.values()) if torch.is_tensor(t)]

    @contextlib.contextmanager
    def prefilling(self, rows: list[int]):
        fresh = {i: self._new_layer() for i in self.linear}
        self._prefill_linear = fresh
        try:
            with super().prefilling(rows):
                yield
        finally:
            self._prefill_linear = None
        index = torch.tensor(rows, device=self.lengths.device)
        for i, layer in self.linear.items():
            if not layer.has_previous_state[0]:  # the first prefill allocates the batch's states
                for name in ("conv_states", "recurrent_states"):
                    src = getattr(fresh[i], name)[0]
                    getattr(layer, name)[0] = src.new_zeros(self.batch, *src.shape[1:])
                layer.conv_kernel_size, layer.has_previous_state[0] = fresh[i].conv_kernel_size, True
                layer.is_conv_states_initialized[0] = layer.is_recurrent_states_initialized[0] = True
            for dst, src in zip(self.linear_states(layer), self.linear_states(fresh[i])):
                dst.index_copy_(0, index, src.to(dst.dtype))

    def reset(self) -> None:
        super().reset()
        for layer in self.linear.values():
            for t in self.linear_states(layer):
                t.zero_()

    def nbytes(self) -> dict[str, int]:
        state = sum(t.numel() * t.element_size() for layer in self.linear.values() for t in self.linear_states(layer))
        return {**super().nbytes(), "state": state}

    def read_bytes(self, length: int) -> int:
        """Attention layers' cache read at `length`, linear layers' states read and written."""
        return super().read_bytes(length) + 2 * self.nbytes()["state"]


class HybridState(SoftmaxState):
    """transformers' Gated DeltaNet hybrids: `HybridCache` under the model's own layer stack. Its
    inner model runs with no masks (a dict of None per layer type: no mask is built) and the rows'
    positions."""

    def __init__(self, model, batch: int, capacity: int):
        super().__init__(model, batch, capacity)
        with torch.no_grad():  # one token a row gives the linear layers' states their shapes for this batch
            self.prefill_rows(list(range(batch)), torch.zeros(batch, 1, dtype=torch.long, device=self.device))
        self.reset()

    def _make_cache(self, batch: int, capacity: int, dtype):
        from harness.families.hf_linear import gdn_layers

        linear_ids = [i for i, _ in gdn_layers(self.model)]
        return HybridCache(plans(self.model), linear_ids, batch, capacity, dtype, self.device)

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        from harness.families.hf_linear import decode_ops, gdn_layers

        with decode_ops(gdn_layers(self.model)), fused_norms(self.model), self._graph_safe_experts():
            return super().step(ids)

    @contextlib.contextmanager
    def _graph_safe_experts(self):
        config = self.model.config
        if getattr(config, "num_experts", None) is None:
            yield
            return
        saved = config._experts_implementation
        config._experts_implementation = GRAPH_SAFE_EXPERTS
        try:
            yield
        finally:
            config._experts_implementation = saved

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model.model(
            input_ids=ids,
            attention_mask={"full_attention": None, "linear_attention": None},
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
        )
        return self.model.lm_head(out.last_hidden_state[:, -1:])[:, -1]


@contextlib.contextmanager
def fused_norms(model):
    """While active, every RMSNorm module of `model` that `harness.kernels.hf_rms_norm` knows runs
    as one launch (instead of about nine torch ops), with its own rounding."""
    from harness.kernels.hf_rms_norm import fused_forward

    swapped = []
    for module in model.modules():
        forward = fused_forward(module)
        if forward is not None:
            module.forward = forward  # an instance attribute: nn.Module.__call__ looks it up first
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def _tensors(state) -> list[torch.Tensor]:
    """The tensors of one fla cache layer's state (a dict of tensors and tuples of tensors), in order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state) for t in _tensors(state[key])]
    if isinstance(state, (tuple, list)):
        return [t for item in state for t in _tensors(item)]
    return []


def _cache_of(output):
    return getattr(output, "past_key_values", None) or getattr(output, "cache", None)


class RecurrentState:
    """fla DeltaNet / Gated DeltaNet: the model's fla Cache for the whole batch, written in place."""

    def __init__(self, model, batch: int, capacity: int):
        self.model = model
        self.device = next(model.parameters()).device
        with torch.no_grad():  # one token a row gives every state its shape for this batch
            out = model(torch.zeros(batch, 1, dtype=torch.long, device=self.device), use_cache=True, logits_to_keep=1)
        self.cache = _cache_of(out)
        self.layers = [_tensors(layer.state) for layer in self.cache.layers]
        self.reset()

    def context(self):
        return contextlib.nullcontext()

    def prefill_rows(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        index = torch.tensor(rows, device=self.device)
        for mine, theirs in zip(self.layers, (_tensors(layer.state) for layer in _cache_of(out).layers)):
            if len(mine) != len(theirs):
                raise RuntimeError("the prefill's cache holds other states than the batch's")
            for dst, src in zip(mine, theirs):
                dst.index_copy_(0, index, src.to(dst.dtype))
        return out.logits[:, -1].float()

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def reset(self) -> None:
        for tensors in self.layers:
            for t in tensors:
                t.zero_()

    def set_lengths(self, rows: list[int], length: int) -> None:
        """Nothing to do: a recurrent state does not grow with the rows' lengths."""

    def nbytes(self) -> dict[str, int]:
        size = sum(t.numel() * t.element_size() for tensors in self.layers for t in tensors)
        return {"state": size}

    def read_bytes(self, length: int) -> int:
        """Bytes a decode step moves through the state: all of it read and written, whatever the length."""
        return 2 * self.nbytes()["state"]
