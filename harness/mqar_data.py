"""MQAR sequences: the data the mqar suite scores and the MQAR zoo model trains on.

A sequence of `seq_len` token ids starts with `kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys
distinct, values distinct). The rest of the sequence holds every key once more, in random order,
at even offsets whose distance from the pairs follows Zoology's power law (`power_a`, most
queries come soon after the pairs); every other position there is a noise token. At each query
position the model must predict the key's value as the next token.

Token sets: keys, values and noise are disjoint ranges of the tokenizer's non-special ids (keys
first, then values, noise the rest), a function of the vocabulary only, so the suite
(harness.suites.mqar) and the model trained on the task (harness.zoo.mqar) see the same ids.
Unlike Zoology, noise never contains a key, so every key occurrence after the pairs is a query.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.suite import model_device


@dataclass(frozen=True)
class TokenSets:
    keys: torch.Tensor  # (num_keys,) token ids
    values: torch.Tensor  # (num_values,)
    noise: torch.Tensor  # every other non-special id


def token_sets(vocab_size: int, special_ids, num_keys: int, num_values: int) -> TokenSets:
    special = set(int(i) for i in special_ids)
    ids = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if len(ids) < num_keys + num_values + 1:
        raise ValueError(
            f"vocabulary of {vocab_size} tokens is too small for {num_keys} keys, {num_values} values and noise"
        )
    return TokenSets(ids[:num_keys], ids[num_keys : num_keys + num_values], ids[num_keys + num_values :])


def tokenizer_sets(tokenizer, num_keys: int, num_values: int, model=None) -> TokenSets:
    """The token sets of a tokenizer (ids the model's output layer cannot score are left out)."""
    vocab_size = len(tokenizer)
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(model_vocab, int):
        vocab_size = min(vocab_size, model_vocab)
    return token_sets(vocab_size, tokenizer.all_special_ids, num_keys, num_values)


@dataclass
class MqarBatch:
    input_ids: torch.Tensor  # (B, seq_len)
    query_positions: torch.Tensor  # (B, kv_pairs): positions holding a query key
    answers: torch.Tensor  # (B, kv_pairs): the value token each query must predict next


def _pick_distinct(
    rng: np.random.Generator, rows: int, pool: int, k: int, logits: np.ndarray | None = None
) -> np.ndarray:
    """`k` distinct indices into range(pool) per row; weighted by softmax(logits) when given
    (Gumbel top-k: the same law as drawing one at a time without replacement)."""
    scores = rng.gumbel(size=(rows, pool))
    if logits is not None:
        scores = scores + logits
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def mqar_batch(
    sets: TokenSets, num_examples: int, kv_pairs: int, seq_len: int, rng: np.random.Generator, power_a: float = 0.01
) -> MqarBatch:
    """`num_examples` MQAR sequences (see the module docstring); needs seq_len >= 4 * kv_pairs."""
    space = (seq_len - 2 * kv_pairs) // 2  # query slots: even offsets after the pairs
    if space < kv_pairs:
        raise ValueError(f"seq_len {seq_len} is too short for {kv_pairs} pairs; it needs at least {4 * kv_pairs}")
    if kv_pairs > min(len(sets.keys), len(sets.values)):
        raise ValueError(
            f"{kv_pairs} pairs need at least as many keys and values ({len(sets.keys)}, {len(sets.values)})"
        )
    B, N = num_examples, kv_pairs
    keys = sets.keys[torch.from_numpy(_pick_distinct(rng, B, len(sets.keys), N))]
    values = sets.values[torch.from_numpy(_pick_distinct(rng, B, len(sets.values), N))]
    # Zoology's gap law: p(gap) proportional to (gap + 1) ** (power_a - 1)
    gap_logits = (power_a - 1.0) * np.log(np.arange(1, space + 1))
    gaps = torch.from_numpy(_pick_distinct(rng, B, space, N, gap_logits))  # query i asks for pair i

    noise_idx = torch.from_numpy(rng.integers(0, len(sets.noise), size=(B, seq_len)))
    input_ids = sets.noise[noise_idx]
    input_ids[:, 0 : 2 * N : 2] = keys
    input_ids[:, 1 : 2 * N : 2] = values
    query_positions = 2 * N + 2 * gaps
    input_ids.scatter_(1, query_positions, keys)
    return MqarBatch(input_ids, query_positions, values)


@torch.no_grad()
def recall_hits(model, batch: MqarBatch, value_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits among the value set, hits over the full vocabulary), both (B, kv_pairs) bool."""
    device = model_device(model)
    logits = model(input_ids=batch.input_ids.to(device), use_cache=False).logits
    index = batch.query_positions.to(device)
    at_queries = logits.gather(1, index[..., None].expand(-1, -1, logits.shape[-1])).float().cpu()
    answers = batch.answers
    restricted = value_ids[at_queries[..., value_ids].argmax(-1)]
    return restricted == answers, at_queries.argmax(-1) == answers
