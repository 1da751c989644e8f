"""The MQAR zoo model: a tiny DeltaNet trained on the mqar suite's own sequences.

Why it exists: the text-trained zoo models recall nothing in context (on the mqar suite, and on
a random token sequence repeated twice, they stay at chance), so the mqar suite would measure
noise on them. This model is trained on exactly what `harness.suites.mqar` asks (the same token
sets, the same sequence layout: `harness.mqar_data`), so a compression method's effect on recall is measurable on a
CPU. Same head shape as the other zoo models (hidden 128, 4 heads, key dimension 32, the shared
zoo tokenizer), 2 layers as in Zoology's MQAR models.

    from harness.zoo.mqar import build_mqar
    build_mqar()                      # harness/zoo/weights/deltanet-mqar-tiny/, ~10 min on 1 CPU thread

Training: the loss is the cross-entropy of the value at each query position (no other position
has a defined target), over a fixed rotation of short (kv pairs, length) settings; AdamW with
harness.zoo.train's warmup-cosine schedule; one CPU thread and seeded data, so a rerun on the same
machine and versions gives the same weights. The phase transition (loss leaving ln 64) comes after
about 150 steps.
"""

from __future__ import annotations

import functools
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.errors import HarnessError

NAME = "deltanet-mqar-tiny"


@dataclass(frozen=True)
class MqarRecipe:
    steps: int = 450
    batch_size: int = 64
    lr: float = 1e-2
    warmup_steps: int = 20
    weight_decay: float = 0.0
    layers: int = 2
    num_keys: int = 64  # the mqar suite's defaults: its token sets are these
    num_values: int = 64
    mixture: tuple[tuple[int, int], ...] = ((2, 32), (4, 32), (4, 64), (8, 64), (16, 64))  # (kv pairs, length)
    evals: tuple[tuple[int, int], ...] = ((4, 128), (8, 128), (16, 128), (32, 128), (16, 256), (32, 256))


def _query_loss(model, batch):
    """Cross-entropy of the value at each query position (logits computed only there)."""
    import torch.nn.functional as F

    hidden = model.model(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    at_queries = hidden.gather(1, batch.query_positions[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = model.lm_head(at_queries).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch.answers.reshape(-1))


def evaluate(model, sets, settings, seed: int = 12345, sequences: int = 64) -> dict[str, float]:
    """Accuracy (value-set argmax) per 'kv{N}/len{L}' on fresh sequences."""
    import numpy as np

    from harness.mqar_data import mqar_batch, recall_hits

    was_training = model.training
    model.eval()
    out = {}
    for n, length in settings:
        batch = mqar_batch(sets, sequences, n, length, np.random.default_rng([seed, n, length]))
        hits, _ = recall_hits(model, batch, sets.values)
        out[f"kv{n}/len{length}"] = round(hits.float().mean().item(), 4)
    model.train(was_training)
    return out


def build_mqar(
    out_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = 1,
    batch_size: int | None = None,
    recipe: MqarRecipe = MqarRecipe(),
) -> Path:
    """Train the MQAR DeltaNet and write its save_pretrained folder (default: the shipped one)."""
    return build_mqar_model(out_dir, steps, seed, progress, threads, batch_size, recipe)[0]


def build_mqar_model(
    out_dir: str | Path | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = 1,
    batch_size: int | None = None,
    recipe: MqarRecipe = MqarRecipe(),
):
    """`build_mqar`, returning (folder, the trained model in memory), as harness.zoo.build_model does."""
    import fla
    import numpy as np
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from harness.mqar_data import mqar_batch, tokenizer_sets
    from harness.training import train_step
    from harness.zoo.folders import WEIGHTS_DIR, clear_target, prepare_fla, write_model_folder
    from harness.zoo.models import _deltanet_config
    from harness.zoo.tokenizer import corpus_tokenizer
    from harness.zoo.train import TrainConfig, TrainProgress, fixed_threads, lr_at, make_optimizer

    out = Path(out_dir) if out_dir is not None else WEIGHTS_DIR / NAME
    clear_target(out)
    steps = recipe.steps if steps is None else int(steps)
    batch_size = batch_size or recipe.batch_size
    if steps < 1:
        raise HarnessError(f"steps must be >= 1, got {steps}")
    prepare_fla()
    transformers.utils.logging.disable_progress_bar()  # a 4 MB save needs no bar
    tokenizer = corpus_tokenizer()
    sets = tokenizer_sets(tokenizer, recipe.num_keys, recipe.num_values)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=recipe.lr,
        warmup_steps=recipe.warmup_steps,
        weight_decay=recipe.weight_decay,
        seed=seed,
        threads=threads,
    )

    with fixed_threads(threads):
        torch.manual_seed(seed)
        config = _deltanet_config()
        config.num_hidden_layers = recipe.layers
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        optimizer = make_optimizer(model, cfg)
        data_rng = np.random.default_rng([seed, 1])  # the data order, apart from the weights' RNG
        model.train()
        curve, t0 = [], time.perf_counter()
        with TrainProgress(steps, enabled=progress) as bar:
            for step in range(steps):
                n, length = recipe.mixture[step % len(recipe.mixture)]
                batch = mqar_batch(sets, batch_size, n, length, data_rng)
                lr = lr_at(step, cfg)
                loss = train_step(
                    optimizer,
                    functools.partial(_query_loss, model, batch),
                    step,
                    lr=lr,
                    clip=cfg.grad_clip,
                    params=model.parameters(),
                )
                bar.update(
                    step + 1,
                    loss=loss,
                    lr=lr,
                    tokens_per_s=(step + 1) * batch.input_ids.numel() / (time.perf_counter() - t0),
                )
                if (step + 1) % 50 == 0 or step + 1 == steps:
                    curve.append({"step": step + 1, "train_loss": round(loss, 4)})
        wall = time.perf_counter() - t0
        accuracy = evaluate(model, sets, recipe.evals)
        if progress:
            bar.log(f"mqar accuracy (chance {1 / recipe.num_values:.3f}): {accuracy}; trained {wall:.0f} s")

    info = {
        "name": NAME,
        "family": "deltanet",
        "model_type": config.model_type,
        "task": "mqar",
        "steps": steps,
        "seed": seed,
        "batch_size": batch_size,
        "threads": torch.get_num_threads() if threads is None else threads,
        "n_params": sum(p.numel() for p in model.parameters()),
        "recipe": asdict(recipe),
        "mqar_accuracy": accuracy,
        "mqar_chance": 1 / recipe.num_values,
        "curve": curve,
        "train_wall_s": round(wall, 1),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "fla_version": getattr(fla, "__version__", "?"),
        "platform": platform.platform(),
        "eval": "harness.suites.mqar sequences (seed 12345, 64 per setting); accuracy = argmax over the value set",
    }
    write_model_folder(out, model, tokenizer, info)
    return out, model
