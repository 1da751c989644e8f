"""Train a zoo model: a small, readable loop in the spirit of nanoGPT, top to bottom.

1. The train split is tokenized once into one long stream of token ids.
2. Each step draws `batch_size` random windows of `seq_len + 1` tokens from it (positions from
   a seeded generator, so the data order is fixed by the seed) and minimises next-token
   cross-entropy with AdamW; the learning rate warms up linearly, then follows a cosine down to
   `min_lr_ratio * lr`; gradients are clipped to norm `grad_clip`.
3. At the end (and every `eval_every` steps) the held-out split is scored: token-weighted
   perplexity over non-overlapping windows (each window of `seq_len + 1` tokens predicts its
   last `seq_len`; consecutive windows share one token, so every held-out token after the first
   is scored exactly once). The unigram baseline (add-one smoothed token counts of the train
   split) is scored on the same tokens.

Determinism: `torch.manual_seed(seed)` fixes the initial weights, a separate seeded generator
fixes the windows, and the run uses a fixed number of CPU threads (`threads`, recorded in the
result), so the same seed on the same machine and versions gives the same weights.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from harness.training import train_step


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    eval_batch_size: int = 16
    threads: int | None = None  # CPU threads (None: leave torch's setting)


@dataclass
class TrainResult:
    steps: int
    tokens_seen: int
    final_train_loss: float
    dense_ppl: float
    unigram_ppl: float
    heldout_tokens: int
    wall_s: float
    threads: int
    curve: list[tuple[int, float, float]] = field(default_factory=list)  # (step, train loss, heldout ppl)
    config: dict = field(default_factory=dict)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr_ratio * cfg.lr at the last step."""
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - 1 - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases, gates' scalars)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "norm" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=False)


def next_token_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting batch[:, 1:] from batch[:, :-1].

    The loss is computed here from the logits (not with `labels=`), so that no model's fused
    loss kernel is involved and all families are trained with the same objective."""
    logits = model(input_ids=batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def heldout_windows(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """Non-overlapping windows of seq_len + 1 tokens (consecutive ones share one token)."""
    return [ids[s : s + seq_len + 1] for s in range(0, len(ids) - 1, seq_len)]


@torch.no_grad()
def heldout_ppl(
    model: torch.nn.Module, ids: torch.Tensor, seq_len: int = 256, batch_size: int = 16
) -> tuple[float, int]:
    """(token-weighted perplexity, tokens scored) of `model` on the 1-D token tensor `ids`."""
    was_training = model.training
    model.eval()
    windows = heldout_windows(ids, seq_len)
    nll, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        width = max(len(w) for w in group)
        batch = torch.zeros(len(group), width, dtype=torch.long)
        target = torch.full((len(group), width - 1), -100, dtype=torch.long)
        for row, w in enumerate(group):
            batch[row, : len(w)] = w
            target[row, : len(w) - 1] = w[1:]
        # right padding: causal models never look ahead, so the real positions are unaffected
        logits = model(input_ids=batch[:, :-1], use_cache=False).logits.float()
        nll += F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((target != -100).sum())
    model.train(was_training)
    return math.exp(nll / count), count


def unigram_ppl(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one smoothed unigram counts of `train_ids`, on heldout_ids[1:]
    (the same tokens heldout_ppl scores)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return math.exp(-logp[heldout_ids[1:]].mean().item())


class TrainProgress:
    """A rich progress bar with step, loss, learning rate and tokens/s. When stderr is not a
    terminal (a log file), it prints a plain line every ~5% of the steps instead."""

    def __init__(self, total: int, enabled: bool = True):
        from rich.console import Console

        self.total, self.enabled = total, enabled
        self.console = Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.every = max(1, total // 20)
        self._progress = None

    def __enter__(self) -> "TrainProgress":
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.3f}"),
                TextColumn("lr {task.fields[lr]:.2e}"),
                TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, loss=float("nan"), lr=0.0, tps=0.0)
        return self

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, lr=lr, tps=tokens_per_s)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            self.console.print(
                f"step {step}/{self.total}  loss {loss:.3f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s",
                highlight=False,
                soft_wrap=True,
            )

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, soft_wrap=True)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)


@contextlib.contextmanager
def denormals_flushed(on: bool):
    """With `on`, CPU float math flushes denormal numbers to zero (`torch.set_flush_denormal`), and
    keeps them again afterwards (torch has no getter for the flag, so it is switched off, IEEE's
    default). x86 handles denormals in microcode: the Qwen3.5 hybrid's depthwise-conv backward meets
    them in training and ran 1.44x slower for it (docs/results.md)."""
    if not on:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@contextlib.contextmanager
def fixed_threads(n: int | None):
    """Run with `n` torch CPU threads (None: leave the setting), restoring it afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: torch.nn.Module,
    train_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = True,
    vocab_size: int | None = None,
) -> TrainResult:
    """Train `model` in place on the 1-D token stream `train_ids`; score it on `heldout_ids`."""
    with fixed_threads(cfg.threads):
        return _train(model, train_ids, heldout_ids, cfg, progress, vocab_size)


def _train(model, train_ids, heldout_ids, cfg: TrainConfig, progress: bool, vocab_size: int | None) -> TrainResult:
    threads = torch.get_num_threads()
    torch.manual_seed(cfg.seed)
    windows = torch.Generator().manual_seed(cfg.seed + 1)  # the data order, independent of the model's RNG use
    n_windows = len(train_ids) - cfg.seq_len - 1
    if n_windows < 1:
        raise ValueError(f"train split has {len(train_ids)} tokens, fewer than seq_len + 1 = {cfg.seq_len + 1}")
    offsets = torch.arange(cfg.seq_len + 1)
    optimizer = make_optimizer(model, cfg)
    model.train()

    curve: list[tuple[int, float, float]] = []
    loss_value = float("nan")
    t0 = time.perf_counter()
    with TrainProgress(cfg.steps, enabled=progress) as bar:
        for step in range(cfg.steps):
            # a batch of random windows of the train stream
            starts = torch.randint(0, n_windows, (cfg.batch_size,), generator=windows)
            batch = train_ids[starts[:, None] + offsets]

            # forward, backward, clip, step with the scheduled learning rate
            lr = lr_at(step, cfg)
            loss_value = train_step(
                optimizer,
                functools.partial(next_token_loss, model, batch),
                step,
                lr=lr,
                clip=cfg.grad_clip,
                params=model.parameters(),
            )
            elapsed = time.perf_counter() - t0
            bar.update(step + 1, loss=loss_value, lr=lr, tokens_per_s=(step + 1) * batch.numel() / elapsed)

            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                ppl, _ = heldout_ppl(model, heldout_ids, cfg.seq_len, cfg.eval_batch_size)
                curve.append((step + 1, loss_value, ppl))
                bar.log(f"step {step + 1}: train loss {loss_value:.3f}, held-out ppl {ppl:.2f}")

    wall = time.perf_counter() - t0
    model.eval()
    ppl, scored = heldout_ppl(model, heldout_ids, cfg.seq_len, cfg.eval_batch_size)
    curve.append((cfg.steps, loss_value, ppl))
    vocab = vocab_size or int(max(train_ids.max(), heldout_ids.max())) + 1
    base = unigram_ppl(train_ids, heldout_ids, vocab)
    if progress:
        bar.log(f"held-out ppl {ppl:.2f} (unigram baseline {base:.2f}) on {scored} tokens; trained {wall:.0f} s")
    return TrainResult(
        steps=cfg.steps,
        tokens_seen=cfg.steps * cfg.batch_size * cfg.seq_len,
        final_train_loss=loss_value,
        dense_ppl=ppl,
        unigram_ppl=base,
        heldout_tokens=scored,
        wall_s=wall,
        threads=threads,
        curve=curve,
        config=asdict(cfg),
    )
