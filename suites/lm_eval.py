"""lm-eval suite: EleutherAI's lm-evaluation-harness over the in-memory (compressed) model.

The model object is wrapped by lm-eval's own HF adapter (`HFLM(pretrained=<model>, tokenizer=...)`)
and evaluated through `lm_eval.simple_evaluate`, so every number is lm-eval's. Any lm-eval task
name works (Paper A's list is `PAPER_A_TASKS`) when its dataset is in the local Hugging Face
cache; the run is kept offline unless `allow_download` is set.

The default tasks need no download: two task configs shipped in `lm_eval_tasks/` read rows that
this suite writes at run time from the held-out split of the embedded corpus (or `text_file`):
- `kc_heldout_ppl`: rolling-window perplexity of each held-out document (as lm-eval's wikitext);
- `kc_heldout_continuation`: pick a held-out sentence's true second half among second halves of
  other sentences (multiple choice, gold position shuffled).
The rows go to `<artifacts>/lm_eval_data/` and reach the task loaders through the task manager's
metadata (`kc_data_dir`), so the same YAMLs run from lm-eval's CLI too (see their headers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from harness.calibration import load_text
from harness.errors import HarnessError
from harness.suite import Headline, Metric, Suite, SuiteContext

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
PPL_TASK = "kc_heldout_ppl"
CHOICE_TASK = "kc_heldout_continuation"
LOCAL_TASKS = (PPL_TASK, CHOICE_TASK)
PAPER_A_TASKS = "wikitext,lambada_openai,piqa,hellaswag,winogrande,arc_easy,arc_challenge"
DATA_DIR_KEY = "kc_data_dir"
DOC_SEPARATOR = "\n\n\n"  # the embedded corpus joins its documents with two blank lines
UNITS = {"bits_per_byte": "bits/byte"}


# ---------------------------------------------------------------- local task data


def split_documents(text: str) -> list[str]:
    """Documents of a text: parts separated by two blank lines (the corpus's own separator)."""
    return [doc.strip() for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def _sentences(document: str) -> list[str]:
    """Prose sentences of a docstring document; code examples and indented blocks are skipped."""
    out = []
    for paragraph in re.split(r"\n\s*\n", document):
        lines = paragraph.splitlines()
        if any(line.startswith((" ", "\t", ">>>", "...")) for line in lines):
            continue
        prose = " ".join(line.strip() for line in lines)
        out += re.split(r"(?<=[.!?])\s+(?=[A-Z])", prose)
    return out


def continuation_items(text: str, n_choices: int = 4, seed: int = 0) -> list[dict]:
    """Multiple-choice items: a sentence's first half, its true second half among `n_choices - 1`
    second halves of sentences from other documents (so no distractor is a plausible neighbour).
    Choices are distinct strings of similar length; the gold position is random."""
    halves = []  # (document index, first half, second half)
    for doc_index, document in enumerate(split_documents(text)):
        for sentence in _sentences(document):
            words = sentence.split()
            if 8 <= len(words) <= 40 and sentence[0].isupper() and sentence.endswith("."):
                cut = len(words) // 2
                halves.append((doc_index, " ".join(words[:cut]), " ".join(words[cut:])))
    endings = sorted({(doc_index, end) for doc_index, _, end in halves})
    rng = random.Random(seed)
    items = []
    for doc_index, context, truth in halves:
        others = sorted({end for d, end in endings if d != doc_index and end != truth})
        # similar lengths, so that a preference for short (or long) answers cannot find the gold one
        near = [end for end in others if abs(len(end.split()) - len(truth.split())) <= 2]
        pool = near if len(near) >= n_choices - 1 else others
        if len(pool) < n_choices - 1:
            continue
        choices = rng.sample(pool, n_choices - 1)
        label = rng.randrange(n_choices)
        choices.insert(label, truth)
        items.append({"context": context, "choices": choices, "label": label})
    rng.shuffle(items)  # `limit` then takes a spread of documents, not the first few
    return items


def write_local_data(folder: Path, text: str, tasks=LOCAL_TASKS, n_choices: int = 4, seed: int = 0) -> dict[str, int]:
    """Write the rows of the local `tasks` as `<folder>/<task>.jsonl`; returns rows per task."""
    builders = {
        PPL_TASK: lambda: [{"text": doc} for doc in split_documents(text)],
        CHOICE_TASK: lambda: continuation_items(text, n_choices, seed),
    }
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for task in (t for t in LOCAL_TASKS if t in tasks):
        rows = builders[task]()
        if not rows:
            raise HarnessError(
                f"the text gives no rows for lm-eval task {task}; "
                "use a longer text_file (several documents separated by two blank lines)"
            )
        with (folder / f"{task}.jsonl").open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        counts[task] = len(rows)
    return counts


def _local_dataset(task: str, metadata: dict):
    import datasets

    folder = metadata.get(DATA_DIR_KEY)
    if not folder:
        raise ValueError(
            f"lm-eval task {task} reads {task}.jsonl from a folder given as metadata "
            f'{{"{DATA_DIR_KEY}": <folder>}}; the harness lm-eval suite writes it'
        )
    path = Path(folder) / f"{task}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})  # in memory: no cache files


def heldout_ppl_dataset(**metadata):
    """lm-eval `custom_dataset` of kc_heldout_ppl (called with the task's metadata)."""
    return _local_dataset(PPL_TASK, metadata)


def heldout_continuation_dataset(**metadata):
    """lm-eval `custom_dataset` of kc_heldout_continuation (called with the task's metadata)."""
    return _local_dataset(CHOICE_TASK, metadata)


# ---------------------------------------------------------------- running lm-eval


@contextlib.contextmanager
def hub_access(allow_download: bool):
    """Hub offline mode for the duration of the run (unless downloads are allowed), and lm-eval's
    INFO chatter and its tqdm bars silenced (the suite's own bar shows progress). Both libraries
    read their offline flag at call time from these module attributes; the environment variables
    are only read at import. lm-eval's modules pass `disable=False` to tqdm themselves, so their
    `tqdm` names are pointed at one that is always disabled while the run lasts."""
    import sys

    import datasets.config
    import huggingface_hub.constants as hub_constants
    from tqdm import tqdm as tqdm_class

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not allow_download:
        hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    logger.setLevel(logging.ERROR)

    def silent(*args, **kwargs):
        return tqdm_class(*args, **{**kwargs, "disable": True})

    bars = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("lm_eval") and isinstance(getattr(m, "tqdm", None), type) and issubclass(m.tqdm, tqdm_class)
    ]
    originals = [m.tqdm for m in bars]
    for m in bars:
        m.tqdm = silent
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
        for m, original in zip(bars, originals):
            m.tqdm = original
        logger.setLevel(level)


def task_manager(data_dir: Path, include_defaults: bool = True):
    """lm-eval's TaskManager with the shipped local tasks registered and their data folder in the
    metadata. Indexing lm-eval's built-in task YAMLs takes seconds: skip it when not needed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR), include_defaults=include_defaults, metadata={DATA_DIR_KEY: str(data_dir)}
    )


def _dataset_of(task: str, manager) -> str:
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(task)
    config = load_yaml(entry.yaml_path, resolve_func=False, recursive=True) if entry and entry.yaml_path else {}
    return ":".join(str(p) for p in (config.get("dataset_path"), config.get("dataset_name")) if p) or "its dataset"


def load_tasks(names: list[str], manager) -> list:
    """lm-eval Task objects, one per name; a task that cannot load is a one-line HarnessError."""
    for name in names:
        if name not in manager.task_index:
            raise HarnessError(
                f"unknown lm-eval task {name!r}; the local tasks are {', '.join(LOCAL_TASKS)}, "
                "and any name of `lm_eval ls tasks` works when its dataset is available"
            )
    tasks = []
    for name in names:
        try:
            loaded = manager.load([name])
        except (ConnectionError, OSError) as exc:  # datasets' offline / not-found errors derive from these
            dataset = _dataset_of(name, manager)
            raise HarnessError(
                f"lm-eval task {name!r} needs the dataset {dataset}, which is not in the local Hugging Face "
                f"cache ({type(exc).__name__}); download it once where there is a network "
                f"(python -c \"import lm_eval.tasks as t; t.TaskManager().load(['{name}'])\"), or set "
                "HF_DATASETS_CACHE to a cache that has it, or pass allow_download=true when online"
            ) from None
        tasks += loaded["tasks"].values()
    return tasks


def _rows(task, result: dict, samples: list[dict], tok_encode, n_docs: int) -> list[Metric]:
    """Our rows from lm-eval's result dict of one task ("metric,filter" keys, stderr beside)."""
    name, rows = task.task_name, []
    for key, value in result.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or "_stderr" in metric or not isinstance(value, (int, float)):
            continue
        details = {"task": name, "docs": n_docs}
        stderr = result.get(f"{metric}_stderr,{filter_name}")
        if isinstance(stderr, (int, float)):
            details["stderr"] = float(stderr)
        suffix = "" if filter_name == "none" else f".{filter_name}"
        rows.append(Metric(f"{name}.{metric}{suffix}", float(value), UNITS.get(metric, ""), details))
    if tok_encode is not None and samples and task.get_config("output_type") == "loglikelihood_rolling":
        # exact: lm-eval's rolling windows score every token of tok_encode(document) once, so the
        # summed log-likelihood over that token count is the token-level perplexity
        loglik = sum(float(s["filtered_resps"][0]) for s in samples)
        tokens = sum(len(tok_encode(s["arguments"][0][0])) for s in samples)
        rows.append(
            Metric(
                f"{name}.token_perplexity",
                math.exp(-loglik / tokens),
                "",
                {"task": name, "docs": n_docs, "tokens": tokens, "nll": -loglik / tokens},
            )
        )
    return rows


def evaluate_tasks(
    lm,
    names: list[str],
    *,
    data_dir: Path,
    limit: int = 0,
    num_fewshot: int | None = None,
    seed: int = 0,
    bootstrap_iters: int = 100,
    allow_download: bool = False,
    progress=None,
) -> list[Metric]:
    """Run `names` through `lm_eval.simple_evaluate` with an lm-eval LM object; per-task rows plus
    `avg_acc` (mean `acc` over the tasks that report one, as papers average zero-shot accuracy)."""
    from unittest import mock

    import lm_eval.evaluator
    from lm_eval import simple_evaluate

    # lm-eval asks `git describe` for its results' git_hash and lets git print "fatal: not a git
    # repository" to the terminal outside a checkout; the store keeps the harness's own commit
    quiet_git = mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None)
    with hub_access(allow_download), quiet_git:
        manager = task_manager(data_dir, include_defaults=not set(names) <= set(LOCAL_TASKS))
        tasks = load_tasks(names, manager)  # a group name expands to its tasks
        advance = progress("lm-eval", len(tasks)) if progress else (lambda n=1: None)
        rows = []
        for task in tasks:
            out = simple_evaluate(
                model=lm,
                tasks=[task],
                limit=limit or None,
                num_fewshot=num_fewshot,
                bootstrap_iters=bootstrap_iters,
                log_samples=True,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
            name = task.task_name
            n_docs = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
            rows += _rows(
                task,
                out["results"][name],
                out.get("samples", {}).get(name, []),
                getattr(lm, "tok_encode", None),
                n_docs,
            )
            advance()
    accs = [r for r in rows if r.name.endswith(".acc")]
    if accs:
        rows.append(
            Metric("avg_acc", sum(r.value for r in accs) / len(accs), "", {"tasks": [r.details["task"] for r in accs]})
        )
    return rows


@dataclass
class LmEvalSuite(Suite):
    name = "lm-eval"
    description = "lm-evaluation-harness tasks over the in-memory model (default: two local tasks on held-out text)"
    headlines = (Headline("avg_acc", "lm-eval accuracy", "higher", "fraction"),)

    tasks: str = ",".join(LOCAL_TASKS)  # comma-separated lm-eval task names (Paper A: PAPER_A_TASKS)
    limit: int = 100  # documents per task at most (0 = all); lm-eval's `limit`
    max_length: int = 256  # rolling-window / context length in tokens (0 = lm-eval's choice from the config)
    batch_size: int = 16
    num_fewshot: int | None = None  # None = each task's own default (zero-shot for the local tasks)
    choices: int = 4  # choices per item of the local multiple-choice task
    text_file: str | None = None  # text of the local tasks (default: the embedded held-out split)
    bootstrap_iters: int = 100  # lm-eval's stderr bootstrap draws (0 = no stderr)
    allow_download: bool = False  # let lm-eval's datasets download (default: local cache only)

    def validate(self) -> None:
        if not self.task_names():
            raise ValueError("tasks must name at least one lm-eval task")
        if self.limit < 0 or self.max_length < 0 or self.batch_size < 1 or self.bootstrap_iters < 0:
            raise ValueError("need limit >= 0, max_length >= 0, batch_size >= 1 and bootstrap_iters >= 0")
        if self.choices < 2:
            raise ValueError(f"choices must be >= 2, got {self.choices}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot must be >= 0, got {self.num_fewshot}")

    def task_names(self) -> list[str]:
        return [t.strip() for t in self.tasks.split(",") if t.strip()]

    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        import copy

        import torch
        from lm_eval.models.huggingface import HFLM

        names = self.task_names()
        data_dir = Path(ctx.artifacts) / "lm_eval_data"
        if set(names) & set(LOCAL_TASKS):
            write_local_data(data_dir, load_text(self.text_file, split="heldout"), names, self.choices, ctx.seed)
        with hub_access(self.allow_download):
            # a copy: lm-eval sets a pad token on the tokenizer it is given; float32 log-softmax as
            # the ppl suite does, also for bf16 models
            lm = HFLM(
                pretrained=model,
                tokenizer=copy.deepcopy(tokenizer),
                batch_size=self.batch_size,
                max_length=self.max_length or None,
                softmax_dtype=torch.float32,
            )
        return evaluate_tasks(
            lm,
            names,
            data_dir=data_dir,
            limit=self.limit,
            num_fewshot=self.num_fewshot,
            seed=ctx.seed,
            bootstrap_iters=self.bootstrap_iters,
            allow_download=self.allow_download,
            progress=ctx.progress,
        )
