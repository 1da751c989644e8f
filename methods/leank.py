"""LeanK: learned static key-channel masks for the K cache, or a published mask loaded as is.

Zhang et al., "LeanK: Learnable K Cache Channel Pruning for Efficient Decoding" (EMNLP 2025,
arXiv 2508.02215). A scale alpha[layer, kv_head, channel] in [0, 1] multiplies the post-RoPE
middle keys (not the first `sink` tokens, not the last `recent`) when answer tokens attend to
them. Stage 1 (`fit`, once per run): minimize the MSE between the final hidden states of the
full and the scaled model on answer tokens, plus `lam * mean|alpha|`, clamping alpha to [0, 1].
Stage 2 (`select`, per ratio): a global quantile threshold of alpha at the ratio, each head's
count rounded to a multiple of `align`, that head's top channels kept; then alpha is fine-tuned
with the binary mask in the forward pass (straight-through gradient, no L1) and binarized again.
Training data: synthetic pass-key retrieval sequences over the embedded corpus (offline).
With `mask=path.pth` (the published format: float [layers, kv_heads, head_dim] of 0/1) nothing
is trained and the mask is the selection; its kept fraction fixes the ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from harness.errors import HarnessError
from harness.leank_mask import load_mask, mask_selection
from harness.method import MODEL, SOFTMAX_FAMILIES, CacheWindow, Method
from harness.methods.leank_training import binarize, passkey_batch, train_scales
from harness.selection import ChannelSelection


@dataclass
class LeanK(CacheWindow, Method):
    name = "leank"
    families = SOFTMAX_FAMILIES
    paper = "Zhang et al. 2025, LeanK, EMNLP, arXiv 2508.02215"

    mask: str = ""  # a published LeanK mask (.pth); when set, nothing is trained
    align: int = 0  # per-head kept counts are multiples of this; 0 = head_dim / 4 (the paper: 32 of 128)
    steps: int = 120  # stage 1 steps (L1-regularized scales)
    steps2: int = 60  # stage 2 steps (straight-through fine-tune of the binary mask)
    lr: float = 0.02
    lam: float = 0.06  # L1 weight in stage 1 (the paper's lambda)
    batch: int = 4
    seq_len: int = 256  # tokens per synthetic training sequence
    pool: int = 8  # distinct training batches, cycled

    _trained: dict = field(default_factory=dict, init=False, repr=False)

    def validate(self) -> None:
        self.validate_window()
        if min(self.steps, self.steps2, self.batch, self.pool) < 0 or self.lr <= 0 or self.lam < 0 or self.align < 0:
            raise ValueError("steps, steps2, batch, pool and align must be >= 0, lr > 0 and lam >= 0")
        if self.mask:
            load_mask(self.mask)  # fail fast, before any model is loaded

    @property
    def needs(self) -> frozenset[str]:
        return frozenset() if self.mask else frozenset({MODEL})

    def implied_ratio(self) -> float | None:
        return round(1.0 - float(load_mask(self.mask).mean()), 6) if self.mask else None

    def check_geometry(self, geometry) -> None:
        if not self.mask:
            return
        shape = tuple(load_mask(self.mask).shape)
        heads, head_dim, _ = geometry[min(geometry)]
        if shape != (len(geometry), heads, head_dim):
            raise HarnessError(
                f"the LeanK mask {self.mask} is {list(shape)} [layers, KV heads, head_dim], the model's "
                f"attention is {[len(geometry), heads, head_dim]}: use the mask made for this model"
            )

    # --- stage 1 ------------------------------------------------------------------------------
    def fit(self, model, tokenizer, progress) -> None:
        from harness.calibration import load_text
        from harness.families import adapter_for

        if self.mask:
            return
        adapter = adapter_for(model, kind="softmax")
        geometry = adapter.geometry(model)
        rng = np.random.default_rng(self.seed)
        corpus = tokenizer(load_text(None, split="train"), add_special_tokens=False)["input_ids"]
        data = [passkey_batch(corpus, tokenizer, rng, self.batch, self.seq_len) for _ in range(self.pool)]
        with torch.no_grad():  # the full model's final hidden states: the distillation targets
            targets = [
                model.model(input_ids=ids.to(model.device), use_cache=False).last_hidden_state for ids, _ in data
            ]
        n_layers, (heads, d, _) = len(geometry), next(iter(geometry.values()))
        alpha = torch.ones(n_layers, heads, d, device=model.device, requires_grad=True)
        self._trained = {"model": model, "adapter": adapter, "data": data, "targets": targets, "d": d}
        self._train(alpha, self.steps, self.lam, None, progress("leank stage 1", self.steps))
        self._trained["alpha"] = alpha.detach().clone()

    def _train(self, alpha, steps: int, lam: float, binary_ratio: float | None, advance) -> None:
        state = self._trained
        loss = train_scales(
            state["model"],
            state["adapter"],
            state["data"],
            state["targets"],
            alpha,
            steps=steps,
            lr=self.lr,
            lam=lam,
            binary=None if binary_ratio is None else (binary_ratio, self._align()),
            sink=self.sink,
            recent=self.recent,
            advance=advance,
        )
        if loss is not None:
            self.record("final_loss", round(loss, 6))

    def _align(self) -> int:
        return self.align or max(1, self._trained.get("d", 128) // 4)

    # --- stage 2 ------------------------------------------------------------------------------
    def select(self, layers, ratio, family, progress=None) -> ChannelSelection:
        if self.mask:
            mask = load_mask(self.mask)
            self._check_geometry(mask, layers)
            return mask_selection(mask, family, self.name, {**self.window_meta(), "mask": str(self.mask)})
        if "alpha" not in self._trained:
            raise RuntimeError("LeanK.select before fit: the pipeline calls fit for methods that need the model")
        self._meta = {}
        alpha = self._trained["alpha"].clone().requires_grad_(True)
        self._train(alpha, self.steps2, 0.0, ratio, lambda: None)
        mask = binarize(alpha.detach(), ratio, self._align()).cpu()
        for _ in layers:
            if progress is not None:
                progress()
        return mask_selection(mask, family, self.name, {**self.window_meta(), **self._meta, "align": self._align()})

    @staticmethod
    def _check_geometry(mask: torch.Tensor, layers) -> None:
        model_shape = (len(layers), layers[0].num_heads, layers[0].head_dim) if layers else None
        if tuple(mask.shape) != model_shape:
            raise HarnessError(
                f"LeanK mask is [layers, kv_heads, head_dim] = {list(mask.shape)} but the model has "
                f"{list(model_shape)}; use the mask released for this model"
            )
