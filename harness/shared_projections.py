"""Projections that read the same input, run as one GEMM in a decode step.

A decode step multiplies a few rows (one token a sequence) by each weight matrix. At that size a
GEMM costs about the same whatever its output width (docs/benchmarks.md: 64 rows x 2,048 bf16
against 1,024 to 4,096 outputs take 5.1 to 6.2 us on an H100), so a layer whose forward calls
its q, k, v and beta projections on one tensor pays four launches where one wide GEMM would do,
and pruning the q/k projections saves nothing on them.

`SharedProjections(model)` finds, in every module, the sibling `nn.Linear` layers its forward
calls on the same tensor (by name: `SIBLINGS`), and stores each group's weights (and biases) in
one matrix, the members' rows one after another: each member's weight becomes a view of its rows
and its own storage is freed, so the model's weight bytes do not change (the groups are copied
one at a time: the transient is one group). Values are unchanged, bit for bit.

- `routed()`: while active, a member called on a tensor runs the whole group's GEMM and keeps
  it; a member called on that same tensor (the same object, unmodified since: its version)
  takes its columns of it (a strided view); a member called on another tensor runs the group's
  GEMM on that one. A group whose members no longer view its matrix (their weights were
  replaced) is not routed.
- `restore()`: each member gets its own storage back, one group at a time. `save_pretrained`
  needs that: it refuses weights that share storage.

The decode loop (`harness.graph_decode.Decoder`) groups its model's projections while it holds a
CUDA graph and routes its step through them; `graph_decode.release` restores them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

# sibling projections a forward calls on one tensor, by attribute name
SIBLINGS: tuple[tuple[str, ...], ...] = (
    # fla DeltaNet and Gated DeltaNet layers (q, k, v, beta, decay, output gate); softmax attention (q, k, v)
    ("q_proj", "k_proj", "v_proj", "b_proj", "a_proj", "g_proj"),
    ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a"),  # transformers' Qwen3.5 Gated DeltaNet
    ("in_proj_qkvz", "in_proj_ba"),  # transformers' Qwen3-Next Gated DeltaNet
    ("gate_proj", "up_proj"),  # gated MLPs
)


def _groupable(members: list[nn.Linear]) -> bool:
    first = members[0].weight
    return all(
        type(m) is nn.Linear
        and m.weight.dim() == 2
        and m.weight.is_contiguous()
        and m.weight.shape[1] == first.shape[1]
        and m.weight.dtype == first.dtype
        and m.weight.device == first.device
        and (m.bias is None) == (members[0].bias is None)
        for m in members
    )


def _starts_at(member: torch.Tensor, grouped: torch.Tensor, row: int) -> bool:
    """Whether `member` still begins at row `row` of the group's tensor (a view of it, not replaced)."""
    return member.data_ptr() == grouped[row].data_ptr()


class ProjectionGroup:
    """Sibling projections whose weights are row blocks of one matrix."""

    def __init__(self, members: list[nn.Linear]):
        self.members = members
        self.bounds, start = [], 0
        for m in members:
            self.bounds.append((start, start + m.out_features))
            start += m.out_features
        with torch.no_grad():
            self.weight = torch.cat([m.weight for m in members])
            self.bias = None if members[0].bias is None else torch.cat([m.bias for m in members])
            for m, (a, b) in zip(members, self.bounds):  # the members' own storage is freed here
                m.weight.data = self.weight[a:b]
                if self.bias is not None:
                    m.bias.data = self.bias[a:b]
        self.last: tuple | None = None  # (input, its version, the group's output) of the last GEMM

    def intact(self) -> bool:
        """Whether every member still views its rows of the group's matrix."""
        return all(
            _starts_at(m.weight, self.weight, a) and m.weight.shape == (b - a, self.weight.shape[1])
            for m, (a, b) in zip(self.members, self.bounds)
        )

    def output(self, x: torch.Tensor) -> torch.Tensor:
        last = self.last
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2]
        out = F.linear(x, self.weight, self.bias)
        self.last = (x, x._version, out)
        return out

    def member_forward(self, index: int):
        a, b = self.bounds[index]
        return lambda x: self.output(x)[..., a:b]

    def restore(self) -> None:
        with torch.no_grad():
            for m, (a, _b) in zip(self.members, self.bounds):
                if _starts_at(m.weight, self.weight, a):
                    m.weight.data = m.weight.data.clone()
                if self.bias is not None and _starts_at(m.bias, self.bias, a):
                    m.bias.data = m.bias.data.clone()
        self.weight = self.bias = self.last = None


def sibling_groups(model: nn.Module) -> list[list[nn.Linear]]:
    """Each module's sibling projections of one `SIBLINGS` entry (two or more, of one input size,
    dtype and device, all with or all without a bias)."""
    groups = []
    for module in model.modules():
        for names in SIBLINGS:
            members = [getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)]
            if len(members) >= 2 and _groupable(members):
                groups.append(members)
    return groups


class SharedProjections:
    """A model's sibling projections grouped into one matrix each (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.groups = [ProjectionGroup(members) for members in sibling_groups(model)]

    @contextlib.contextmanager
    def routed(self):
        swapped = []
        try:
            for group in self.groups:
                if group.intact():
                    for i, m in enumerate(group.members):
                        m.forward = group.member_forward(i)  # an instance attribute: __call__ looks it up first
                        swapped.append(m)
            yield
        finally:
            for m in swapped:
                del m.forward
            for group in self.groups:
                group.last = None

    def restore(self) -> None:
        for group in self.groups:
            group.restore()
        self.groups = []
