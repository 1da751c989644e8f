"""docs/scripts/induction_probe.py: its rows repeat a span, and its built head attends to the previous token."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

SCRIPT = Path(__file__).resolve().parents[1] / "docs" / "scripts" / "induction_probe.py"


def load_probe():
    spec = importlib.util.spec_from_file_location("induction_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_llama(probe, layers: int, tie: bool):
    """The probe's llama-tiny shape from random weights, seed 0, eager attention (for attention maps)."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(probe.llama_config(layers=layers, tie=tie), attn_implementation="eager")


def test_rows_repeat_a_span_and_mark_only_its_predictable_tokens():
    probe = load_probe()
    ids, copied = probe.batch(random.Random(0), rows=16, length=64, vocab=50, fixed_offset=False)
    assert ids.min() >= probe.FIRST_ID and ids.max() < probe.FIRST_ID + 50
    for row, mask in zip(ids, copied):
        marked = mask.nonzero().flatten()
        n = len(marked) + 1  # the span's first copied token is not predictable
        first = int(marked[0]) - 1
        assert torch.equal(row[first : first + n], row[first - n : first])
        assert marked.tolist() == list(range(first + 1, first + n))
    fixed_ids, fixed = probe.batch(random.Random(0), rows=4, length=64, vocab=50, fixed_offset=True)
    assert torch.equal(fixed_ids[:, 32:], fixed_ids[:, :32])
    assert fixed.sum(1).tolist() == [31.0] * 4


def test_built_head_attends_to_the_previous_token():
    probe = load_probe()
    model = tiny_llama(probe, layers=1, tie=False)
    ids = torch.randint(probe.FIRST_ID, 2048, (1, 128))
    before = model(input_ids=ids, output_attentions=True).attentions[0][0, 0]
    probe.build_previous_token_head(model)
    after = model(input_ids=ids, output_attentions=True).attentions[0][0, 0]
    previous, current, two_back = (after.diagonal(-1).mean(), after.diagonal(0)[1:].mean(), after.diagonal(-2).mean())
    assert previous > 0.6 and previous > 3 * current and previous > 3 * two_back
    assert before.diagonal(-1).mean() < 0.2  # random weights spread attention


def copy_accuracy(model, probe) -> float:
    ids, copied = probe.batch(random.Random(0), rows=16, length=64, vocab=2000, fixed_offset=False)
    with torch.no_grad():
        return probe.copy_accuracy(model(input_ids=ids).logits, ids, copied)


def test_written_induction_circuit_copies_before_any_training():
    probe = load_probe()
    model = tiny_llama(probe, layers=4, tie=True)
    assert copy_accuracy(model, probe) < 0.02  # random weights do not copy
    probe.write_induction_circuit(model)
    assert copy_accuracy(model, probe) > 0.3  # chance is 1 / 2000
