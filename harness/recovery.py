"""LoRA recovery: a short fine-tune of a pruned model, merged back into plain weights.

`lora_recover(model, tokenizer, spec)` wraps the named `nn.Linear` modules of an (already pruned,
in-memory) model with peft LoRA adapters, trains only the adapters for `spec.steps` AdamW steps on
next-token cross-entropy, merges them into the weights and returns the plain model: same class,
same config (the pruned key dim included), so `save_pretrained` then a plain `from_pretrained`
gives the same model.

The loop follows the zoo's (`harness.zoo.train`), top to bottom:

1. The training text (default: the embedded corpus's TRAIN split; never the held-out split, which
   the ppl suite scores) is tokenized once into one stream of token ids.
2. Each step draws `batch_size` random windows of `seq_len + 1` tokens (positions from a generator
   seeded with `seed + 1`, so the data order is fixed by the seed) and minimises the cross-entropy
   of predicting each window's last `seq_len` tokens, computed from the logits. The learning rate
   warms up linearly over the first 10% of the steps, then follows a cosine down to 0.1 * lr;
   gradients are clipped to norm 1.
3. The adapters are merged (W += alpha / rank * B @ A) and removed.

Determinism: the LoRA A matrices are drawn under `torch.manual_seed(seed)` (inside a forked RNG,
so the caller's RNG is left as it was), the windows come from their own generator, and the loop
runs on a fixed number of CPU threads (`threads`, default 1 as in the zoo; recorded in the stats),
so the same seed on the same machine and versions gives the same weights.

The model is trained in place: the returned model is the input object, with merged weights. If
training fails (or is interrupted), the adapters are removed without merging and the input model
is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import nn

from harness.errors import HarnessError
from harness.training import train_step
from harness.zoo.train import fixed_threads, next_token_loss

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # the peft adapter name


class LoraError(HarnessError, ValueError):
    """Bad LoRA input: a ValueError for Python callers, a one-line message for the CLI."""


@dataclass(frozen=True)
class LoraSpec:
    """What a LoRA recovery run does. `targets` are module names (the last component(s) of a
    module's dotted name, as peft matches them) of `nn.Linear` layers; the default is the attention
    projections, `ATTENTION_TARGETS + MLP_TARGETS` adds the MLP."""

    steps: int = 200
    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 256
    targets: tuple[str, ...] = ATTENTION_TARGETS
    seed: int = 0
    threads: int | None = 1  # torch CPU threads while training (None: leave torch's setting); not in key()

    def __post_init__(self) -> None:
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        object.__setattr__(self, "targets", targets)
        if self.steps < 1:
            raise LoraError(f"LoRA steps must be >= 1, got {self.steps}")
        if self.rank < 1:
            raise LoraError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0 or not self.lr > 0:
            raise LoraError(f"LoRA alpha and lr must be > 0, got alpha={self.alpha}, lr={self.lr}")
        if self.batch_size < 1 or self.seq_len < 8:
            raise LoraError(f"LoRA needs batch_size >= 1 and seq_len >= 8, got {self.batch_size} and {self.seq_len}")
        if not targets or not all(isinstance(t, str) and t.strip(".") for t in targets):
            raise LoraError(f"LoRA targets must be non-empty module names, got {self.targets!r}")
        if self.threads is not None and self.threads < 1:
            raise LoraError(f"threads must be >= 1 or None, got {self.threads}")

    def key(self) -> dict:
        """JSON-able identity for run keys: everything that changes the result but the thread count
        (which, like the device, is recorded in the stats instead)."""
        return {
            f.name: (list(getattr(self, f.name)) if f.name == "targets" else getattr(self, f.name))
            for f in fields(self)
            if f.name != "threads"
        }


# --- data ---------------------------------------------------------------------------------------

_STREAM: dict[tuple, torch.Tensor] = {}  # one entry: (text digest, tokenizer) -> token ids


def train_stream(tokenizer, text_file: str | None = None) -> torch.Tensor:
    """The training text as one 1-D stream of token ids (the embedded corpus's train split when
    `text_file` is None), memoized for the last text and tokenizer in this process."""
    from harness.calibration import load_text

    text = load_text(text_file)  # split="train": the held-out split is what the ppl suite scores
    key = (
        hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
        getattr(tokenizer, "name_or_path", ""),
        type(tokenizer).__name__,
        len(tokenizer),
    )
    if key not in _STREAM:
        _STREAM.clear()
        _STREAM[key] = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return _STREAM[key]


def lr_at(step: int, spec: LoraSpec) -> float:
    """Linear warmup over the first 10% of the steps, then cosine to 0.1 * lr at the last step."""
    from harness.zoo.train import TrainConfig
    from harness.zoo.train import lr_at as zoo_lr_at

    return zoo_lr_at(step, TrainConfig(steps=spec.steps, lr=spec.lr, warmup_steps=spec.steps // 10, min_lr_ratio=0.1))


# --- targets ------------------------------------------------------------------------------------


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)  # peft's rule for a list of names


def resolve_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The full names of the modules `targets` name; each target must match at least one module,
    and every match must be an `nn.Linear`."""
    named = [(n, m) for n, m in model.named_modules() if n]
    found: list[str] = []
    for target in targets:
        hits = [(n, m) for n, m in named if _matches(n, target)]
        if not hits:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, nn.Linear)})
            raise LoraError(
                f"LoRA target {target!r} matches no module of {type(model).__name__}; "
                f"its linear layers are named {', '.join(linear)}"
            )
        bad = next(((n, m) for n, m in hits if type(m) is not nn.Linear), None)
        if bad is not None:
            raise LoraError(
                f"LoRA target {target!r} matches {bad[0]}, a {type(bad[1]).__name__}; "
                "LoRA recovery wraps nn.Linear modules only"
            )
        found += [n for n, _ in hits if n not in found]
    return found


@contextlib.contextmanager
def _unfused_mlps(model: nn.Module, names: list[str]):
    """fla's GatedMLP with fuse_swiglu passes `down_proj.weight` straight to a fused kernel, which
    would bypass a LoRA wrapper on down_proj. While training, such MLPs take their unfused path
    (`down_proj(swiglu(gate, up))`, the same function); the merged weight serves the fused path."""
    switched = []
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if leaf == "down_proj" and getattr(parent, "fuse_swiglu", False):
            parent.fuse_swiglu = False
            switched.append(parent)
    try:
        yield
    finally:
        for parent in switched:
            parent.fuse_swiglu = True


# --- training -----------------------------------------------------------------------------------


def lora_recover(
    model: nn.Module,
    tokenizer,
    spec: LoraSpec,
    *,
    text_file: str | None = None,
    advance: Callable[..., None] | None = None,
) -> tuple[nn.Module, dict]:
    """Fine-tune LoRA adapters on `spec.targets` of `model` (in place), merge them, and return
    (the plain merged model, stats). `text_file`: a UTF-8 text to train on instead of the embedded
    corpus's train split. `advance()` is called once per step (a progress bar)."""
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"spec must be a LoraSpec, got {type(spec).__name__}")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise HarnessError("LoRA recovery needs the peft package: pip install peft") from None

    names = resolve_targets(model, spec.targets)  # before any work: a typo fails in milliseconds
    ids = train_stream(tokenizer, text_file)
    n_windows = len(ids) - spec.seq_len - 1
    if n_windows < 1:
        raise HarnessError(
            f"LoRA training text has {len(ids)} tokens, fewer than seq_len + 2 = {spec.seq_len + 2}; "
            "use a longer text or a smaller seq_len"
        )
    device = next(model.parameters()).device
    offsets = torch.arange(spec.seq_len + 1)
    was_training = model.training
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=names, lora_dropout=0.0, bias="none")

    fork_devices = [device.index or 0] if device.type == "cuda" else []
    peft_model, merged = None, None
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=fork_devices), fixed_threads(spec.threads), _unfused_mlps(model, names):
            torch.manual_seed(spec.seed)
            peft_model = get_peft_model(model, config)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            trainable = sum(p.numel() for p in params)
            optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0, foreach=False)
            windows = torch.Generator().manual_seed(spec.seed + 1)  # the data order, apart from the init RNG
            lora_calls = _count_lora_calls(peft_model)
            peft_model.train()
            losses: list[float] = []
            for step in range(spec.steps):
                starts = torch.randint(0, n_windows, (spec.batch_size,), generator=windows)
                batch = ids[starts[:, None] + offsets].to(device)

                def loss_fn(step=step, batch=batch):  # bound now: no closure over the loop's names
                    loss = next_token_loss(peft_model, batch)  # from the logits: no fused loss kernel
                    if step == 0:
                        lora_calls.check()
                    return loss

                losses.append(
                    train_step(
                        optimizer,
                        loss_fn,
                        step,
                        lr=lr_at(step, spec),
                        clip=1.0,
                        params=params,
                        what="LoRA training",
                        hint="; try a smaller lr",
                    )
                )
                if advance is not None:
                    advance()
            merged = peft_model.merge_and_unload()
    finally:
        if merged is None and peft_model is not None:
            with contextlib.suppress(Exception):
                peft_model.unload()  # drop the adapters unmerged: the input model as it was
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    wall = time.perf_counter() - t0
    tail = losses[-min(10, len(losses)) :]
    stats = {
        "steps": spec.steps,
        "initial_loss": losses[0],  # the first batch, before any update
        "final_loss": sum(tail) / len(tail),  # mean of the last (up to) 10 steps' batch losses
        "trainable_params": trainable,
        "lora_modules": len(names),
        "tokens_seen": spec.steps * spec.batch_size * spec.seq_len,
        "train_tokens": len(ids),
        "threads": spec.threads or torch.get_num_threads(),
        "wall_s": wall,
    }
    return merged, stats


class _count_lora_calls:
    """Counts calls of every LoRA A matrix during the first forward: a wrapper the model's forward
    never calls (a fused kernel reading `.weight` directly) would train nothing, silently."""

    def __init__(self, peft_model: nn.Module):
        from peft.tuners.lora import LoraLayer

        self.calls: dict[str, int] = {}
        self.handles = []
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                short = name.removeprefix("base_model.model.")
                self.calls[short] = 0
                self.handles.append(
                    module.lora_A[ADAPTER].register_forward_hook(
                        lambda *_args, key=short: self.calls.__setitem__(key, self.calls[key] + 1)
                    )
                )

    def check(self) -> None:
        for h in self.handles:
            h.remove()
        missed = [n for n, c in self.calls.items() if c == 0]
        if missed:
            more = f" (and {len(missed) - 1} more)" if len(missed) > 1 else ""
            raise LoraError(
                f"LoRA on {missed[0]}{more} is bypassed by the model's forward "
                "(a fused kernel reads its weight directly); drop it from the targets"
            )


__all__ = [
    "ATTENTION_TARGETS",
    "MLP_TARGETS",
    "LoraError",
    "LoraSpec",
    "lora_recover",
    "resolve_targets",
    "train_stream",
]
