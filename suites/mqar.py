"""mqar: multi-query associative recall (Zoology; Arora et al. 2023), the standard probe of how
many key-value associations a recurrent state holds: exactly what key-dimension pruning shrinks.

The sequences and token sets are `harness.mqar_data`'s (shared with the MQAR zoo model):
`kv_pairs` key-value pairs, then every key once more as a query among noise tokens, at distances
following Zoology's power law (`power_a`); at each query the model must predict the key's value.
Scoring is teacher-forced (one forward, `model(input_ids).logits`): the prediction is the argmax of the logits restricted
to the value set, so chance is 1 / num_values; `acc_full_vocab` in the details takes the argmax
over the whole vocabulary, as Zoology does.

Rows: `acc/kv{N}/len{L}` per setting (scope "setting"), `acc/kv{N}` averaged over lengths
(scope "kv_pairs"), and `acc`, the mean over settings (scope "summary"). Values are fractions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from harness.mqar_data import MqarBatch, mqar_batch, recall_hits, tokenizer_sets
from harness.params import parse_ints
from harness.suite import Headline, Metric, Suite, SuiteContext


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
            raise ValueError(
                f"no setting has seq_len >= 4 * kv_pairs (kv_pairs={self.kv_pairs}, seq_lens={self.seq_lens})"
            )
        if self.num_keys < max(pairs) or self.num_values < max(pairs):
            raise ValueError(
                f"num_keys and num_values must be >= the largest kv_pairs ({max(pairs)}), "
                f"got {self.num_keys} and {self.num_values}"
            )
        if self.limit < 1 or self.batch_size < 1:
            raise ValueError("limit and batch_size must be >= 1")
        if not 0.0 < self.power_a <= 1.0:
            raise ValueError(f"power_a must be in (0, 1], got {self.power_a}")

    def settings(self) -> list[tuple[int, int]]:
        """(kv_pairs, seq_len) pairs to evaluate."""
        return [
            (n, length)
            for n in parse_ints(self.kv_pairs, "kv_pairs")
            for length in parse_ints(self.seq_lens, "seq_lens")
            if length >= 4 * n
        ]

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
                part = MqarBatch(
                    *(t[start : start + self.batch_size] for t in (data.input_ids, data.query_positions, data.answers))
                )
                restricted, full = recall_hits(model, part, sets.values)
                hits.append(restricted)
                hits_full.append(full)
                advance(len(part.input_ids))
            acc = torch.cat(hits).float().mean().item()
            by_kv.setdefault(n, []).append(acc)
            rows.append(
                Metric(
                    f"acc/kv{n}/len{length}",
                    acc,
                    "fraction",
                    {
                        "scope": "setting",
                        "kv_pairs": n,
                        "seq_len": length,
                        "sequences": self.limit,
                        "queries": self.limit * n,
                        "chance": chance,
                        "acc_full_vocab": torch.cat(hits_full).float().mean().item(),
                    },
                )
            )
        for n, accs in by_kv.items():
            rows.append(
                Metric(
                    f"acc/kv{n}",
                    float(np.mean(accs)),
                    "fraction",
                    {"scope": "kv_pairs", "kv_pairs": n, "settings": len(accs), "chance": chance},
                )
            )
        rows.append(
            Metric(
                "acc",
                float(np.mean([r.value for r in rows if r.details["scope"] == "setting"])),
                "fraction",
                {
                    "scope": "summary",
                    "settings": len(settings),
                    "chance": chance,
                    "num_keys": self.num_keys,
                    "num_values": self.num_values,
                },
            )
        )
        return rows
