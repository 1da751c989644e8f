"""state-rank: how much of its recurrent state (linear attention) or of its key space (softmax
attention) each layer and head uses, along the sequence (docs/methods.md section 4; the state-rank
analysis of Nazari & Rusch 2026). Metric definitions: `harness.suites.rank_metrics`.

Linear attention (DeltaNet, Gated DeltaNet, KDA). The model runs on `num_sequences` held-out windows
of `seq_len` tokens while a recorder keeps, per layer, the exact arguments that layer passes to
fla's delta-rule op (`chunk_*` or `fused_recurrent_*`): q, k, v, beta, the gate with its `A_log`
and `dt_bias`, and the flags saying what the kernel itself applies (l2norm, beta sigmoid, gate,
state layout). Each call is then replayed through the token-loop reference
(`harness.kernels.delta_rule.*_recurrent`; KDA: `harness.kernels.kda.fused_recurrent_kda`) in segments of `every` tokens chained through
`initial_state`, so each segment's final state is the state at that position. Why the op call and
not hooks on the short convs with the layer's post-processing recomputed: the recorded arguments
are what the recurrence really consumed, whatever the layer did before (activation, sum-norm,
`beta * 2` for negative eigenvalues, grouped value heads, a pruned `head_k_dim`), so nothing of
fla's forward is duplicated here and nothing can silently drift from it. The recorder replaces the
op's name in the layer's own module only while this suite's forwards run (wrapping whatever is
there, fla's function or the CPU switch's wrapper), calls through unchanged, and restores it.
The Gated DeltaNet layers of transformers' hybrids (Qwen3.5, Qwen3-Next, OLMo-hybrid) call their
modeling module's own `torch_chunk_gated_delta_rule` / `torch_recurrent_gated_delta_rule`: the
same recurrence with q, k, v named query, key, value, the log decay `g` and `beta` already
activated, and each key head serving `Hv / Hk` consecutive value heads; they are recorded and
replayed the same way (the reference repeats q and k per value head as transformers does, so a
head is a value head, its state `d_k x d_v`, `d_k` the pruned `linear_key_head_dim` of a
compressed model).

Softmax attention (Llama, Qwen2). The model runs with an explicit `DynamicCache`; the post-RoPE
keys `(B, kv_heads, T, head_dim)` are read from it. An attention module's `key_channel_mask`
(`(kv_heads, head_dim)`, 0/1: the channels a compressed model keeps for middle tokens) multiplies
the keys first, and a masked head's utilization is relative to its kept channels (the key matrix
its cache holds for middle tokens is `T' x kept`), as a pruned linear head's is to its smaller
`d_k`. Per KV head: the rank metrics of the key matrix of each prefix (`T' x head_dim`), and the
channel-energy spectrum over all tokens. The cache is read at each module's `layer_idx`: in a
hybrid model the other positions hold linear-attention cache layers.

Hybrid models (both kinds of layer): the linear profile of their Gated DeltaNet layers and the
key profile of their attention layers in one run: the linear rows first, then the attention
layers', each set with its own summary rows and plots.

Rows. Per head: `<quantity>/L<layer>H<head>` (`<layer>`: the model's layer index, also in a
hybrid), with `details` = {scope: "head", quantity, layer, head, ...}, so a leaderboard pivots on
`details.quantity` x (layer, head) or splits the name at "/". Quantities: linear `u_final` (rank
utilization of the state after the last token) and `erank_final` (its effective rank); softmax
`key_u`, `key_erank`, `key_energy_channels` (fewest channels holding `energy_fraction` of the key
energy) and, for masked models, `kept_channels`. Summary rows (scope "summary", names ending in
`_mean`) average over layers and heads; the first lists the plots (PNG files in the run's artifact
folder) in `details["plots"]` and the model layer index of each `per_layer` entry in
`details["layers"]`.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.calibration import load_text
from harness.errors import HarnessError
from harness.method import HYBRID_FAMILIES, LINEAR_FAMILIES, SOFTMAX_FAMILIES
from harness.kernels import delta_rule, kda
from harness.suite import Headline, Metric, Suite, SuiteContext
from harness.suites import rank_metrics as rm
from harness.zoo.train import fixed_threads


# fla op a layer calls -> the token-loop reference taking the same arguments (fla_cpu's table)
REPLAY = {
    "chunk_delta_rule": delta_rule.delta_rule_recurrent,
    "fused_recurrent_delta_rule": delta_rule.delta_rule_recurrent,
    "chunk_gated_delta_rule": delta_rule.gated_delta_rule_recurrent,
    "fused_recurrent_gated_delta_rule": delta_rule.gated_delta_rule_recurrent,
    "chunk_kda": kda.fused_recurrent_kda,  # KDA: the decay per key channel
    "fused_recurrent_kda": kda.fused_recurrent_kda,
    # transformers' hybrids: the gated rule with g and beta already activated (the reference's defaults)
    "torch_chunk_gated_delta_rule": delta_rule.gated_delta_rule_recurrent,
    "torch_recurrent_gated_delta_rule": delta_rule.gated_delta_rule_recurrent,
}
FLA_NAMES = {"query": "q", "key": "k", "value": "v"}  # transformers' op argument names -> fla's
PER_TOKEN = ("q", "k", "v", "beta", "g")  # the arguments that run along the sequence (dim 1)


# --------------------------------------------------------------------------------------------
# linear attention: record the delta-rule calls, replay them position by position


@dataclass
class DeltaRuleCall:
    op: str  # a key of REPLAY
    arguments: dict[str, Any]  # by parameter name (**kwargs flattened), tensors detached


def _signature(fn) -> inspect.Signature:
    """The signature of the function `fn` runs, seen through `functools.wraps` layers and
    transformers' hub-kernel wrappers (an nn.Module whose forward takes *args, **kwargs and calls
    a wrapped function it closes over)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    todo, seen = [fn], set()
    while todo:
        f = inspect.unwrap(todo.pop(0))
        if id(f) in seen:
            continue
        seen.add(id(f))
        try:
            signature = inspect.signature(f)
        except (TypeError, ValueError):
            signature = None
        if signature is not None and any(p.kind not in variadic for p in signature.parameters.values()):
            return signature
        for owner in (f, getattr(type(f), "forward", None)):
            todo += [c.cell_contents for c in getattr(owner, "__closure__", None) or () if callable(c.cell_contents)]
    return inspect.signature(fn)


def _named_arguments(fn, args: tuple, kwargs: dict) -> dict[str, Any]:
    bound = _signature(fn).bind(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if bound.signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    # a cache updates its state in place after the call (transformers' does): keep the one passed in
    state = named.get("initial_state")
    if torch.is_tensor(state):
        named["initial_state"] = state.detach().clone()
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in named.items()}


@contextlib.contextmanager
def record_delta_rule_calls(layers: list[tuple[int, torch.nn.Module]]):
    """Context yielding `{layer index: [DeltaRuleCall, ...]}`, filled by forwards run inside it."""
    calls: dict[int, list[DeltaRuleCall]] = {}
    running: list[int] = []  # index of the layer whose forward is on the stack

    def recorder(op: str, fn):
        def record(*args, **kwargs):
            if running:
                calls.setdefault(running[-1], []).append(DeltaRuleCall(op, _named_arguments(fn, args, kwargs)))
            return fn(*args, **kwargs)

        return record

    def enter(index: int):
        def hook(_module, _args):
            running.append(index)

        return hook

    def leave(_module, _args, _output):
        running.pop()

    saved, handles = [], []
    modules = {id(m): m for m in (sys.modules[type(attn).__module__] for _, attn in layers)}
    try:
        for module in modules.values():
            for op in REPLAY:
                fn = vars(module).get(op)
                if fn is not None:
                    saved.append((module, op, fn))
                    setattr(module, op, recorder(op, fn))
        for index, attn in layers:
            handles += [attn.register_forward_pre_hook(enter(index)), attn.register_forward_hook(leave)]
        yield calls
    finally:
        for handle in handles:
            handle.remove()
        for module, op, fn in reversed(saved):
            setattr(module, op, fn)


def replay_states(call: DeltaRuleCall, positions: list[int]) -> torch.Tensor:
    """The recurrent state after each of `positions` tokens, `[P, B, heads, d_k, d_v]` float32."""
    reference = REPLAY[call.op]
    accepted = inspect.signature(reference).parameters
    args = {FLA_NAMES.get(k, k): v for k, v in call.arguments.items()}
    args = {k: v for k, v in args.items() if k in accepted}
    if args.get("cu_seqlens") is not None:
        raise ValueError("a packed (cu_seqlens) call has no per-position states; run unpadded batches")
    v_first = bool(args.get("state_v_first") or call.arguments.get("transpose_state_layout"))
    if "state_v_first" in accepted:
        args["state_v_first"] = v_first
    state = args.pop("initial_state", None)
    args["output_final_state"] = True
    tokens = {name: args.pop(name).float() for name in PER_TOKEN if torch.is_tensor(args.get(name))}
    states, start = [], 0
    for end in positions:
        _, state = reference(**{n: x[:, start:end] for n, x in tokens.items()}, **args, initial_state=state)
        states.append(state.transpose(-1, -2) if v_first else state)
        start = end
    return torch.stack(states).float()


def positions_for(seq_len: int, every: int) -> list[int]:
    """Token counts after which states are measured: every `every` tokens, and the last one."""
    out = list(range(every, seq_len + 1, every))
    return out if out and out[-1] == seq_len else [*out, seq_len]


@dataclass
class RankProfile:
    """Per layer, position and head, averaged over sequences (tensors are `[L, P, H]`)."""

    kind: str  # "state" (linear attention) or "key" (softmax)
    positions: list[int]
    utilization: torch.Tensor
    stable_rank: torch.Tensor
    effective_rank: torch.Tensor
    dims: list[tuple[int, int]]  # per layer: the measured matrix at the last position is d x d'
    capacity: torch.Tensor  # [L, H] the most rank a head can have at the last position: min(d, d')
    layers: list[int]  # the model's layer index of each profiled layer (a hybrid profiles some of them)


def _rank_stats(singular: torch.Tensor, capacity: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(utilization, stable rank, effective rank); a head with no capacity (0 kept channels) has u 0."""
    sr = rm.stable_rank_from_singular_values(singular)
    u = torch.where(capacity > 0, sr / capacity.clamp_min(1), torch.zeros_like(sr))
    return u, sr, rm.effective_rank_from_singular_values(singular)


def _profile(
    kind: str,
    positions: list[int],
    per_layer: list[list[tuple[torch.Tensor, ...]]],
    dims: list[tuple[int, int]],
    capacity: torch.Tensor,
    layers: list[int],
) -> RankProfile:
    # per_layer[l] = one (u, sr, erank) triple of [P, B, H] per batch -> mean over all sequences
    means = [[torch.cat([b[j] for b in batches], 1).mean(1) for j in range(3)] for batches in per_layer]
    u, sr, er = (torch.stack([m[j] for m in means]).float() for j in range(3))
    return RankProfile(kind, positions, u, sr, er, dims, capacity.float().cpu(), list(layers))


def linear_profile(
    model, layers, batches: list[torch.Tensor], positions: list[int], advance, replay_threads: int | None = None
) -> RankProfile:
    per_layer: list[list] = [[] for _ in layers]
    dims: list[tuple[int, int]] = [(0, 0)] * len(layers)
    device = next(model.parameters()).device
    for input_ids in batches:
        with record_delta_rule_calls(layers) as calls:
            model(input_ids=input_ids.to(device), use_cache=False)
        for slot, (index, _attn) in enumerate(layers):
            made = calls.get(index, [])
            if len(made) != 1:
                raise RuntimeError(
                    f"layer {index} made {len(made)} delta-rule calls, expected 1 of "
                    f"{', '.join(REPLAY)} (did fla change its layer forward?)"
                )
            # the token loop is thousands of tiny ops: extra CPU threads only add hand-off cost
            with fixed_threads(replay_threads if device.type == "cpu" else None):
                states = replay_states(made[0], positions)  # [P, B, H, K, V]
            dims[slot], heads = tuple(states.shape[-2:]), states.shape[2]
            per_layer[slot].append(_rank_stats(rm.singular_values(states), torch.tensor(float(min(dims[slot])))))
        advance()
    capacity = torch.tensor([float(min(d)) for d in dims])[:, None].expand(-1, heads)
    return _profile("state", positions, per_layer, dims, capacity, [index for index, _ in layers])


# --------------------------------------------------------------------------------------------
# softmax attention: post-RoPE keys from the cache


@dataclass
class KeySpectra:
    energy: torch.Tensor  # [L, H, d] sorted normalized channel-energy spectrum
    kept: torch.Tensor | None  # [L, H] kept channel counts (masked models only)


def softmax_profile(
    model, batches: list[torch.Tensor], positions: list[int], advance
) -> tuple[RankProfile, KeySpectra]:
    from transformers import DynamicCache

    from harness.families.hf_softmax import attention_modules

    modules = attention_modules(model)
    masks = [getattr(m, "key_channel_mask", None) for m in modules]
    per_layer: list[list] = [[] for _ in modules]
    energy: list[torch.Tensor | float] = [0.0] * len(modules)
    dims: list[tuple[int, int]] = [(0, 0)] * len(modules)
    capacity: list[torch.Tensor] = [torch.zeros(0)] * len(modules)
    device = next(model.parameters()).device
    for input_ids in batches:
        # explicit: a compressed model's own default cache may not be a DynamicCache
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids.to(device), past_key_values=cache, use_cache=True)
        for i, (module, mask) in enumerate(zip(modules, masks)):
            # at the model's layer index: a hybrid's cache holds linear-attention layers at the others
            keys = cache.layers[module.layer_idx].keys.double()  # (B, kv_heads, T, head_dim), post-RoPE
            if mask is not None:
                keys = keys * mask.to(keys)[None, :, None, :]
            # prefix Grams are running sums of segment Grams: one eigvalsh for all positions
            segments = [keys[:, :, a:b] for a, b in zip([0, *positions[:-1]], positions)]
            grams = torch.stack([x.transpose(-1, -2) @ x for x in segments]).cumsum(0)  # [P, B, H, d, d]
            # a masked head's keys span at most its kept channels: utilization is relative to those
            width = (mask != 0).sum(-1) if mask is not None else torch.full((keys.shape[1],), keys.shape[-1])
            capacity[i] = torch.minimum(torch.tensor(positions)[:, None], width.cpu()[None, :])  # [P, H]
            stats = _rank_stats(rm.singular_values_from_gram(grams), capacity[i][:, None, :].to(keys))
            per_layer[i].append(stats)
            energy[i] = energy[i] + keys.pow(2).sum((0, 2)).cpu()
            dims[i] = (keys.shape[2], keys.shape[3])
        advance()
    kept = torch.stack([(m != 0).sum(-1).float().cpu() for m in masks]) if all(m is not None for m in masks) else None
    spectra = KeySpectra(torch.stack([rm.normalized_spectrum(e) for e in energy]).float(), kept)
    profile = _profile(
        "key", positions, per_layer, dims, torch.stack([c[-1] for c in capacity]), [m.layer_idx for m in modules]
    )
    return profile, spectra


# --------------------------------------------------------------------------------------------
# plots (matplotlib's object API on an Agg canvas: no pyplot state, no display needed)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_profile(profile: RankProfile, folder: Path) -> list[str]:
    what = "recurrent state" if profile.kind == "state" else "key matrix (prefix)"
    folder.mkdir(parents=True, exist_ok=True)
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for layer, u in zip(profile.layers, profile.utilization):  # u: [P, H]
        (line,) = ax.plot(profile.positions, u.mean(-1), marker=".", label=f"layer {layer}")
        ax.fill_between(profile.positions, u.amin(-1), u.amax(-1), color=line.get_color(), alpha=0.15)
    ax.set(
        xlabel="tokens seen",
        ylabel="rank utilization sr / min(d, d')",
        ylim=(0, None),
        title=f"{what}: utilization vs position (line: head mean, band: min-max)",
    )
    ax.legend(fontsize=7, ncol=1 + len(profile.utilization) // 9)
    position_png = f"{profile.kind}_utilization_vs_position.png"
    fig.savefig(folder / position_png)

    fig = _figure(10.0, 0.6 * profile.utilization.shape[0] + 2.2)
    final = {"utilization": profile.utilization[:, -1], "effective rank": profile.effective_rank[:, -1]}
    for n, (label, grid) in enumerate(final.items()):
        ax = fig.add_subplot(1, 2, n + 1)
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set(
            xlabel="head",
            ylabel="layer",
            title=f"{label} at token {profile.positions[-1]}",
            xticks=range(grid.shape[1]),
            yticks=range(grid.shape[0]),
            yticklabels=profile.layers,
        )
        fig.colorbar(image, ax=ax)
        if grid.numel() <= 256:
            middle = (grid.min() + grid.max()).item() / 2  # dark text on the bright half of viridis
            for layer, row in enumerate(grid.tolist()):
                for head, value in enumerate(row):
                    ax.text(
                        head,
                        layer,
                        f"{value:.2g}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="k" if value > middle else "w",
                    )
    fig.suptitle(what)
    fig.tight_layout()
    heatmap_png = f"{profile.kind}_rank_heatmap.png"
    fig.savefig(folder / heatmap_png)
    return [position_png, heatmap_png]


def plot_spectra(spectra: KeySpectra, folder: Path, layers: list[int] | None = None) -> list[str]:
    fig = _figure(6.5, 4.0)
    ax = fig.add_subplot()
    for layer, spectrum in zip(layers or range(len(spectra.energy)), spectra.energy):  # [H, d]
        ax.plot(range(1, spectrum.shape[-1] + 1), spectrum.mean(0), marker=".", label=f"layer {layer}")
    ax.set(
        yscale="log",
        xlabel="channel (sorted by energy)",
        ylabel="share of key energy (head mean)",
        title="key channel-energy spectrum",
    )
    ax.legend(fontsize=7, ncol=1 + len(spectra.energy) // 9)
    name = "key_energy_spectrum.png"
    fig.savefig(folder / name)
    return [name]


# --------------------------------------------------------------------------------------------
# the suite


@dataclass
class StateRankSuite(Suite):
    name = "state-rank"
    families = LINEAR_FAMILIES + SOFTMAX_FAMILIES + HYBRID_FAMILIES
    description = "rank utilization / effective rank of each head's state (linear) or keys (softmax); hybrids: both"
    headlines = (
        Headline("u_final_mean", "state rank use", "", "fraction"),
        Headline("key_u_mean", "key rank use", "", "fraction"),
    )

    num_sequences: int = 8  # held-out windows analysed (the quick-run limit)
    seq_len: int = 256
    every: int = 16  # measure after every this many tokens (and after the last)
    batch_size: int = 4
    energy_fraction: float = 0.9  # softmax: key_energy_channels = fewest channels with this share
    per_head: bool = True  # rows per layer/head (summary rows always)
    plots: bool = True
    replay_threads: int = 1  # torch CPU threads for the token-loop replay (0: leave torch's setting)
    text_file: str | None = None

    def validate(self) -> None:
        if self.num_sequences < 1 or self.batch_size < 1:
            raise ValueError("num_sequences and batch_size must be >= 1")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 1 <= self.every <= self.seq_len:
            raise ValueError(f"need 1 <= every <= seq_len, got every={self.every}, seq_len={self.seq_len}")
        if self.replay_threads < 0:
            raise ValueError(f"replay_threads must be >= 0, got {self.replay_threads}")
        if not 0.0 < self.energy_fraction <= 1.0:
            raise ValueError(f"energy_fraction must be in (0, 1], got {self.energy_fraction}")

    def sequences(self, tokenizer, seed: int) -> torch.Tensor:
        """`num_sequences` distinct held-out windows, drawn with `seed`: `[n, seq_len]`."""
        ids = tokenizer(load_text(self.text_file, split="heldout"), add_special_tokens=False)["input_ids"]
        windows = len(ids) // self.seq_len
        if windows < self.num_sequences:
            raise HarnessError(
                f"the text holds {windows} windows of {self.seq_len} tokens; "
                f"lower num_sequences ({self.num_sequences}) or seq_len"
            )
        picks = torch.randperm(windows, generator=torch.Generator().manual_seed(seed))[: self.num_sequences]
        return torch.tensor(ids[: windows * self.seq_len]).view(windows, self.seq_len)[picks.sort().values]

    @torch.no_grad()
    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        from harness.families import adapter_for
        from harness.families.hf_softmax import attention_modules

        if ctx.family not in self.families:
            raise HarnessError(f"state-rank supports {', '.join(self.families)} models, not {ctx.family}")
        hybrid = ctx.family in HYBRID_FAMILIES
        # a hybrid model: both its Gated DeltaNet layers and its attention layers (if it has them)
        linear_layers = adapter_for(model, "linear").layers(model) if hybrid or ctx.family in LINEAR_FAMILIES else []
        linear = ctx.family in LINEAR_FAMILIES or bool(linear_layers)
        softmax = ctx.family in SOFTMAX_FAMILIES or (hybrid and bool(attention_modules(model)))
        tokens = self.sequences(tokenizer, ctx.seed)
        batches = list(tokens.split(self.batch_size))
        positions = positions_for(self.seq_len, self.every)
        advance = ctx.progress("state-rank", len(batches) * (linear + softmax))
        profiles: list[tuple[RankProfile, KeySpectra | None]] = []
        if linear:
            profiles.append(
                (linear_profile(model, linear_layers, batches, positions, advance, self.replay_threads or None), None)
            )
        if softmax:
            profiles.append(softmax_profile(model, batches, positions, advance))
        rows: list[Metric] = []
        for profile, spectra in profiles:  # linear rows first, then the attention layers'
            plots = []
            if self.plots:
                plots = plot_profile(profile, ctx.artifacts)
                if spectra is not None:
                    plots += plot_spectra(spectra, ctx.artifacts, profile.layers)
            rows += self.rows(profile, spectra, plots)
        return rows

    def rows(self, profile: RankProfile, spectra: KeySpectra | None, plots: list[str]) -> list[Metric]:
        state = profile.kind == "state"
        u_name, er_name = ("u_final", "erank_final") if state else ("key_u", "key_erank")
        u, sr, er = profile.utilization[:, -1], profile.stable_rank[:, -1], profile.effective_rank[:, -1]  # [L, H]
        dim_keys = ("d_k", "d_v") if state else ("tokens", "head_dim")
        needed = rm.channels_for_energy(spectra.energy, self.energy_fraction).float() if spectra else None
        rows: list[Metric] = []
        if self.per_head:
            for layer, head in itertools.product(range(u.shape[0]), range(u.shape[1])):
                index = profile.layers[layer]  # the model's layer index (a hybrid profiles some layers)
                where = {
                    "scope": "head",
                    "layer": index,
                    "head": head,
                    **dict(zip(dim_keys, profile.dims[layer])),
                    "capacity": profile.capacity[layer, head].item(),
                }
                rows.append(
                    Metric(
                        f"{u_name}/L{index}H{head}",
                        u[layer, head].item(),
                        "fraction",
                        {
                            **where,
                            "quantity": u_name,
                            "stable_rank": sr[layer, head].item(),
                            "u_mean_over_positions": profile.utilization[layer, :, head].mean().item(),
                        },
                    )
                )
                rows.append(
                    Metric(f"{er_name}/L{index}H{head}", er[layer, head].item(), "dims", {**where, "quantity": er_name})
                )
                if spectra is not None:
                    spectrum = [round(x, 6) for x in spectra.energy[layer, head].tolist()]
                    rows.append(
                        Metric(
                            f"key_energy_channels/L{index}H{head}",
                            needed[layer, head].item(),
                            "channels",
                            {
                                **where,
                                "quantity": "key_energy_channels",
                                "fraction": self.energy_fraction,
                                "spectrum": spectrum,
                            },
                        )
                    )
                    if spectra.kept is not None:
                        rows.append(
                            Metric(
                                f"kept_channels/L{index}H{head}",
                                spectra.kept[layer, head].item(),
                                "channels",
                                {**where, "quantity": "kept_channels"},
                            )
                        )
        summary = {"scope": "summary", "sequences": self.num_sequences, "seq_len": self.seq_len}
        curve = profile.utilization.mean((0, 2))
        rows += [
            Metric(
                f"{u_name}_mean",
                u.mean().item(),
                "fraction",
                {
                    **summary,
                    "plots": plots,
                    "min": u.min().item(),
                    "max": u.max().item(),
                    "per_layer": [round(x, 6) for x in u.mean(1).tolist()],
                    "positions": profile.positions,
                    "utilization_vs_position": [round(x, 6) for x in curve.tolist()],
                    "dims": [list(d) for d in profile.dims],
                    "layers": profile.layers,
                },
            ),
            Metric(
                f"{u_name}_position_mean",
                curve.mean().item(),
                "fraction",
                {**summary, "note": "mean over recorded positions, layers and heads"},
            ),
            Metric(f"{er_name}_mean", er.mean().item(), "dims", summary),
            Metric(
                f"{er_name}_ratio_mean",
                (er / profile.capacity.clamp_min(1)).mean().item(),
                "fraction",
                {**summary, "note": "effective rank / min(d, d') (masked keys: d = kept channels)"},
            ),
            Metric(f"{'sr_final' if state else 'key_sr'}_mean", sr.mean().item(), "dims", summary),
        ]
        if spectra is not None:
            rows.append(
                Metric(
                    "key_energy_channels_mean",
                    needed.mean().item(),
                    "channels",
                    {**summary, "fraction": self.energy_fraction},
                )
            )
            if spectra.kept is not None:
                rows.append(Metric("kept_channels_mean", spectra.kept.mean().item(), "channels", summary))
        return rows
