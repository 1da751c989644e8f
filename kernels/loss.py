"""Cross entropy with fla's FusedCrossEntropyLoss / FusedLinearCrossEntropyLoss semantics.

``cross_entropy_loss`` stands in for ``fla.modules.fused_cross_entropy.cross_entropy_loss`` and
returns the same unreduced pair ``(loss, z_loss)``, both float32 ``[N]``. Per row, with
``x = softcap(logit_scale * logits)`` (``softcap(z) = c * tanh(z / c)`` when set) and
``lse = logsumexp(x)``::

    loss   = lse - (1 - label_smoothing) * x[target] - label_smoothing * mean(x)
             + lse_square_scale * lse**2
    z_loss = lse_square_scale * lse**2

and both are 0 where ``target == ignore_index`` (those rows get no gradient either).

``fused_cross_entropy_forward(module, input, target)`` is ``FusedCrossEntropyLoss.forward``:
``mean`` divides the summed loss by the number of non-ignored targets (not clamped, so an
all-ignored batch gives nan, as in fla). ``fused_linear_cross_entropy_forward(module, x, target,
weight, bias)`` is ``FusedLinearCrossEntropyLoss.forward``: logits ``x @ weight.T + bias``, the
same loss, ``mean`` over non-ignored targets clamped to at least one, and fla's L2Warp gradient on
the max logit when ``use_l2warp`` is set. Vocabulary-parallel process groups are not supported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cross_entropy_loss", "fused_cross_entropy_forward", "fused_linear_cross_entropy_forward"]


def cross_entropy_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    lse_square_scale: float = 0.0,
    logit_softcapping: float | None = None,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unreduced loss and z-loss, float32 ``[N]`` each (float64 for float64 logits).

    ``inplace_backward`` is accepted and ignored (autograd allocates the logits' gradient).
    """
    if process_group is not None and torch.distributed.get_world_size(process_group) > 1:
        raise NotImplementedError("vocabulary-parallel cross entropy has no CPU reference")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype) * logit_scale
    if logit_softcapping is not None:
        x = logit_softcapping * torch.tanh(x / logit_softcapping)
    lse = torch.logsumexp(x, -1)
    valid = target != ignore_index
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    picked = x.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1)
    loss = lse - picked
    if label_smoothing > 0:
        loss = lse - (1 - label_smoothing) * picked - label_smoothing * x.mean(-1)
    z_loss = lse_square_scale * lse.square()
    loss = torch.where(valid, loss + z_loss, torch.zeros_like(loss))
    z_loss = torch.where(valid, z_loss, torch.zeros_like(z_loss)).detach()  # for logging, as in fla
    return loss, z_loss


def fused_cross_entropy_forward(module, input: torch.Tensor, target: torch.Tensor):
    """``FusedCrossEntropyLoss.forward`` for CPU tensors."""
    loss, z_loss = cross_entropy_loss(
        logits=input,
        target=target,
        label_smoothing=module.label_smoothing,
        logit_scale=module.logit_scale,
        lse_square_scale=module.lse_square_scale,
        logit_softcapping=module.logit_softcapping,
        ignore_index=module.ignore_index,
        process_group=module.process_group,
    )
    if module.reduction != "none":
        loss = loss.sum()
        z_loss = z_loss.sum()
        if module.reduction == "mean":
            total = (target != module.ignore_index).sum()
            loss = loss / total
            z_loss = z_loss / total
    return (loss, z_loss) if module.return_z_loss else loss


def fused_linear_cross_entropy_forward(
    module, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
):
    """``FusedLinearCrossEntropyLoss.forward`` for CPU tensors (scalar float32 loss)."""
    from fla.modules.l2warp import l2_warp  # plain torch in fla

    x = x.reshape(-1, x.shape[-1])
    target = target.reshape(-1)
    logits = F.linear(x, weight, bias)
    loss, _ = cross_entropy_loss(
        logits=logits,
        target=target,
        label_smoothing=module.label_smoothing,
        logit_scale=module.logit_scale,
        logit_softcapping=module.logit_softcapping,
        ignore_index=module.ignore_index,
        process_group=module.process_group,
    )
    loss = loss.sum()
    if module.reduction == "mean":
        loss = loss / (target != module.ignore_index).sum().clamp_min(1)
    if module.use_l2warp:
        # fla normalises the penalty by all N input rows: L2Wrap on logits viewed as [1, N, V]
        loss = l2_warp(loss, logits.unsqueeze(0), module.l2_penalty_factor)
    return loss
