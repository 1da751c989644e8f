"""The embedded default models ("zoo"): tiny causal LMs trained offline on CPython's docstrings.

    from harness import zoo
    zoo.list_models()                 # ['deltanet-tiny', 'gated-deltanet-tiny', 'llama-tiny']
    zoo.default_path("deltanet-tiny") # harness/zoo/weights/deltanet-tiny/ (shipped with the package)
    zoo.manifest("deltanet-tiny")     # its zoo.json (dense and unigram held-out ppl, ...), or None
    zoo.build("llama-tiny", out_dir="my-llama", steps=300)   # retrain (deterministic under seed)

A built folder is a plain `save_pretrained` folder: config.json, model.safetensors (float32),
the tokenizer files and zoo.json. Load it with the real loaders: `import fla.models` (which
registers fla's classes with the Auto API), then `AutoModelForCausalLM.from_pretrained(folder)`
and `AutoTokenizer.from_pretrained(folder)`; on CPU call `harness.kernels.fla_cpu.install()`
first for the fla families.

Corpus: the docstrings of CPython's standard library, (c) Python Software Foundation, PSF License
(see harness.zoo.corpus).
"""

from __future__ import annotations

import json
from pathlib import Path

from harness.errors import HarnessError
from harness.zoo.folders import (
    MANIFEST,
    corpus_provenance,
    WEIGHTS_DIR,
    clear_target,
    default_path,
    prepare_fla,
    token_streams,
    write_model_folder,
)
from harness.zoo.models import ZOO, ZooEntry, get

RECIPE = -1  # `threads` default of build / build_model: the recipe's thread count

__all__ = [
    "build",
    "build_model",
    "default_path",
    "list_models",
    "manifest",
    "family_of",
    "heldout_text",
    "train_text",
    "entry",
    "WEIGHTS_DIR",
]


def list_models() -> list[str]:
    return list(ZOO)


def entry(name: str) -> ZooEntry:
    return get(name)


def family_of(name: str) -> str:
    return get(name).family


def manifest(name_or_folder: str | Path) -> dict | None:
    """The zoo.json of a zoo model's shipped weights (or of any built folder), None if absent."""
    folder = default_path(name_or_folder) if str(name_or_folder) in ZOO else Path(name_or_folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def heldout_text() -> str:
    """The held-out split of the embedded corpus (what the zoo's held-out ppl is measured on)."""
    from harness.zoo.corpus import load_corpus

    return load_corpus().heldout_text


def train_text() -> str:
    from harness.zoo.corpus import load_corpus

    return load_corpus().train_text


def build(
    name: str,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    eval_every: int | None = None,
    threads: int | None = RECIPE,
) -> Path:
    """Train zoo model `name` from scratch and write its save_pretrained folder; returns the folder.

    `out_dir` defaults to the shipped weights folder (default_path(name)); an existing model
    folder there is replaced only once the new one is complete. `steps`, `batch_size`, `seq_len`
    default to the zoo's recipe; `eval_every` adds held-out evaluations to the curve in zoo.json
    (default: 10 points for runs of 100+ steps). `threads` fixes torch's CPU thread count (default: the
    recipe's, 1 for most: part of what makes a rerun bit-identical, and on a small shared CPU one
    thread is also faster than OpenMP threads competing with other processes; None: leave torch's
    setting).
    """
    path, _model = build_model(
        name,
        out_dir,
        steps,
        seed,
        progress,
        batch_size=batch_size,
        seq_len=seq_len,
        eval_every=eval_every,
        threads=threads,
    )
    return path


def build_model(
    name: str,
    out_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    eval_every: int | None = None,
    threads: int | None = RECIPE,
):
    """`build`, returning (folder, the trained model in memory)."""
    if threads == RECIPE:
        threads = get(name).recipe.threads
    if get(name).task == "mqar":
        from harness.zoo.mqar import build_mqar_model

        return build_mqar_model(out_dir, steps, seed, progress, threads, batch_size)
    if get(name).task == "retrieval":
        from harness.zoo.retrieval import build_retrieval_model

        return build_retrieval_model(name, out_dir, steps, seed, progress, threads, batch_size, seq_len)
    import torch
    from transformers import AutoModelForCausalLM

    from harness.zoo.corpus import load_corpus
    from harness.zoo.tokenizer import VOCAB_SIZE, corpus_tokenizer
    from harness.zoo.train import TrainConfig, train

    spec = get(name)
    recipe = spec.recipe
    out = Path(out_dir) if out_dir is not None else default_path(name)
    clear_target(out)
    if spec.needs_fla:
        prepare_fla()

    corpus = load_corpus()
    tokenizer = corpus_tokenizer(corpus)
    train_ids, heldout_ids = token_streams(corpus, tokenizer)

    steps = recipe.steps if steps is None else int(steps)
    if steps < 1:
        raise HarnessError(f"steps must be >= 1, got {steps}")
    if eval_every is None:
        eval_every = steps // 10 if steps >= 100 else 0
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size or recipe.batch_size,
        seq_len=seq_len or recipe.seq_len,
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        seed=seed,
        eval_every=eval_every,
        threads=threads,
    )
    torch.manual_seed(seed)
    config = spec.config()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if progress:
        from rich.console import Console

        Console(stderr=True).print(
            f"building {name} ({spec.family}, {n_params / 1e6:.2f}M parameters): {steps} steps x "
            f"{cfg.batch_size} x {cfg.seq_len} tokens, seed {seed}; corpus {len(train_ids):,} train / "
            f"{len(heldout_ids):,} held-out tokens",
            highlight=False,
            soft_wrap=True,
        )
    result = train(model, train_ids, heldout_ids, cfg, progress=progress, vocab_size=VOCAB_SIZE)

    info = {
        "name": name,
        "family": spec.family,
        "model_type": config.model_type,
        "steps": steps,
        "seed": seed,
        **corpus_provenance(corpus),
        "threads": result.threads,
        "n_params": n_params,
        "vocab_size": VOCAB_SIZE,
        "train_tokens": len(train_ids),
        "tokens_seen": result.tokens_seen,
        "heldout_tokens_scored": result.heldout_tokens,
        "dense_ppl": round(result.dense_ppl, 4),
        "unigram_ppl": round(result.unigram_ppl, 4),
        "final_train_loss": round(result.final_train_loss, 4),
        "train_wall_s": round(result.wall_s, 1),
        "train_config": result.config,
        "curve": [{"step": s, "train_loss": round(loss, 4), "heldout_ppl": round(p, 4)} for s, loss, p in result.curve],
        "eval": "token-weighted perplexity over non-overlapping windows of seq_len + 1 tokens of the held-out "
        "split; unigram: add-one smoothed train token counts on the same tokens",
    }

    write_model_folder(out, model, tokenizer, info)
    return out, model
