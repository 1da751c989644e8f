"""Shared fixtures: tiny random-weight fla models saved with save_pretrained."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _cpu_references():
    from harness.kernels import fla_cpu

    fla_cpu.install()
    torch.manual_seed(0)


def tiny_config(family: str, **over):
    from fla.models import DeltaNetConfig, GatedDeltaNetConfig

    common = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, bos_token_id=1, eos_token_id=2)
    if family == "deltanet":
        return DeltaNetConfig(num_heads=2, expand_k=1.0, **{**common, **over})  # head_k_dim 32
    return GatedDeltaNetConfig(num_heads=2, head_dim=32, expand_v=2.0, **{**common, **over})


def tiny_model(family: str, seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **over))
    # random init leaves q/k near-identical in scale; perturb so channel choices matter
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=["deltanet", "gated_deltanet"])
def family(request):
    return request.param


EVIL = "<script>alert(1)</script>"


@pytest.fixture(scope="session")
def evil_name():
    """The method name of the hand-written cell in `leaderboard_store` (a script tag)."""
    return EVIL


@pytest.fixture(scope="session")
def leaderboard_store(tmp_path_factory):
    """A store filled by real tiny runs (drrqr and random at 0.5 on ppl and state-rank, plus the
    dense reference), and one hand-written cell whose method name is a script tag."""
    from harness.pipeline import run
    from harness.results import RunKey
    from harness.store import ResultStore
    from harness.suite import Metric

    path = tmp_path_factory.mktemp("leaderboard") / "results.sqlite"
    for method in ("drrqr", "random"):
        run(
            model="deltanet-tiny",
            method=method,
            ratios=[0.5],
            suites=["ppl", "state-rank"],
            store=path,
            progress=False,
            suite_params={"ppl": {"limit": 600}, "state-rank": {"num_sequences": 2, "seq_len": 64, "batch_size": 2}},
        )
    key = RunKey(
        model="deltanet-tiny",
        model_digest="d",
        family="deltanet",
        method=EVIL,
        method_params={"note": EVIL},
        ratio=0.25,
        suite="ppl",
        suite_params={},
        seed=0,
    )
    ResultStore(path).begin(key)
    ResultStore(path).finish(key, [Metric("ppl", 99.0)], prov={"note": EVIL}, duration_s=0.0)
    return path


class CharTokenizer:
    """A tokenizer for suites that only need token ids: one id per character."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 97 for c in text]}


@pytest.fixture
def char_tokenizer():
    return CharTokenizer()


@pytest.fixture
def text_file(tmp_path):
    """A small text of random words (a suite's `text_file`)."""
    g = torch.Generator().manual_seed(0)
    words = ["state", "rank", "key", "delta", "rule", "head", "layer", "token", "value", "gate"]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(words[i] for i in torch.randint(0, len(words), (600,), generator=g).tolist()))
    return str(path)
