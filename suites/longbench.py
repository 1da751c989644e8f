"""LongBench (Bai et al., ACL 2024, arXiv 2308.14508): long-context tasks from local JSONL files.

Data: LongBench's own files, one `<subset>.jsonl` per subset in `data_dir` (fields `input`,
`context`, `answers`, `all_classes`, `length`; the folder of LongBench's `data.zip`, see
https://huggingface.co/datasets/THUDM/LongBench). Without `data_dir` the suite logs one line and
returns no rows, so `--suite all` stays runnable offline; it never invents scores.

Protocol, as LongBench's pred.py / eval.py do it (our own code):
- prompt = template.format(**row); a prompt over `max_length` tokens keeps its first and last
  `max_length // 2` tokens (truncation from the middle), decoded back to text;
- greedy decoding (left-padded batches; the static CUDA-graph loop on a GPU where it applies,
  `harness.graph_decode`, else `model.generate`), `max_new_tokens` per subset;
  samsum also stops at a newline and generates at least one token;
- a chat template (option `chat_template`) is applied except on the few-shot and code subsets;
- for trec, triviaqa, samsum, lsht only the first line of the prediction is scored;
- each example scores the max over its answers; a subset scores 100 * mean (LongBench's scale).
Prompts: LongBench's official templates live in its `config/dataset2prompt.json`, which we do not
copy: pass that file as `prompts_file` (and `config/dataset2maxlen.json` as `maxlen_file`). Without
it the suite uses short generic templates written for this harness: NOT the official prompts, so
scores are then comparable between our runs only (each row says which prompts it used).
"""

from __future__ import annotations

import json
import logging
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from harness import graph_decode
from harness.errors import HarnessError
from harness.suite import Headline, Metric, Suite, SuiteContext

DATA_HINT = (
    "get LongBench's data from https://huggingface.co/datasets/THUDM/LongBench (data.zip) "
    "and pass its data folder as data_dir"
)
CATEGORIES = {
    "single_doc_qa": ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh"),
    "multi_doc_qa": ("hotpotqa", "2wikimqa", "musique", "dureader"),
    "summarization": ("gov_report", "qmsum", "multi_news", "vcsum"),
    "few_shot": ("trec", "triviaqa", "samsum", "lsht"),
    "synthetic": ("passage_count", "passage_retrieval_en", "passage_retrieval_zh"),
    "code": ("lcc", "repobench-p"),
}
ALL_SUBSETS = tuple(s for group in CATEGORIES.values() for s in group)
CHINESE = ("multifieldqa_zh", "dureader", "vcsum", "lsht", "passage_retrieval_zh")
SUBSET_GROUPS = {
    "all": ALL_SUBSETS,
    "en": tuple(s for s in ALL_SUBSETS if s not in CHINESE),
    "e": tuple(
        f"{s}_e"
        for s in (
            "qasper",
            "multifieldqa_en",
            "hotpotqa",
            "2wikimqa",
            "gov_report",
            "multi_news",
            "trec",
            "triviaqa",
            "samsum",
            "passage_count",
            "passage_retrieval_en",
            "lcc",
            "repobench-p",
        )
    ),
}
# max new tokens per subset (LongBench's dataset2maxlen.json values; numbers, used when no maxlen_file)
MAX_NEW_TOKENS = {
    "narrativeqa": 128,
    "qasper": 128,
    "multifieldqa_en": 64,
    "multifieldqa_zh": 64,
    "hotpotqa": 32,
    "2wikimqa": 32,
    "musique": 32,
    "dureader": 128,
    "gov_report": 512,
    "qmsum": 512,
    "multi_news": 512,
    "vcsum": 512,
    "trec": 64,
    "triviaqa": 32,
    "samsum": 128,
    "lsht": 64,
    "passage_count": 32,
    "passage_retrieval_en": 32,
    "passage_retrieval_zh": 32,
    "lcc": 64,
    "repobench-p": 64,
}
NO_CHAT = ("trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p")  # raw prompts even for chat models
FIRST_LINE_ONLY = ("trec", "triviaqa", "samsum", "lsht")

# Generic templates written for this harness (NOT LongBench's official prompts; see the docstring).
_QA = "Answer the question from the text below, as briefly as possible.\n\n{context}\n\nQuestion: {input}\nAnswer:"
GENERIC_PROMPTS = {
    **{s: _QA for s in CATEGORIES["single_doc_qa"] + CATEGORIES["multi_doc_qa"]},
    "gov_report": "Summarize the report below.\n\n{context}\n\nSummary:",
    "multi_news": "Summarize the news articles below.\n\n{context}\n\nSummary:",
    "vcsum": "Summarize the meeting transcript below.\n\n{context}\n\nSummary:",
    "qmsum": "Answer the query about the transcript below.\n\n{context}\n\nQuery: {input}\nAnswer:",
    **{s: "{context}\n{input}" for s in CATEGORIES["few_shot"]},
    "passage_count": "{context}\n\nHow many distinct paragraphs are above (duplicates count once)? "
    "Reply with one number.\nAnswer:",
    "passage_retrieval_en": "{context}\n\nWhich paragraph above does this summary describe? "
    'Reply like "Paragraph 3".\n\nSummary: {input}\nAnswer:',
    "passage_retrieval_zh": "{context}\n\nWhich paragraph above does this summary describe? "
    'Reply like "段落3".\n\nSummary: {input}\nAnswer:',
    "lcc": "Complete the next line of code.\n{context}",
    "repobench-p": "Complete the next line of code.\n{context}{input}",
}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- metrics (LongBench's definitions)


def normalize_answer(text: str) -> str:
    """Lowercase; drop ASCII punctuation, the articles a/an/the, and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


_ZH_PUNCTUATION = set(string.punctuation) | set(
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠"
    "｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)


def normalize_zh_answer(text: str) -> str:
    """Lowercase; drop ASCII and CJK punctuation and all whitespace."""
    return "".join(ch for ch in text.lower() if ch not in _ZH_PUNCTUATION and not ch.isspace())


def _jieba_words(text: str) -> list[str]:
    try:
        import jieba
    except ImportError:
        raise HarnessError(
            "LongBench's Chinese subsets are scored on jieba word segmentation: pip install jieba"
        ) from None
    return list(jieba.cut(text, cut_all=False))


def token_f1(prediction: list[str], truth: list[str]) -> float:
    same = sum((Counter(prediction) & Counter(truth)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, truth: str, **_) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(truth).split())


def qa_f1_zh(prediction: str, truth: str, **_) -> float:
    def words(text):
        return [w for w in (normalize_zh_answer(t) for t in _jieba_words(text)) if w]

    return token_f1(words(prediction), words(truth))


class _WhitespaceTokens:
    def tokenize(self, text: str) -> list[str]:
        return text.split()


def rouge_l(prediction: str, truth: str, *, tokenizer=None, **_) -> float:
    """ROUGE-L F-measure from the rouge-score package (its default tokenizer: lowercase alphanumeric
    words, no stemming). LongBench uses the `rouge` package, whose tokenization and summary-level
    LCS differ: our summarization scores compare across our runs, not digit for digit with theirs."""
    from rouge_score import rouge_scorer

    if not prediction.strip() or not truth.strip():
        return 0.0
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizer).score(truth, prediction)["rougeL"].fmeasure


def rouge_l_zh(prediction: str, truth: str, **_) -> float:
    return rouge_l(" ".join(_jieba_words(prediction)), " ".join(_jieba_words(truth)), tokenizer=_WhitespaceTokens())


def classification_acc(prediction: str, truth: str, *, all_classes, **_) -> float:
    """1/k when the true class is among the k class names found in the prediction, else 0. Class
    names that are proper substrings of the true class are dropped first, with LongBench's loop
    quirk reproduced: its removal inside a for-loop skips the element after each removed one."""
    found = [name for name in all_classes if name in prediction]
    i = 0
    while i < len(found):
        if found[i] in truth and found[i] != truth:
            del found[i]
        i += 1  # also after a removal: the quirk
    return 1.0 / len(found) if truth in found else 0.0


def _number_share(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == wanted for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_acc(prediction: str, truth: str, **_) -> float:
    """Share of the numbers in the prediction that equal the true paragraph's number."""
    return _number_share(prediction, re.findall(r"Paragraph (\d+)", truth)[0])


def retrieval_acc_zh(prediction: str, truth: str, **_) -> float:
    return _number_share(prediction, re.findall(r"段落(\d+)", truth)[0])


def count_acc(prediction: str, truth, **_) -> float:
    """Share of the numbers in the prediction that equal the true count."""
    return _number_share(prediction, str(truth))


def code_sim(prediction: str, truth: str, **_) -> float:
    """Edit similarity of the first prediction line that is not a comment or a code fence
    (after leading newlines), to the true line: fuzzywuzzy's integer ratio / 100, via rapidfuzz."""
    from rapidfuzz import fuzz

    line = next((x for x in prediction.lstrip("\n").split("\n") if not any(m in x for m in ("`", "#", "//"))), "")
    return round(fuzz.ratio(line, truth)) / 100


METRIC_OF = {
    **{s: qa_f1 for s in ("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa")},
    "multifieldqa_zh": qa_f1_zh,
    "dureader": rouge_l_zh,
    "vcsum": rouge_l_zh,
    **{s: rouge_l for s in ("gov_report", "qmsum", "multi_news", "samsum")},
    "trec": classification_acc,
    "lsht": classification_acc,
    "passage_retrieval_en": retrieval_acc,
    "passage_retrieval_zh": retrieval_acc_zh,
    "passage_count": count_acc,
    "lcc": code_sim,
    "repobench-p": code_sim,
}


def base_subset(subset: str) -> str:
    return subset[:-2] if subset.endswith("_e") else subset


def example_score(subset: str, prediction: str, answers: list, all_classes) -> float:
    base = base_subset(subset)
    if base in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    return max((METRIC_OF[base](prediction, truth, all_classes=all_classes) for truth in answers), default=0.0)


def length_bucket(length: int) -> str:
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"  # LongBench-E's intervals


# ---------------------------------------------------------------- data, prompts, generation


def read_subset(data_dir: Path, subset: str, limit: int = 0) -> list[dict]:
    path = data_dir / f"{subset}.jsonl"
    if not path.is_file():
        raise HarnessError(f"LongBench subset file {path} not found; {DATA_HINT}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row.get("answers"), list):
                raise HarnessError(f"{path}:{number} has no `answers` list; is this LongBench's data?")
            rows.append(row)
    return rows[:limit] if limit else rows


def _json_file(path: str, what: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise HarnessError(f"{what} {path} not found; it is LongBench's config/{what.split()[0]} from its repository")
    return json.loads(file.read_text(encoding="utf-8"))


def truncate_middle(prompt: str, tokenizer, max_length: int) -> str:
    ids = tokenizer(prompt)["input_ids"]
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    head, tail = ids[:half], ids[-half:]
    return tokenizer.decode(head, skip_special_tokens=True) + tokenizer.decode(tail, skip_special_tokens=True)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_at_newline: bool) -> list[str]:
    """Greedy continuations of token-id prompts, left-padded into one batch."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    extra = {}
    if stop_at_newline:  # samsum: models otherwise keep writing further dialogues
        stops = (tokenizer.eos_token_id, tokenizer.encode("\n", add_special_tokens=False)[-1])
        extra = {"eos_token_id": [t for t in stops if t is not None], "min_new_tokens": 1}
    device = next(model.parameters()).device
    out = graph_decode.generate_or_fallback(
        model,
        ids.to(device),
        mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        **extra,
    )
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


@dataclass
class LongBenchSuite(Suite):
    name = "longbench"
    description = "LongBench subsets from local JSONL, official metrics (prompts: official file or generic)"
    headlines = (Headline("avg", "LongBench", "higher", "percent"),)

    data_dir: str | None = None  # folder with LongBench's <subset>.jsonl files (none: no rows)
    subsets: str = "en"  # comma-separated names, or a group: all (21), en (16 English + code), e (LongBench-E)
    prompts_file: str | None = None  # LongBench's config/dataset2prompt.json (none: generic, not official)
    maxlen_file: str | None = None  # LongBench's config/dataset2maxlen.json (none: its values, built in)
    max_length: int = 3500  # prompt tokens kept (middle truncation); LongBench uses 3500 for 4k models
    limit: int = 0  # examples per subset at most (0 = all)
    batch_size: int = 1
    chat_template: bool = False  # wrap prompts in the tokenizer's chat template (not on few-shot / code)

    def validate(self) -> None:
        if self.max_length < 16 or self.limit < 0 or self.batch_size < 1:
            raise ValueError("need max_length >= 16, limit >= 0 and batch_size >= 1")
        unknown = [s for s in self.subset_names() if base_subset(s) not in METRIC_OF]
        if unknown:
            raise ValueError(
                f"unknown LongBench subset {unknown[0]!r}; known: {', '.join(ALL_SUBSETS)} "
                f"(add _e for LongBench-E), or a group: {', '.join(SUBSET_GROUPS)}"
            )
        if self.data_dir is not None:  # fail before any model is loaded
            folder = Path(self.data_dir).expanduser()
            if not folder.is_dir():
                raise HarnessError(f"LongBench data_dir {self.data_dir} is not a folder; {DATA_HINT}")
            for subset in self.subset_names():
                if not (folder / f"{subset}.jsonl").is_file():
                    raise HarnessError(
                        f"LongBench subset file {folder / f'{subset}.jsonl'} not found; {DATA_HINT}, "
                        "or pick present subsets with subsets=..."
                    )

    def subset_names(self) -> list[str]:
        names = []
        for part in (p.strip() for p in self.subsets.split(",") if p.strip()):
            names += SUBSET_GROUPS.get(part, (part,))
        return list(dict.fromkeys(names))

    def _prompt_config(self, subsets: list[str]) -> tuple[dict, dict, str]:
        prompts = _json_file(self.prompts_file, "dataset2prompt.json file") if self.prompts_file else GENERIC_PROMPTS
        maxlen = _json_file(self.maxlen_file, "dataset2maxlen.json file") if self.maxlen_file else MAX_NEW_TOKENS
        for subset in map(base_subset, subsets):
            if subset not in prompts or subset not in maxlen:
                where = self.prompts_file if subset not in prompts else self.maxlen_file
                raise HarnessError(f"{where} has no entry for LongBench subset {subset!r}")
        return prompts, maxlen, "official" if self.prompts_file else "generic (not LongBench's official prompts)"

    def _encode(self, prompt: str, subset: str, tokenizer) -> list[int]:
        prompt = truncate_middle(prompt, tokenizer, self.max_length)
        if self.chat_template and base_subset(subset) not in NO_CHAT:
            if not getattr(tokenizer, "chat_template", None):
                raise HarnessError("chat_template=true but the tokenizer has no chat template")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True, return_dict=False
            )
        return tokenizer(prompt)["input_ids"]

    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        if self.data_dir is None:
            log.warning("longbench: no data_dir given, so no rows (nothing is scored); %s", DATA_HINT)
            return []
        subsets, data_dir = self.subset_names(), Path(self.data_dir).expanduser()
        prompts, maxlen, prompt_source = self._prompt_config(subsets)
        data = {s: read_subset(data_dir, s, self.limit) for s in subsets}
        advance = ctx.progress("longbench", sum(len(rows) for rows in data.values()))
        torch.manual_seed(ctx.seed)  # greedy decoding is deterministic; this only pins any sampling default
        rows, scores = [], {}
        for subset, examples in data.items():
            base = base_subset(subset)
            encoded = [self._encode(prompts[base].format(**ex), subset, tokenizer) for ex in examples]
            predictions = []
            for b in range(0, len(encoded), self.batch_size):
                predictions += generate_batch(
                    model,
                    tokenizer,
                    encoded[b : b + self.batch_size],
                    int(maxlen[base]),
                    stop_at_newline=base == "samsum",
                )
                advance(len(encoded[b : b + self.batch_size]))
            per_example = [
                example_score(subset, p, ex["answers"], ex.get("all_classes")) for p, ex in zip(predictions, examples)
            ]
            scores[subset] = 100 * sum(per_example) / max(len(per_example), 1)
            details = {
                "subset": subset,
                "examples": len(examples),
                "prompts": prompt_source,
                "max_length": self.max_length,
            }
            rows.append(Metric(f"{subset}.{METRIC_OF[base].__name__}", scores[subset], "%", details))
            if subset.endswith("_e"):
                buckets: dict[str, list[float]] = {}
                for s, ex in zip(per_example, examples):
                    buckets.setdefault(length_bucket(int(ex.get("length", 0))), []).append(s)
                for bucket, values in sorted(buckets.items()):
                    rows.append(
                        Metric(
                            f"{subset}.{METRIC_OF[base].__name__}.{bucket}",
                            100 * sum(values) / len(values),
                            "%",
                            {**details, "examples": len(values)},
                        )
                    )
        for category, members in CATEGORIES.items():
            present = [scores[s] for s in subsets if base_subset(s) in members]
            if present:
                rows.append(
                    Metric(
                        f"category.{category}",
                        sum(present) / len(present),
                        "%",
                        {"subsets": [s for s in subsets if base_subset(s) in members]},
                    )
                )
        rows.append(
            Metric("avg", sum(scores.values()) / len(scores), "%", {"subsets": subsets, "prompts": prompt_source})
        )
        return rows
