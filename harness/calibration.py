"""Calibration data: token windows drawn from a text, deterministic under a seed.

By default the text is the train split of the embedded corpus (CPython's stdlib docstrings,
see harness.zoo.corpus); `text_file` names any local UTF-8 text instead, and `dataset` any
Hugging Face dataset (`name` or `name:config`, loaded with `datasets.load_dataset`, from the
local cache when offline; a folder written by `Dataset.save_to_disk` works too).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError


@dataclass(frozen=True)
class CalibrationSpec:
    samples: int = 16
    seq_len: int = 256
    text_file: str | None = None
    seed: int = 0
    dataset: str | None = None  # HF dataset "name" or "name:config", or a save_to_disk folder
    split: str = "train"
    column: str = "text"

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 8:
            raise HarnessError(
                f"calibration needs samples >= 1 and seq_len >= 8, got {self.samples} and {self.seq_len}"
            )
        if self.dataset and self.text_file:
            raise HarnessError("give either a calibration text file or a dataset, not both")

    def key(self) -> dict:
        key = {"samples": self.samples, "seq_len": self.seq_len, "text_file": self.text_file, "seed": self.seed}
        if self.dataset:
            key.update(dataset=self.dataset, split=self.split, column=self.column)
        return key

    def text(self) -> str:
        return dataset_text(self.dataset, self.split, self.column) if self.dataset else load_text(self.text_file)


def dataset_text(name: str, split: str = "train", column: str = "text", max_chars: int = 4_000_000) -> str:
    """The `column` of a Hugging Face dataset split, joined into one text (first `max_chars`)."""
    try:
        import datasets
    except ImportError:
        raise HarnessError("calibration from a dataset needs the `datasets` package: pip install datasets") from None
    try:
        if Path(name).expanduser().is_dir():
            data = datasets.load_from_disk(str(Path(name).expanduser()))
            data = data[split] if isinstance(data, datasets.DatasetDict) else data
        else:
            path, _, config = name.partition(":")
            data = datasets.load_dataset(path, config or None, split=split)
    except Exception as exc:  # the hub client and builders raise many types
        raise HarnessError(
            f"cannot load dataset {name!r} split {split!r}: {str(exc).splitlines()[0][:200]}; "
            "check the name, or download it first when offline"
        ) from None
    if column not in data.column_names:
        raise HarnessError(f"dataset {name!r} has no column {column!r}; its columns: {', '.join(data.column_names)}")
    parts, size = [], 0
    for value in data[column]:
        if isinstance(value, str) and value.strip():
            parts.append(value)
            size += len(value)
            if size >= max_chars:
                break
    return "\n\n".join(parts)


def load_text(text_file: str | None, split: str = "train") -> str:
    if text_file is None:
        from harness.zoo.corpus import load_corpus

        corpus = load_corpus()
        return corpus.train_text if split == "train" else corpus.heldout_text
    path = Path(text_file).expanduser()
    if not path.is_file():
        raise HarnessError(f"text file {text_file!r} does not exist; pass a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise HarnessError(f"text file {text_file!r} is not UTF-8 text") from None


def calibration_batches(tokenizer, spec: CalibrationSpec, batch_size: int = 4) -> list[torch.Tensor]:
    """`spec.samples` windows of exactly `spec.seq_len` tokens, in batches."""
    text = spec.text()
    rng = np.random.default_rng(spec.seed)
    span = spec.seq_len * 12  # characters: comfortably more than seq_len tokens
    if len(text) < span:
        raise HarnessError(
            f"calibration text has {len(text)} characters; it needs at least {span} for seq_len {spec.seq_len}"
        )
    rows: list[list[int]] = []
    attempts = 0
    while len(rows) < spec.samples:
        attempts += 1
        if attempts > spec.samples * 20:
            raise HarnessError(
                "calibration text tokenizes to too few tokens per window; use a longer text or a smaller --calib-seq-len"
            )
        start = int(rng.integers(0, len(text) - span))
        ids = tokenizer(text[start : start + span], add_special_tokens=False)["input_ids"]
        if len(ids) >= spec.seq_len:
            rows.append(ids[: spec.seq_len])
    tensor = torch.tensor(rows, dtype=torch.long)
    return list(tensor.split(batch_size))
