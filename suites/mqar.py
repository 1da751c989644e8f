"""mqar: multi-query associative recall (Zoology; Arora et al. 2023), the standard probe of how
many key-value associations a recurrent state holds: exactly what key-dimension pruning shrinks.

A sequence of `seq_len` token ids starts with `kv_pairs` key-value pairs `k1 v1 k2 v2 ...` (keys
distinct, values distinct). The rest of the sequence holds every key once more, in random order,
at even offsets whose distance from the pairs follows Zoology's power law (`power_a`, most
queries come soon after the pairs); every other position there is a noise token. At each query
position the model must predict the key's value as the next token. Scoring is teacher-forced
(one forward, `model(input_ids).logits`): the prediction is the argmax of the logits restricted
to the value set, so chance is 1 / num_values; `acc_full_vocab` in the details takes the argmax
over the whole vocabulary, as Zoology does.

Token sets: keys, values and noise are disjoint ranges of the tokenizer's non-special ids (keys
first, then values, noise the rest), a function of the vocabulary only, so a model trained on
this task (harness.zoo.mqar) sees the same ids here. Unlike Zoology, noise never contains a key,
so every key occurrence after the pairs is a query.

Rows: `acc/kv{N}/len{L}` per setting (scope "setting"), `acc/kv{N}` averaged over lengths
(scope "kv_pairs"), and `acc`, the mean over settings (scope "summary"). Values are fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.params import parse_ints
from harness.suite import Headline, Metric, Suite, SuiteContext
from harness.suites.ruler import model_device


@dataclass(frozen=True)
class TokenSets:
    keys: torch.Tensor  # (num_keys,) token ids
    values: torch.Tensor  # (num_values,)
    noise: torch.Tensor  # every other non-special id


def token_sets(vocab_size: int, special_ids, num_keys: int, num_values: int) -> TokenSets:
    special = set(int(i) for i in special_ids)
    ids = torch.tensor([i for i in range(vocab_size) if i not in special], dtype=torch.long)
    if len(ids) < num_keys + num_values + 1:
        raise ValueError(f"vocabulary of {vocab_size} tokens is too small for {num_keys} keys, {num_values} values "
                         "and noise")
    return TokenSets(ids[:num_keys], ids[num_keys:num_keys + num_values], ids[num_keys + num_values:])


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


def _pick_distinct(rng: np.random.Generator, rows: int, pool: int, k: int, logits: np.ndarray | None = None) -> np.ndarray:
    """`k` distinct indices into range(pool) per row; weighted by softmax(logits) when given
    (Gumbel top-k: the same law as drawing one at a time without replacement)."""
    scores = rng.gumbel(size=(rows, pool))
    if logits is not None:
        scores = scores + logits
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def mqar_batch(sets: TokenSets, num_examples: int, kv_pairs: int, seq_len: int, rng: np.random.Generator,
               power_a: float = 0.01) -> MqarBatch:
    """`num_examples` MQAR sequences (see the module docstring); needs seq_len >= 4 * kv_pairs."""
    space = (seq_len - 2 * kv_pairs) // 2  # query slots: even offsets after the pairs
    if space < kv_pairs:
        raise ValueError(f"seq_len {seq_len} is too short for {kv_pairs} pairs; it needs at least {4 * kv_pairs}")
    if kv_pairs > min(len(sets.keys), len(sets.values)):
        raise ValueError(f"{kv_pairs} pairs need at least as many keys and values ({len(sets.keys)}, {len(sets.values)})")
    B, N = num_examples, kv_pairs
    keys = sets.keys[torch.from_numpy(_pick_distinct(rng, B, len(sets.keys), N))]
    values = sets.values[torch.from_numpy(_pick_distinct(rng, B, len(sets.values), N))]
    # Zoology's gap law: p(gap) proportional to (gap + 1) ** (power_a - 1)
    gap_logits = (power_a - 1.0) * np.log(np.arange(1, space + 1))
    gaps = torch.from_numpy(_pick_distinct(rng, B, space, N, gap_logits))  # query i asks for pair i

    noise_idx = torch.from_numpy(rng.integers(0, len(sets.noise), size=(B, seq_len)))
    input_ids = sets.noise[noise_idx]
    input_ids[:, 0:2 * N:2] = keys
    input_ids[:, 1:2 * N:2] = values
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


@dataclass
class MqarSuite(Suite):
    name = "mqar"
    description = "multi-query associative recall (Zoology): accuracy per (kv pairs, sequence length)"
    headlines = (Headline("acc", "MQAR recall", "higher", "fraction"),)

    kv_pairs: str = "4,8,16,32"  # comma-separated key-value counts
    seq_lens: str = "128,256"  # comma-separated sequence lengths; settings with seq_len < 4 * kv are skipped
    num_keys: int = 64
    num_values: int = 64  # chance accuracy is 1 / num_values
    limit: int = 32  # sequences per setting
    batch_size: int = 32
    power_a: float = 0.01  # Zoology's query-distance power law

    def validate(self) -> None:
        pairs = parse_ints(self.kv_pairs, "kv_pairs")
        parse_ints(self.seq_lens, "seq_lens")
        if not self.settings():
            raise ValueError(f"no setting has seq_len >= 4 * kv_pairs (kv_pairs={self.kv_pairs}, seq_lens={self.seq_lens})")
        if self.num_keys < max(pairs) or self.num_values < max(pairs):
            raise ValueError(f"num_keys and num_values must be >= the largest kv_pairs ({max(pairs)}), "
                             f"got {self.num_keys} and {self.num_values}")
        if self.limit < 1 or self.batch_size < 1:
            raise ValueError("limit and batch_size must be >= 1")
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

    def settings(self) -> list[tuple[int, int]]:
        """(kv_pairs, seq_len) pairs to evaluate."""
        return [(n, length) for n in parse_ints(self.kv_pairs, "kv_pairs")
                for length in parse_ints(self.seq_lens, "seq_lens") if length >= 4 * n]

    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        sets = tokenizer_sets(tokenizer, self.num_keys, self.num_values, model)
        settings = self.settings()
        advance = ctx.progress("mqar", len(settings) * self.limit)
        chance = 1.0 / self.num_values
        rows, by_kv = [], {}
        for n, length in settings:
            rng = np.random.default_rng([ctx.seed, n, length])
            data = mqar_batch(sets, self.limit, n, length, rng, self.power_a)
            hits, hits_full = [], []
            for start in range(0, self.limit, self.batch_size):
                part = MqarBatch(*(t[start:start + self.batch_size] for t in
                                   (data.input_ids, data.query_positions, data.answers)))
                restricted, full = recall_hits(model, part, sets.values)
                hits.append(restricted)
                hits_full.append(full)
                advance(len(part.input_ids))
            acc = torch.cat(hits).float().mean().item()
            by_kv.setdefault(n, []).append(acc)
            rows.append(Metric(f"acc/kv{n}/len{length}", acc, "fraction", {
                "scope": "setting", "kv_pairs": n, "seq_len": length, "sequences": self.limit,
                "queries": self.limit * n, "chance": chance,
                "acc_full_vocab": torch.cat(hits_full).float().mean().item()}))
        for n, accs in by_kv.items():
            rows.append(Metric(f"acc/kv{n}", float(np.mean(accs)), "fraction",
                               {"scope": "kv_pairs", "kv_pairs": n, "settings": len(accs), "chance": chance}))
        rows.append(Metric("acc", float(np.mean([r.value for r in rows if r.details["scope"] == "setting"])),
                           "fraction", {"scope": "summary", "settings": len(settings), "chance": chance,
                                        "num_keys": self.num_keys, "num_values": self.num_values}))
        return rows
