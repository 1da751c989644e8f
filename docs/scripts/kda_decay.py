"""Does KDA's per-channel decay matter for which key channels to keep? (docs/results.md, KDA)

On a KDA model (default: the zoo's kda-tiny), with the harness's default calibration (16 windows
of 256 train-split tokens, seed 0):

1. every calibration forward's `chunk_kda` call is recorded (harness.suites.state_rank's recorder)
   and its gate recomputed with the reference (harness.kernels.kda.kda_gate): per layer, key head
   and channel the mean per-token retention a = mean exp(g) (one value head per key head here;
   with grouped values, the mean over the group);
2. for each registered linear method and ratio, the mean retention of the kept and of the dropped
   channels (does a decay-blind method keep slow or fast channels?);
3. held-out perplexity (the ppl suite, all held-out tokens) of four selections: `drrqr`;
   `drrqr-decay`, DRRQR on [Q; K diag(w)] with w_c = (1 - a_c^2)^(-1/2), the gain of a key written
   into a state row that decays by a_c per step (a slow channel's keys weigh more);
   `drrqr-decay-inverse`, the opposite weight w_c = (1 - a_c^2)^(1/2) (a fast channel's keys weigh
   more); `slowest`, the channels with the highest retention; `fastest`, the lowest.

    python docs/scripts/kda_decay.py [MODEL] [--ratios 0.25,0.5,0.75] [--only drrqr,slowest]

Prints markdown tables. Run from outside the repository root (see README).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch

from harness import registry
from harness.calibration import CalibrationSpec, calibration_batches
from harness.families import adapter_for
from harness.kernels import kda
from harness.loader import load_model
from harness.method import keep_count
from harness.methods.drrqr import DRRQR
from harness.selection import ChannelSelection, LayerSelection
from harness.suite import SuiteContext
from harness.suites.ppl import PerplexitySuite
from harness.suites.state_rank import record_delta_rule_calls


def retention(model, adapter, batches) -> dict[int, torch.Tensor]:
    """layer -> (key heads, d_k) mean per-token retention exp(g) over the calibration tokens."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    with torch.no_grad(), record_delta_rule_calls(adapter.layers(model)) as calls:
        for ids in batches:
            model(input_ids=ids, use_cache=False)
    for index, attn in adapter.layers(model):
        for call in calls[index]:
            a = call.arguments
            g = (
                kda.kda_gate(a["g"], a.get("A_log"), a.get("dt_bias"), a.get("lower_bound"))
                if a.get("use_gate_in_kernel")
                else a["g"].float()
            )
            r = g.exp().reshape(-1, attn.num_v_heads, attn.head_k_dim)  # (tokens, HV, d_k)
            sums[index] = sums.get(index, 0) + r.sum(0)
            counts[index] = counts.get(index, 0) + r.shape[0]
        group = attn.num_v_heads // attn.num_heads
        sums[index] = (sums[index] / counts[index]).reshape(attn.num_heads, group, -1).mean(1)
    return sums


def selection_from(kept: dict[int, list[np.ndarray]], layers, name: str, ratio: float) -> ChannelSelection:
    return ChannelSelection(
        "kda",
        {
            d.index: LayerSelection(
                d.head_dim, d.value_dim, tuple(tuple(sorted(int(c) for c in h)) for h in kept[d.index])
            )
            for d in layers
        },
        name,
        ratio,
    )


def ppl(model, tokenizer) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = SuiteContext("kda", "cpu", 0, Path(tmp), lambda _d, _t: lambda n=1: None)
        return next(m.value for m in PerplexitySuite().run(model, tokenizer, ctx) if m.name == "ppl")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="kda-tiny")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--only", default="", help="comma-separated selections of step 3 (default: all)")
    args = parser.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(1)

    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapter = adapter_for(model)
    batches = calibration_batches(tokenizer, CalibrationSpec())
    a = retention(model, adapter, batches)
    everything = frozenset().union(
        *(
            registry.get_method(n).needs
            for n in registry.names(registry.METHODS)
            if "kda" in registry.get_method(n).families
        )
    )
    layers = adapter.capture(model, batches, everything - {"model"})

    print("retention a = mean exp(g) per channel, over layers:")
    print("| layer | min | median | max | channels with a < 0.5 |")
    print("|---|---|---|---|---|")
    for i, r in a.items():
        print(f"| {i} | {r.min():.3f} | {r.median():.3f} | {r.max():.3f} | {(r < 0.5).sum().item()} of {r.numel()} |")

    print("\nmean retention of kept / dropped channels:")
    print("| method | " + " | ".join(f"{r:g} kept | {r:g} dropped" for r in ratios) + " |")
    print("|---|" + "---|---|" * len(ratios))
    methods = [n for n in registry.names(registry.METHODS) if "kda" in registry.get_method(n).families]
    for name in methods:
        method = registry.build_method(name, {}, seed=0)
        if method.projects:
            continue  # a projection keeps no channel
        cells = []
        for ratio in ratios:
            sel = method.select(layers, ratio, "kda")
            kept = torch.zeros(sum(r.numel() for r in a.values()), dtype=torch.bool)
            flat = torch.cat([a[i].flatten() for i in sorted(a)])
            offset = 0
            for i in sorted(a):
                kept[offset + torch.from_numpy(sel.layers[i].flat_indices())] = True
                offset += a[i].numel()
            cells.append(f"{flat[kept].mean():.3f} | {flat[~kept].mean():.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")

    def by_retention(ratio, slowest):
        kept = {}
        for d in layers:
            n = keep_count(d.head_dim, ratio)
            kept[d.index] = [
                np.argsort(-a[d.index][h].numpy() if slowest else a[d.index][h].numpy(), kind="stable")[:n]
                for h in range(d.num_heads)
            ]
        return selection_from(kept, layers, "slowest" if slowest else "fastest", ratio)

    def decay_weighted(ratio, power=-0.5):
        weighted = [
            dataclasses.replace(d, k=d.k * (1 - a[d.index].clamp(max=0.999) ** 2).pow(power)[None]) for d in layers
        ]
        return DRRQR(seed=0).select(weighted, ratio, "kda")

    choices = {
        "drrqr": lambda r: DRRQR(seed=0).select(layers, r, "kda"),
        "drrqr-decay": decay_weighted,
        "drrqr-decay-inverse": lambda r: decay_weighted(r, 0.5),
        "slowest": lambda r: by_retention(r, True),
        "fastest": lambda r: by_retention(r, False),
    }
    if args.only:
        choices = {k: v for k, v in choices.items() if k in args.only.split(",")}
    print(f"\nheld-out ppl (dense {ppl(model, tokenizer):.2f}):")
    print("| selection | " + " | ".join(f"{r:g}" for r in ratios) + " | kept retention (mean) |")
    print("|---|" + "---|" * (len(ratios) + 1))
    for name, choose in choices.items():
        cells, kept_a = [], []
        for ratio in ratios:
            sel = choose(ratio)
            pruned = copy.deepcopy(model)
            adapter.apply(pruned, sel)
            cells.append(f"{ppl(pruned, tokenizer):.2f}")
            kept_a.append(
                np.mean([a[i][h][list(k)].mean().item() for i, s in sel.layers.items() for h, k in enumerate(s.kept)])
            )
        print(f"| {name} | " + " | ".join(cells) + " | " + " / ".join(f"{x:.3f}" for x in kept_a) + " |", flush=True)


if __name__ == "__main__":
    main()
