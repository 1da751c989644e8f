"""LeanK: learned static key-channel masks for the K cache, or a published mask loaded as is.

Zhang et al., "LeanK: Learnable K Cache Channel Pruning for Efficient Decoding" (EMNLP 2025,
arXiv 2508.02215). A scale alpha[layer, kv_head, channel] in [0, 1] multiplies the post-RoPE
middle keys (not the first `sink` tokens, not the last `recent`) when answer tokens attend to
them. Stage 1 (`fit`, once per run): minimize the MSE between the final hidden states of the
full and the scaled model on answer tokens, plus `lam * mean|alpha|`, clamping alpha to [0, 1].
Stage 2 (`select`, per ratio): a global quantile threshold of alpha at the ratio, each head's
count rounded to a multiple of `align`, that head's top channels kept; then alpha is fine-tuned
with the binary mask in the forward pass (straight-through gradient, no L1) and binarized again.
Training data: synthetic pass-key retrieval sequences over the embedded corpus (offline).
With `mask=path.pth` (the published format: float [layers, kv_heads, head_dim] of 0/1) nothing
is trained and the mask is the selection; its kept fraction fixes the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError
from harness.method import MODEL, SOFTMAX_FAMILIES, CacheWindow, Method
from harness.selection import ChannelSelection, LayerSelection


def load_mask(path: str | Path) -> torch.Tensor:
    """A published LeanK mask: float [layers, kv_heads, head_dim] of 0/1 (tensors only, no code)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HarnessError(f"LeanK mask {path} not found; pass the .pth file released with LeanK (MInference's configs/leank)")
    try:
        mask = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise HarnessError(f"{path} is not a LeanK mask ({type(exc).__name__}); expected a tensor saved with torch.save") from None
    if not torch.is_tensor(mask) or mask.dim() != 3 or not torch.all((mask == 0) | (mask == 1)):
        raise HarnessError(f"{path}: expected a 0/1 tensor [layers, kv_heads, head_dim], got "
                           f"{tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__}")
    if not bool(mask.any()):
        raise HarnessError(f"{path} keeps no key channel at all (every entry is 0); a mask must keep some")
    return mask.float()


def mask_selection(mask: torch.Tensor, family: str, method: str, meta: dict) -> ChannelSelection:
    layers = {i: LayerSelection(mask.shape[2], mask.shape[2],
                                tuple(tuple(torch.nonzero(head).flatten().tolist()) for head in mask[i]))
              for i in range(mask.shape[0])}
    return ChannelSelection(family, layers, method, round(1.0 - float(mask.mean()), 6), meta=meta)


def selection_mask(selection: ChannelSelection) -> torch.Tensor:
    """The inverse of `mask_selection`: a 0/1 tensor [layers, kv_heads, head_dim]."""
    first = selection.layers[min(selection.layers)]
    mask = torch.zeros(len(selection.layers), first.num_heads, first.head_dim)
    for i, sel in selection.layers.items():
        for h, kept in enumerate(sel.kept):
            mask[i, h, list(kept)] = 1.0
    return mask


def binarize(alpha: torch.Tensor, ratio: float, align: int) -> torch.Tensor:
    """0/1 mask from alpha [L, H, d]: global threshold at `ratio`, per-head counts rounded to a
    multiple of `align`, each head's highest-alpha channels kept (ties: lower index).
    The rounding keeps the global budget: counts are floored to the alignment and the remaining
    aligned blocks go to the heads with the largest remainders, so the kept fraction is the
    target whenever the target is a whole number of blocks (nearest block count otherwise)."""
    flat = alpha.flatten()
    n_keep = round((1.0 - ratio) * flat.numel())
    if n_keep == 0:
        return torch.zeros_like(alpha)
    top = torch.zeros(flat.numel(), device=alpha.device)
    top[np.argsort(-flat.detach().cpu().numpy(), kind="stable")[:n_keep].copy()] = 1.0  # exactly n_keep, ties: first
    raw = top.view_as(alpha).sum(-1).double()
    counts = torch.floor(raw / align) * align
    spare_blocks = round(n_keep / align) - int(counts.sum()) // align
    if spare_blocks > 0:
        remainder = (raw - counts).flatten() - 1e-9 * torch.arange(raw.numel(), device=raw.device)  # ties: first head
        counts.view(-1)[remainder.topk(min(spare_blocks, raw.numel())).indices] += align
    counts = counts.clamp(0, alpha.shape[-1]).long()
    order = torch.from_numpy(np.argsort(-alpha.detach().cpu().numpy(), axis=-1, kind="stable")).to(alpha.device)
    ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(alpha.shape[-1], device=alpha.device).expand_as(order))
    return (ranks < counts[..., None]).to(alpha.dtype)


def passkey_batch(corpus_ids: list[int], tokenizer, rng: np.random.Generator, batch: int, seq_len: int):
    """Pass-key retrieval sequences of exactly `seq_len` tokens: corpus filler, a needle at a random
    depth, the question, the answer last. Returns ids (B, T) and the first answer position per row."""
    rows, starts = [], []
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    for _ in range(batch):
        key = str(int(rng.integers(10_000, 100_000)))
        needle = encode(f" The pass key is {key}. Remember it. {key} is the pass key.")
        question = encode(" What is the pass key? The pass key is")
        answer = encode(f" {key}.")
        n_fill = seq_len - len(needle) - len(question) - len(answer)
        if n_fill < 2:
            raise HarnessError(f"LeanK seq_len {seq_len} is too short for a pass-key sequence; use at least 128")
        start = int(rng.integers(0, len(corpus_ids) - n_fill))
        filler = corpus_ids[start:start + n_fill]
        depth = int(rng.integers(1, n_fill))
        rows.append(filler[:depth] + needle + filler[depth:] + question + answer)
        starts.append(seq_len - len(answer))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(starts)


def heldout_distillation_loss(model, tokenizer, selection: ChannelSelection, *, sequences: int = 32,
                              seq_len: int = 256, seed: int = 1234) -> float:
    """LeanK's objective on held-out pass-key sequences (the corpus's held-out split): MSE between
    the final hidden states of the full model and of the model with `selection`'s middle keys
    masked, on the positions that predict the answer (the prompt attends fully, as in LeanK)."""
    from harness.calibration import load_text
    from harness.families import adapter_for

    adapter = adapter_for(model, kind="softmax")
    window = selection.meta.get("cache", {})
    mask = selection_mask(selection)
    corpus = tokenizer(load_text(None, split="heldout"), add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    total, batch = 0.0, 8
    for _ in range(0, sequences, batch):
        ids, starts = passkey_batch(corpus, tokenizer, rng, batch, seq_len)
        ids = ids.to(model.device)
        with torch.no_grad():
            target = model.model(input_ids=ids, use_cache=False).last_hidden_state
            with adapter.key_scaling(model, mask.to(model.device), sink=int(window.get("sink", 16)),
                                     recent=int(window.get("recent", 64)), full_queries=int(starts.min()) - 1):
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        total += float(LeanK._distill_loss(hidden, target, starts)) * len(ids)
    return total / (-(-sequences // batch) * batch)


@dataclass
class LeanK(CacheWindow, Method):
    name = "leank"
    families = SOFTMAX_FAMILIES
    paper = "Zhang et al. 2025, LeanK, EMNLP, arXiv 2508.02215"

    mask: str = ""  # a published LeanK mask (.pth); when set, nothing is trained
    align: int = 0  # per-head kept counts are multiples of this; 0 = head_dim / 4 (the paper: 32 of 128)
    steps: int = 120  # stage 1 steps (L1-regularized scales)
    steps2: int = 60  # stage 2 steps (straight-through fine-tune of the binary mask)
    lr: float = 0.02
    lam: float = 0.06  # L1 weight in stage 1 (the paper's lambda)
    batch: int = 4
    seq_len: int = 256  # tokens per synthetic training sequence
    pool: int = 8  # distinct training batches, cycled

    _trained: dict = field(default_factory=dict, init=False, repr=False)

    def validate(self) -> None:
        self.validate_window()
        if min(self.steps, self.steps2, self.batch, self.pool) < 0 or self.lr <= 0 or self.lam < 0 or self.align < 0:
            raise ValueError("steps, steps2, batch, pool and align must be >= 0, lr > 0 and lam >= 0")
        if self.mask:
            load_mask(self.mask)  # fail fast, before any model is loaded

    @property
    def needs(self) -> frozenset[str]:
        return frozenset() if self.mask else frozenset({MODEL})

    def implied_ratio(self) -> float | None:
        return round(1.0 - float(load_mask(self.mask).mean()), 6) if self.mask else None

    def check_geometry(self, geometry) -> None:
        if not self.mask:
            return
        shape = tuple(load_mask(self.mask).shape)
        heads, head_dim, _ = geometry[min(geometry)]
        if shape != (len(geometry), heads, head_dim):
            raise HarnessError(f"the LeanK mask {self.mask} is {list(shape)} [layers, KV heads, head_dim], the model's "
                               f"attention is {[len(geometry), heads, head_dim]}: use the mask made for this model")

    # --- stage 1 ------------------------------------------------------------------------------
    def fit(self, model, tokenizer, progress) -> None:
        from harness.calibration import load_text
        from harness.families import adapter_for

        if self.mask:
            return
        adapter = adapter_for(model, kind="softmax")
        geometry = adapter.geometry(model)
        rng = np.random.default_rng(self.seed)
        corpus = tokenizer(load_text(None, split="train"), add_special_tokens=False)["input_ids"]
        data = [passkey_batch(corpus, tokenizer, rng, self.batch, self.seq_len) for _ in range(self.pool)]
        with torch.no_grad():  # the full model's final hidden states: the distillation targets
            targets = [model.model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state for ids, _ in data]
        n_layers, (heads, d, _) = len(geometry), next(iter(geometry.values()))
        alpha = torch.ones(n_layers, heads, d, device=model.device, requires_grad=True)
        self._trained = {"model": model, "adapter": adapter, "data": data, "targets": targets, "d": d}
        self._train(alpha, self.steps, self.lam, None, progress("leank stage 1", self.steps))
        self._trained["alpha"] = alpha.detach().clone()

    def _train(self, alpha, steps: int, lam: float, binary_ratio: float | None, advance) -> None:
        state = self._trained
        model, data, targets = state["model"], state["data"], state["targets"]
        optimizer = torch.optim.Adam([alpha], lr=self.lr)
        frozen = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for step in range(steps):
                ids, answer_starts = data[step % len(data)]
                scale = alpha
                if binary_ratio is not None:  # straight-through: binary forward, gradient to alpha
                    scale = binarize(alpha.detach(), binary_ratio, self._align()) + alpha - alpha.detach()
                first_scored = int(answer_starts.min()) - 1  # hidden states that predict the answer
                with state["adapter"].key_scaling(model, scale, sink=self.sink, recent=self.recent,
                                                  full_queries=first_scored):
                    hidden = model.model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state
                loss = self._distill_loss(hidden, targets[step % len(data)], answer_starts) + lam * alpha.abs().mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    alpha.clamp_(0.0, 1.0)
                if step == steps - 1:
                    self.record("final_loss", round(loss.item(), 6))
                advance()
        finally:
            for p, flag in frozen.items():
                p.requires_grad_(flag)

    @staticmethod
    def _distill_loss(hidden, target, answer_starts) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
        scored = (positions >= (answer_starts.to(hidden.device)[:, None] - 1)) & (positions < hidden.shape[1] - 1)
        return (hidden - target).pow(2)[scored].mean()

    def _align(self) -> int:
        return self.align or max(1, self._trained.get("d", 128) // 4)

    # --- stage 2 ------------------------------------------------------------------------------
    def select(self, layers, ratio, family, progress=None) -> ChannelSelection:
        if self.mask:
            mask = load_mask(self.mask)
            self._check_geometry(mask, layers)
            return mask_selection(mask, family, self.name, {**self.window_meta(), "mask": str(self.mask)})
        if "alpha" not in self._trained:
            raise RuntimeError("LeanK.select before fit: the pipeline calls fit for methods that need the model")
        self._meta = {}
        alpha = self._trained["alpha"].clone().requires_grad_(True)
        self._train(alpha, self.steps2, 0.0, ratio, lambda: None)
        mask = binarize(alpha.detach(), ratio, self._align()).cpu()
        for _ in layers:
            if progress is not None:
                progress()
        return mask_selection(mask, family, self.name, {**self.window_meta(), **self._meta, "align": self._align()})

    @staticmethod
    def _check_geometry(mask: torch.Tensor, layers) -> None:
        model_shape = (len(layers), layers[0].num_heads, layers[0].head_dim) if layers else None
        if tuple(mask.shape) != model_shape:
            raise HarnessError(f"LeanK mask is [layers, kv_heads, head_dim] = {list(mask.shape)} but the model has "
                               f"{list(model_shape)}; use the mask released for this model")

