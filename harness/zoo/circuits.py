"""Circuits written into a zoo-sized Llama's initial weights (hidden 128, heads of 32).

A tiny Llama trained from random weights on the 2-core budget never forms an induction circuit
(a head that finds where the current token occurred before and copies what followed): on
variable-offset copying it stays at chance for thousands of steps (docs/results.md). Every
retrieval skill needs that circuit, so the retrieval Llama starts from it, written in by hand:
`write_induction_circuit` (it copies 44% of repeated random tokens before any training step).
`build_previous_token_head` writes the first half alone. `docs/scripts/induction_probe.py`
measures both.
"""

from __future__ import annotations

import math

import torch

from harness.zoo.models import HEAD_DIM


def rotary_frequencies(model) -> list[float]:
    return [model.config.rope_parameters["rope_theta"] ** (-2 * i / HEAD_DIM) for i in range(HEAD_DIM // 2)]


def point_at_previous_token(attention, head: int, dim: int, gain: float, theta: list[float]) -> None:
    """Head `head`'s query and key read only residual coordinate `dim` (a constant): the query's
    rotary pairs (i, i + d/2) get gain * e^{-i theta_i}, the key's gain, so the score of a key
    d positions back is sum_i gain^2 cos(theta_i (d - 1)) (times the constant squared): highest at d = 1."""
    rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
    attention.q_proj.weight[rows] = 0
    attention.k_proj.weight[rows] = 0
    for i, t in enumerate(theta):
        attention.q_proj.weight[head * HEAD_DIM + i, dim] = gain * math.cos(t)
        attention.q_proj.weight[head * HEAD_DIM + i + HEAD_DIM // 2, dim] = -gain * math.sin(t)
        attention.k_proj.weight[head * HEAD_DIM + i, dim] = gain


def build_previous_token_head(model, constant: float = 0.2, gain: float = 1.0, value_gain: float = 5.0) -> None:
    """Every embedding's first coordinate set to `constant`; layer 0's head 0 points at
    the previous token (point_at_previous_token) and its values are scaled up; the rest stays random."""
    attention = model.model.layers[0].self_attn
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = constant
        point_at_previous_token(attention, 0, 0, gain, rotary_frequencies(model))
        attention.v_proj.weight[:HEAD_DIM] *= value_gain


def write_induction_circuit(model, gain: float = 3.0, copy_gain: float = 10.0) -> None:
    """The whole two-layer induction circuit written into a Llama of hidden 128 with tied embeddings.

    Residual layout: a token's code in coordinates 0-63 (random, norm about 1), its predecessor's
    first 32 in 64-95, a constant 1 in 127. Every layer's output projections start at zero (the
    layers pass the residual on), except: layer 0's head 0 points at the previous token and writes
    its code's first 32 coordinates into 64-95; layer 1's heads 0 and 1 match the current token's
    code (coordinates 0-15) against the predecessor slot (64-79) on the slowest rotary pairs, whose
    rotation over a row is small, and write the matched token's code (0-31 and 32-63) back, times
    `copy_gain`: with tied embeddings that raises the matched token's logit."""
    if model.config.hidden_size != 128 or not model.config.tie_word_embeddings or model.config.num_hidden_layers < 2:
        raise ValueError("the induction circuit needs hidden 128, tied embeddings and 2 or more layers")
    slow = [d for i in range(8, 16) for d in (i, i + HEAD_DIM // 2)]  # head dims of rotary pairs 8-15
    first, second = (model.model.layers[i].self_attn for i in (0, 1))
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[:, :64] = torch.randn(embed.shape[0], 64) / 8
        embed[:, 127] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        point_at_previous_token(first, 0, 127, gain, rotary_frequencies(model))
        first.v_proj.weight[:HEAD_DIM] = 0
        for j in range(HEAD_DIM):
            first.v_proj.weight[j, j] = 1.0
            first.o_proj.weight[64 + j, j] = 1.0
        for head in (0, 1):
            rows = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
            for w in (second.q_proj.weight, second.k_proj.weight, second.v_proj.weight):
                w[rows] = 0
            for n, d in enumerate(slow):
                second.q_proj.weight[head * HEAD_DIM + d, n] = gain
                second.k_proj.weight[head * HEAD_DIM + d, 64 + n] = gain
            for j in range(HEAD_DIM):
                second.v_proj.weight[head * HEAD_DIM + j, head * HEAD_DIM + j] = 1.0
                second.o_proj.weight[head * HEAD_DIM + j, head * HEAD_DIM + j] = copy_gain
