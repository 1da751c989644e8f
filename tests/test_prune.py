"""`harness prune` for every built-in method on both linear families: plain checkpoints that
reload through plain fla/transformers and give exactly the logits of the in-memory pruned model."""

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from harness import registry
from harness.calibration import CalibrationSpec
from harness.cli import app
from harness.compress import plan
from harness.progress import Bars

RATIOS = (0.25, 0.5, 0.75)
CALIB = ["--calib-samples", "4", "--calib-seq-len", "128"]
BUILTIN = sorted(
    e.name
    for e in registry.entries(registry.METHODS)
    if e.ok and e.distribution == "kc-harness" and "deltanet" in e.obj.families
)


@pytest.mark.parametrize("model", ["deltanet-tiny", "gated-deltanet-tiny"])
@pytest.mark.parametrize("method", BUILTIN)
def test_prune_writes_reloadable_checkpoints(method, model, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "prune",
            "--method",
            method,
            "--model",
            model,
            "--ratio",
            "0.25,0.5,0.75",
            "--out",
            str(tmp_path),
            "-q",
            *CALIB,
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    p = plan(model, method, RATIOS, calibration=CalibrationSpec(samples=4, seq_len=128))
    layer_data = p.capture(Bars(None))
    ids = torch.randint(3, 2000, (2, 80), generator=torch.Generator().manual_seed(0))
    for ratio in RATIOS:
        folder = tmp_path / f"{model}-{method}-{ratio:g}"
        reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain loader, no harness code
        keep = 32 - int(32 * ratio)
        assert reloaded.model.layers[0].attn.head_k_dim == keep
        expected, _selection = p.compress(layer_data, ratio, Bars(None))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_builtin_methods_are_registered():
    assert {"drrqr", "random"} <= set(BUILTIN)
