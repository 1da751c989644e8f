"""Calibration data: token windows drawn from a text, deterministic under a seed.

By default the text is the train split of the embedded corpus (CPython's stdlib docstrings,
see harness.zoo.corpus); `text_file` names any local UTF-8 text instead.
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

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 8:
            raise HarnessError(f"calibration needs samples >= 1 and seq_len >= 8, got {self.samples} and {self.seq_len}")

    def key(self) -> dict:
        return {"samples": self.samples, "seq_len": self.seq_len, "text_file": self.text_file, "seed": self.seed}


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
    text = load_text(spec.text_file)
    rng = np.random.default_rng(spec.seed)
    span = spec.seq_len * 12  # characters: comfortably more than seq_len tokens
    if len(text) < span:
        raise HarnessError(f"calibration text has {len(text)} characters; it needs at least {span} for seq_len {spec.seq_len}")
    rows: list[list[int]] = []
    attempts = 0
    while len(rows) < spec.samples:
        attempts += 1
        if attempts > spec.samples * 20:
            raise HarnessError("calibration text tokenizes to too few tokens per window; use a longer text or a smaller --calib-seq-len")
        start = int(rng.integers(0, len(text) - span))
        ids = tokenizer(text[start:start + span], add_special_tokens=False)["input_ids"]
        if len(ids) >= spec.seq_len:
            rows.append(ids[:spec.seq_len])
    tensor = torch.tensor(rows, dtype=torch.long)
    return list(tensor.split(batch_size))
