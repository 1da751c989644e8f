"""What every zoo builder shares: where the weights live, the build target check, fla's setup,
the corpus as token streams, and the atomic write of a model folder.

The zoo's builders (`harness.zoo.build_model` for the text models, `harness.zoo.mqar`,
`harness.zoo.retrieval`) import
these from here, never from the `harness.zoo` package that dispatches to them, so no builder
and the package import each other.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from harness.errors import HarnessError
from harness.zoo.models import get

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "zoo.json"


def default_path(name: str) -> Path:
    """The shipped weights folder of a zoo model (it may not exist if the model was never built)."""
    get(name)
    return WEIGHTS_DIR / name


def clear_target(out: Path) -> None:
    """Refuse to overwrite a folder that is not a model folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise HarnessError(f"output path {out} exists and is not a folder")
    contents = list(out.iterdir())
    if contents and not (out / MANIFEST).exists() and not (out / "config.json").exists():
        raise HarnessError(f"output folder {out} is not empty and holds no model; choose another --out")


def prepare_fla() -> None:
    """Register fla's models with the Auto classes and, for CPU tensors, route its kernels to torch."""
    try:
        import fla.models  # noqa: F401
    except ImportError as exc:
        raise HarnessError(f"the fla zoo models need flash-linear-attention: {exc}") from None
    try:
        from harness.kernels import fla_cpu
    except ImportError as exc:
        raise HarnessError(f"harness.kernels.fla_cpu is not available ({exc}); fla models cannot run on CPU") from None
    fla_cpu.install()


_STREAMS: dict[str, tuple] = {}  # corpus sha256 -> (train ids, held-out ids), this process only


def token_streams(corpus, tokenizer):
    """The train and held-out splits as 1-D token tensors (each split tokenized as one text)."""
    import torch

    key = corpus.sha256 + tokenizer.backend_tokenizer.to_str()
    if key not in _STREAMS:
        _STREAMS.clear()
        _STREAMS[key] = tuple(
            torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for text in (corpus.train_text, corpus.heldout_text)
        )
    return _STREAMS[key]


def corpus_provenance(corpus) -> dict:
    """What a built model's zoo.json records of its corpus and of the software that trained it."""
    import platform

    import fla
    import tokenizers
    import torch
    import transformers

    return {
        "corpus": "CPython standard-library docstrings (c) Python Software Foundation, PSF License",
        "corpus_sha256": corpus.sha256,
        "corpus_train_docs": corpus.n_train_docs,
        "corpus_heldout_docs": corpus.n_heldout_docs,
        "python_version": corpus.python_version,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "fla_version": getattr(fla, "__version__", "?"),
        "tokenizers_version": tokenizers.__version__,
        "platform": platform.platform(),
    }


def write_model_folder(out: Path, model, tokenizer, info: dict) -> None:
    """save_pretrained + tokenizer + zoo.json, written next to `out` and swapped in, so that a
    crash never leaves half a model folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; these are package data
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
