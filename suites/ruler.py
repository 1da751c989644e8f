"""ruler: RULER's synthetic long-context tasks (Hsieh et al. 2024), generated offline at chosen
token lengths with the model's own tokenizer, scored by RULER's string match.

Tasks (see harness.suites.ruler_tasks): niah_single, niah_multikey, niah_multivalue,
niah_multiquery, vt (variable tracking), cwe (common words), fwe (frequent words); by default the
first five (`DEFAULT_TASKS`: cwe and fwe need counting over the whole context, which no zoo model
learned), `tasks=all` for the seven. The needle
haystack is the embedded corpus's train split (or `text_file`). Samples are a pure function of
(ctx.seed, task, length, index), so raising `limit` only adds samples.

Generation: greedy, on left-padded batches (`generate_continuations`, usable by any suite):
through the static CUDA-graph decode loop on a GPU where it applies (`harness.graph_decode`), else
`model.generate(input_ids, attention_mask=..., max_new_tokens=..., do_sample=False)`.
Scoring, as RULER: the continuation is stripped and control characters become newlines; a sample
scores the fraction of its expected strings found in it, case-insensitive (`string_match_all`,
RULER's metric for all of these tasks); `string_match_part` (1 if any is found) is in the details.

Rows (percent, 0-100): `{task}/{length}` (scope "task_length"), `{task}` averaged over lengths
(scope "task"), `avg/{length}` averaged over tasks (scope "length") and `avg` (scope "summary").
Every prompt, answer and continuation goes to `ruler_predictions.jsonl` in the run's artifacts.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import torch

from harness import graph_decode
from harness.calibration import load_text
from harness.suite import Headline, Metric, Suite, SuiteContext, model_device
from harness.suites.ruler_tasks import TASKS, Sample, make_haystack, make_sample

CONTROL_CHARS = re.compile(r"[\x00-\x1f]")
# the default task set: retrieval (niah x4) and multi-hop tracing (vt). cwe and fwe, RULER's
# aggregation tasks (count word frequencies over the whole context), are left out by default: no
# model of the zoo is trained to count, all score 0 on them, and a 0 for every method only dilutes
# the average; `tasks=all` runs them
DEFAULT_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")


# ------------------------------------------------------------------------------------ generation


def pad_id_of(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (BOS where it adds one)."""
    return tokenizer(prompt)["input_ids"]


def left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate_continuations(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8, advance=None
) -> list[str]:
    """Greedy continuations of `prompts` (decoded, special tokens dropped), in the input order.

    Prompts are batched by length (left padding), so one long prompt does not pad many short ones."""
    device, pad_id = model_device(model), pad_id_of(tokenizer)
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_padded([encoded[i] for i in chunk], pad_id)
        generated = graph_decode.generate_or_fallback(
            model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id
        )
        for row, i in enumerate(chunk):
            out[i] = tokenizer.decode(generated[row, ids.shape[1] :].tolist(), skip_special_tokens=True)
        if advance is not None:
            advance(len(chunk))
    return out


# ------------------------------------------------------------------------------------ scoring


def postprocess(prediction: str) -> str:
    """RULER's clean-up: strip, control characters to newlines, strip again."""
    return CONTROL_CHARS.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, answers) -> float:
    """Fraction of the expected strings found in the prediction (case-insensitive)."""
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def string_match_part(prediction: str, answers) -> float:
    """1 if any expected string is found in the prediction (case-insensitive), else 0."""
    text = prediction.lower()
    return float(any(a.lower() in text for a in answers))


# ------------------------------------------------------------------------------------ suite


def _names(text: str, what: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"{what} is empty")
    if allowed is not None:
        bad = [n for n in names if n not in allowed]
        if bad:
            raise ValueError(f"unknown {what[:-1]} {bad[0]!r}; choose from: {', '.join(allowed)} (or all)")
    return list(dict.fromkeys(names))


@dataclass
class RulerSuite(Suite):
    name = "ruler"
    description = "RULER synthetic tasks (default niah x4 and vt; cwe, fwe with tasks=all) at chosen token lengths; string-match scores"
    headlines = (Headline("avg", "RULER", "higher", "percent"),)

    lengths: str = "512,1024"  # comma-separated target lengths in tokens (prompt + generation budget)
    tasks: str = ",".join(DEFAULT_TASKS)  # comma-separated subset of the tasks, or all
    limit: int = 4  # samples per task and length
    batch_size: int = 8
    max_new_tokens: int = 0  # 0: each task's answer-sized budget (harness.suites.ruler_tasks)
    text_file: str | None = None  # haystack text for the niah tasks and the word lists (default: embedded corpus)

    def validate(self) -> None:
        lengths = self.length_list()
        if min(lengths) < 64:
            raise ValueError(f"lengths must be >= 64 tokens, got {self.lengths!r}")
        self.task_list()
        if self.limit < 1 or self.batch_size < 1:
            raise ValueError("limit and batch_size must be >= 1")
        if self.max_new_tokens < 0 or (self.max_new_tokens and self.max_new_tokens >= min(lengths)):
            raise ValueError(
                f"max_new_tokens must be 0 (task budgets) or below the shortest length, got {self.max_new_tokens}"
            )

    def length_list(self) -> list[int]:
        try:
            return sorted({int(x) for x in _names(self.lengths, "lengths")})
        except ValueError as exc:
            if "empty" in str(exc):
                raise
            raise ValueError(f"lengths must be comma-separated integers, got {self.lengths!r}") from None

    def task_list(self) -> list[str]:
        if str(self.tasks).strip() == "all":
            return list(TASKS)
        return _names(self.tasks, "tasks", TASKS)

    def samples(self, tokenizer, seed: int) -> list[Sample]:
        haystack = make_haystack(load_text(self.text_file, split="train"))
        count = lambda prompt: len(encode_prompt(tokenizer, prompt))  # noqa: E731
        return [
            make_sample(task, length, index, seed, haystack, count, self.max_new_tokens)
            for length in self.length_list()
            for task in self.task_list()
            for index in range(self.limit)
        ]

    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        samples = self.samples(tokenizer, ctx.seed)
        advance = ctx.progress("ruler", len(samples))
        groups: dict[tuple[str, int], list[Sample]] = {}
        for sample in samples:
            groups.setdefault((sample.task, sample.length), []).append(sample)
        records, rows = [], []
        for (task, length), group in groups.items():
            outputs = generate_continuations(
                model, tokenizer, [s.prompt for s in group], group[0].max_new_tokens, self.batch_size, advance
            )
            scores_all, scores_part = [], []
            for sample, output in zip(group, outputs):
                prediction = postprocess(output)
                scores_all.append(string_match_all(prediction, sample.answers))
                scores_part.append(string_match_part(prediction, sample.answers))
                records.append({**asdict(sample), "prediction": prediction, "score": scores_all[-1]})
            rows.append(
                Metric(
                    f"{task}/{length}",
                    100 * sum(scores_all) / len(group),
                    "%",
                    {
                        "scope": "task_length",
                        "task": task,
                        "length": length,
                        "samples": len(group),
                        "metric": "string_match_all",
                        "string_match_part": 100 * sum(scores_part) / len(group),
                        "prompt_tokens_mean": sum(s.prompt_tokens for s in group) / len(group),
                        "max_new_tokens": group[0].max_new_tokens,
                        "example": {"answers": list(group[0].answers), "prediction": postprocess(outputs[0])[:200]},
                    },
                )
            )
        rows += self.summary_rows(rows)
        self.save_predictions(ctx, records)
        return rows

    def summary_rows(self, cells: list[Metric]) -> list[Metric]:
        def mean(values):
            return sum(values) / len(values)

        out = []
        for task in self.task_list():
            values = [m.value for m in cells if m.details["task"] == task]
            out.append(Metric(task, mean(values), "%", {"scope": "task", "task": task, "lengths": len(values)}))
        for length in self.length_list():
            values = [m.value for m in cells if m.details["length"] == length]
            out.append(
                Metric(f"avg/{length}", mean(values), "%", {"scope": "length", "length": length, "tasks": len(values)})
            )
        out.append(
            Metric(
                "avg",
                mean([m.value for m in cells]),
                "%",
                {
                    "scope": "summary",
                    "tasks": self.task_list(),
                    "lengths": self.length_list(),
                    "samples_per_cell": self.limit,
                    "metric": "string_match_all",
                },
            )
        )
        return out

    @staticmethod
    def save_predictions(ctx: SuiteContext, records: list[dict]) -> None:
        if ctx.artifacts is None:
            return
        ctx.artifacts.mkdir(parents=True, exist_ok=True)
        with (ctx.artifacts / "ruler_predictions.jsonl").open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
