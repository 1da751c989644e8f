"""One optimizer step, shared by every training loop of the harness: the zoo's text models
(`harness.zoo.train`), the MQAR and retrieval zoo models (`harness.zoo.mqar`,
`harness.zoo.retrieval`), LoRA recovery (`harness.recovery`) and LeanK's scales
(`harness.methods.leank_training`).

Each loop keeps what is its own (its data, its loss, its schedule, its progress report); the
step is the part they all do the same way, in the same order, so they all fail the same way too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


def train_step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], torch.Tensor],
    step: int,
    *,
    lr: float | None = None,
    clip: float = 0.0,
    params: Iterable[torch.Tensor] = (),
    what: str = "training",
    hint: str = "",
) -> float:
    """Set the learning rate (`lr`, when the loop schedules it), compute `loss_fn()`, zero the
    gradients, backpropagate, clip the gradient norm of `params` to `clip` (0: no clipping), step
    the optimizer; return the loss. A loss that is not finite raises FloatingPointError
    ("<what> diverged at step <step>: loss <value><hint>")."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr
    loss = loss_fn()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{what} diverged at step {step}: loss {value}{hint}")
    return value
