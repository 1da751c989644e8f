"""LeanK's training: the pass-key data, the distillation loss, and the loop that fits the scales.

The selector (`harness.methods.leank.LeanK`) calls `train_scales` twice: stage 1 with the L1
term on continuous scales, stage 2 with the binary mask in the forward pass (straight-through:
the gradient goes to the continuous scales). Its step is the harness's one training step
(`harness.training.train_step`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from harness.errors import HarnessError
from harness.leank_mask import selection_mask
from harness.selection import DEFAULT_RECENT, DEFAULT_SINK, ChannelSelection
from harness.training import train_step


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
    ranks = torch.empty_like(order).scatter_(
        -1, order, torch.arange(alpha.shape[-1], device=alpha.device).expand_as(order)
    )
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
        filler = corpus_ids[start : start + n_fill]
        depth = int(rng.integers(1, n_fill))
        rows.append(filler[:depth] + needle + filler[depth:] + question + answer)
        starts.append(seq_len - len(answer))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(starts)


def heldout_distillation_loss(
    model, tokenizer, selection: ChannelSelection, *, sequences: int = 32, seq_len: int = 256, seed: int = 1234
) -> float:
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
            with adapter.key_scaling(
                model,
                mask.to(model.device),
                sink=int(window.get("sink", DEFAULT_SINK)),
                recent=int(window.get("recent", DEFAULT_RECENT)),
                full_queries=int(starts.min()) - 1,
            ):
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        total += float(distill_loss(hidden, target, starts)) * len(ids)
    return total / (-(-sequences // batch) * batch)


def distill_loss(hidden: torch.Tensor, target: torch.Tensor, answer_starts: torch.Tensor) -> torch.Tensor:
    """MSE between the scaled and the full model's final hidden states at the positions that
    predict the answer (from the one before the answer's first token to the one before the last)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)[None, :]
    scored = (positions >= (answer_starts.to(hidden.device)[:, None] - 1)) & (positions < hidden.shape[1] - 1)
    return (hidden - target).pow(2)[scored].mean()


def _scaled_loss(
    model,
    adapter,
    alpha,
    ids,
    answer_starts,
    target,
    *,
    lam: float,
    binary: tuple[float, int] | None,
    sink: int,
    recent: int,
) -> torch.Tensor:
    scale = alpha
    if binary is not None:  # straight-through: binary forward, gradient to alpha
        scale = binarize(alpha.detach(), *binary) + alpha - alpha.detach()
    first_scored = int(answer_starts.min()) - 1  # hidden states that predict the answer
    with adapter.key_scaling(model, scale, sink=sink, recent=recent, full_queries=first_scored):
        hidden = model.model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state
    return distill_loss(hidden, target, answer_starts) + lam * alpha.abs().mean()


def train_scales(
    model,
    adapter,
    data,
    targets,
    alpha: torch.Tensor,
    *,
    steps: int,
    lr: float,
    lam: float,
    binary: tuple[float, int] | None,
    sink: int,
    recent: int,
    advance,
) -> float | None:
    """Fit `alpha` [layers, KV heads, head_dim] in place: Adam on the distillation loss over the
    cycled pass-key batches `data` (ids, answer starts) against the full model's `targets`, plus
    `lam * mean|alpha|`, clamping alpha to [0, 1] after each step. With `binary` = (ratio, align)
    the forward uses `binarize(alpha, ratio, align)` (straight-through). The model's weights are
    frozen meanwhile. Returns the last step's loss (None for 0 steps)."""
    optimizer = torch.optim.Adam([alpha], lr=lr)
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    loss = None
    try:
        for step in range(steps):
            ids, answer_starts = data[step % len(data)]
            loss = train_step(
                optimizer,
                functools.partial(
                    _scaled_loss,
                    model,
                    adapter,
                    alpha,
                    ids,
                    answer_starts,
                    targets[step % len(data)],
                    lam=lam,
                    binary=binary,
                    sink=sink,
                    recent=recent,
                ),
                step,
                what="LeanK training",
            )
            with torch.no_grad():
                alpha.clamp_(0.0, 1.0)
            advance()
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return loss
