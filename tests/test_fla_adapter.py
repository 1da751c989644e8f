"""The DeltaNet / Gated DeltaNet adapter: identity, slicing == zeroing, save/reload."""

import copy
import functools

import fla.layers.delta_net
import fla.layers.gated_deltanet
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from harness.families import adapter_for
from harness.methods.random import RandomChannels

TOKENS = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def kernel_scale(monkeypatch):
    """Force the delta-rule kernels' output scale. fla's default is d_k ** -0.5 of the tensors it
    gets, so a sliced model (d_k' channels) and a zeroed one (d_k channels, zeros) differ by that
    constant factor before the output RMSNorm, which removes it except through the norm's eps.
    Comparing at one scale checks that the slicing itself is exact."""

    def force(scale: float) -> None:
        for module in (fla.layers.delta_net, fla.layers.gated_deltanet):
            for name in (
                "chunk_delta_rule",
                "fused_recurrent_delta_rule",
                "chunk_gated_delta_rule",
                "fused_recurrent_gated_delta_rule",
            ):
                if hasattr(module, name):
                    monkeypatch.setattr(module, name, functools.partial(getattr(module, name), scale=scale))

    return force


def logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def random_selection(model, ratio, seed=0):
    adapter = adapter_for(model)
    layers = adapter.capture(model, [], RandomChannels.needs)
    return adapter, RandomChannels(seed=seed).select(layers, ratio, adapter.family)


def test_adapter_matches_family(family):
    model = tiny_model(family)
    assert adapter_for(model).family == family


def test_ratio_zero_is_identity(family):
    model = tiny_model(family)
    before = logits(model)
    config_before = model.config.to_dict()
    adapter, selection = random_selection(model, 0.0)
    assert selection.kept_ratio == 1.0
    adapter.apply(model, selection)
    assert torch.equal(logits(model), before)
    assert model.config.to_dict() == config_before


LONG = torch.randint(3, 128, (2, 150), generator=torch.Generator().manual_seed(1))  # > 64: chunk mode


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("ids", [TOKENS, LONG], ids=["recurrent", "chunk"])
def test_slicing_equals_zeroing(family, ratio, ids, kernel_scale):
    model = tiny_model(family)
    adapter, selection = random_selection(model, ratio, seed=1)
    zeroed, sliced = copy.deepcopy(model), copy.deepcopy(model)
    adapter.zero(zeroed, selection)
    adapter.apply(sliced, selection)
    keep = 32 - int(32 * ratio)
    assert all(layer.attn.head_k_dim == keep for layer in sliced.model.layers)
    assert sliced.model.layers[0].attn.q_proj.weight.shape[0] == 2 * keep
    assert sliced.model.layers[0].attn.k_conv1d.weight.shape[0] == 2 * keep
    dense = logits(model, ids)
    kernel_scale(keep**-0.5)
    ref, got = logits(zeroed, ids), logits(sliced, ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref, dense, atol=1e-3)  # pruning did change the function


def test_value_side_untouched(family):
    model = tiny_model(family)
    attn = model.model.layers[0].attn
    v_before, o_before = attn.v_proj.weight.clone(), attn.o_proj.weight.clone()
    head_v_dim = attn.head_v_dim
    adapter, selection = random_selection(model, 0.75)
    adapter.apply(model, selection)
    assert attn.head_v_dim == head_v_dim
    assert torch.equal(attn.v_proj.weight, v_before) and torch.equal(attn.o_proj.weight, o_before)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_pruned_checkpoint_reloads_with_plain_loaders(family, ratio, tmp_path):
    model = tiny_model(family)
    adapter, selection = random_selection(model, ratio, seed=2)
    adapter.apply(model, selection)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    keep = 32 - int(32 * ratio)
    assert reloaded.model.layers[0].attn.head_k_dim == keep
    assert reloaded.model.layers[0].attn.head_v_dim == model.model.layers[0].attn.head_v_dim
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=0)


def test_pruned_model_generates(family):
    model = tiny_model(family)
    adapter, selection = random_selection(model, 0.5)
    adapter.apply(model, selection)
    out = model.generate(TOKENS[:1, :10], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 16)


def test_deltanet_with_output_gate_and_conv_bias(kernel_scale):
    model = tiny_model("deltanet", use_gate=True)
    for layer in model.model.layers:  # conv biases must be sliced (and zeroed) with their channels
        for conv in (layer.attn.q_conv1d, layer.attn.k_conv1d):
            conv.bias = torch.nn.Parameter(0.1 * torch.randn(conv.weight.shape[0]))
    adapter, selection = random_selection(model, 0.5)
    zeroed, sliced = copy.deepcopy(model), copy.deepcopy(model)
    adapter.zero(zeroed, selection)
    adapter.apply(sliced, selection)
    assert sliced.model.layers[0].attn.q_conv1d.bias.shape == (32,)
    kernel_scale(16**-0.5)
    torch.testing.assert_close(logits(sliced), logits(zeroed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["deltanet-tiny", "gated-deltanet-tiny"])
def test_trained_zoo_models_slice_exactly(name, kernel_scale):
    """The same check on the shipped (trained) models, through the harness loader, with DRRQR."""
    import harness
    from harness.calibration import CalibrationSpec, calibration_batches
    from harness.methods.drrqr import DRRQR

    loaded = harness.load_model(name)
    adapter = adapter_for(loaded.model)
    batches = calibration_batches(loaded.tokenizer, CalibrationSpec(samples=4, seq_len=128))
    selection = DRRQR().select(adapter.capture(loaded.model, batches, DRRQR.needs), 0.5, adapter.family)
    zeroed, sliced = copy.deepcopy(loaded.model), loaded.model
    adapter.zero(zeroed, selection)
    adapter.apply(sliced, selection)
    ids = batches[0][:2]
    at_own_scale = logits(sliced, ids)
    kernel_scale(16**-0.5)
    torch.testing.assert_close(logits(sliced, ids), logits(zeroed, ids), rtol=1e-5, atol=1e-4)
    # without forcing, the sliced model runs at its own default scale: on a trained model the output
    # RMSNorm absorbs that factor almost entirely
    torch.testing.assert_close(at_own_scale, logits(zeroed, ids), rtol=0, atol=5e-2)


def test_capture_inputs_and_gradients_match_direct_computation(family):
    from harness.method import GRADIENTS, INPUTS

    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = [TOKENS, LONG[:, :64]]
    (first, *_rest) = adapter.capture(model, batches, frozenset({INPUTS, GRADIENTS}))
    attn = model.model.layers[0].attn
    seen = []
    handle = attn.q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    model.zero_grad()
    for ids in batches:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    handle.remove()
    expected_sq = sum(x.reshape(-1, x.shape[-1]).pow(2).sum(0) for x in seen)
    torch.testing.assert_close(first.x_sq, expected_sq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first.q_grad, attn.q_proj.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(first.k_grad, attn.k_proj.weight.grad, rtol=1e-4, atol=1e-6)
    assert first.q_grad.abs().sum() > 0 and first.q is None  # activations were not asked for


def test_streamed_activations_are_gram_exact(family):
    """Capture keeps per head a triangular factor R with R^T R = M^T M over every calibration row,
    batch by batch: bounded memory, and exact for QR-, pivot- and PCA-based selectors."""
    from harness.method import ACTIVATIONS

    model = tiny_model(family)
    adapter = adapter_for(model)
    batches = [TOKENS, LONG[:, :90], LONG[:1]]
    rows = []
    attn = model.model.layers[1].attn
    handle = attn.k_conv1d.register_forward_hook(lambda _m, _i, out: rows.append(out[0].detach().reshape(-1, 2, 32)))
    layers = adapter.capture(model, batches, frozenset({ACTIVATIONS}))
    handle.remove()
    full = torch.cat(rows).double()  # every key row of layer 1: (tokens, heads, d)
    factor = layers[1].k.double()
    assert factor.shape[0] <= 32 < full.shape[0]
    for h in range(2):
        torch.testing.assert_close(factor[:, h].T @ factor[:, h], full[:, h].T @ full[:, h], rtol=1e-5, atol=1e-4)
