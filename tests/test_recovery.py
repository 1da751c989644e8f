"""LoRA recovery: it recovers held-out ppl after pruning, merges to a plain model, is
deterministic, restores the model on failure, and rejects bad input with a clear message."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from harness.methods.random import RandomChannels
from harness.suites.ppl import PerplexitySuite
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import harness
from harness import zoo
from harness.calibration import CalibrationSpec, calibration_batches
from harness.registry import build_method
from harness.families import adapter_for
from harness.recovery import ATTENTION_TARGETS, MLP_TARGETS, LoraSpec, lora_recover
from harness.suite import SuiteContext

TOKENS = torch.randint(3, 2048, (2, 48), generator=torch.Generator().manual_seed(0))
TINY = {"steps": 3, "rank": 4, "batch_size": 2, "seq_len": 32}  # enough to move every adapter


def logits(model, ids=TOKENS):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(zoo.default_path("deltanet-tiny"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small, fixed training text (stdlib sources), so these tests need no corpus build."""
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(Path(json.__file__).read_text() + Path(torch.nn.modules.linear.__file__).read_text())
    return str(path)


def pruned_tiny(family, ratio=0.5):
    """A random-weight fla model (zoo vocabulary) with `ratio` of its key channels sliced out."""
    model = tiny_model(family, vocab_size=2048)
    adapter = adapter_for(model)
    layers = adapter.capture(model, [], RandomChannels.needs)
    adapter.apply(model, RandomChannels(seed=0).select(layers, ratio, adapter.family))
    return model


@pytest.fixture
def one_thread():
    """One torch thread, as the zoo trains: on a small shared CPU, OpenMP threads that compete with
    other processes are many times slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_lora_recovers_ppl_after_drrqr_pruning(tmp_path, one_thread):
    """The acceptance test: DRRQR at 50% on the shipped DeltaNet raises held-out ppl; a short LoRA
    run on the train split brings it back down. Runs in well under a minute on a 2-core CPU."""
    loaded = harness.load_model("deltanet-tiny")
    model, tok = loaded.model, loaded.tokenizer
    adapter = adapter_for(model)
    selector = build_method("drrqr", None, 0)
    layers = adapter.capture(model, calibration_batches(tok, CalibrationSpec(samples=8, seq_len=256)), selector.needs)
    adapter.apply(model, selector.select(layers, 0.5, loaded.family))

    suite = PerplexitySuite(limit=4096)
    ctx = SuiteContext(loaded.family, "cpu", 0, tmp_path, lambda d, t: lambda n=1: None)
    ppl = lambda m: suite.run(m, tok, ctx)[0].value  # noqa: E731
    before = ppl(model)

    steps = []
    spec = LoraSpec(steps=40, batch_size=4, seq_len=256, lr=3e-3)
    recovered, stats = lora_recover(model, tok, spec, advance=lambda n=1: steps.append(n))
    after = ppl(recovered)
    print(
        f"deltanet-tiny, DRRQR 50%: held-out ppl {before:.3f} -> {after:.3f} after LoRA "
        f"({spec.steps} steps, {stats['wall_s']:.1f} s)"
    )

    assert after < 0.99 * before
    assert len(steps) == spec.steps  # one advance() per step
    assert stats["steps"] == 40 and stats["lora_modules"] == 16  # 4 layers x q, k, v, o
    assert stats["trainable_params"] == sum(  # rank x (in + out) per wrapped linear
        spec.rank * (m.in_features + m.out_features)
        for n, m in recovered.named_modules()
        if n.rsplit(".", 1)[-1] in ATTENTION_TARGETS
    )
    assert all(torch.isfinite(torch.tensor([stats["initial_loss"], stats["final_loss"]])))


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
def test_merged_model_is_plain_and_reloads(family, tokenizer, text_file, tmp_path):
    model = pruned_tiny(family)
    head_k_dim = model.model.layers[0].attn.head_k_dim
    config = model.config.to_dict()
    targets = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ATTENTION_TARGETS
    }
    recovered, _ = lora_recover(model, tokenizer, LoraSpec(**TINY), text_file=text_file)

    assert recovered is model and type(recovered) is type(model)
    assert not any("lora" in n.lower() for n, _ in recovered.named_modules())
    assert not any("lora" in n.lower() for n, _ in recovered.named_parameters())
    assert all(type(m) is nn.Linear for n, m in recovered.named_modules() if n.endswith("q_proj"))
    assert all(p.requires_grad for p in recovered.parameters())  # as before: peft froze them while training
    assert not recovered.training
    assert recovered.config.to_dict() == config
    attn = recovered.model.layers[0].attn
    assert attn.head_k_dim == head_k_dim == 16 and attn.q_proj.weight.shape == (2 * 16, 64)
    # gradients reached every adapter (q/k through the conv and the delta-rule CPU references),
    # and the merge wrote them into the plain weights
    assert len(targets) == 8
    assert all(not torch.equal(recovered.get_submodule(n).weight, w) for n, w in targets.items())

    recovered.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(reloaded) is type(model)
    assert reloaded.model.layers[0].attn.head_k_dim == head_k_dim
    torch.testing.assert_close(logits(reloaded), logits(recovered), rtol=0, atol=0)


def test_same_seed_same_weights(tokenizer, text_file):
    def weights(seed):
        model, _ = lora_recover(
            pruned_tiny("deltanet"), tokenizer, LoraSpec(**{**TINY, "seed": seed}), text_file=text_file
        )
        attn = model.model.layers[1].attn
        return [attn.q_proj.weight, attn.k_proj.weight, attn.o_proj.weight]

    first, again, other = weights(0), weights(0), weights(1)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_caller_rng_is_untouched(tokenizer, text_file):
    model = pruned_tiny("deltanet")  # (seeds torch itself)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    lora_recover(model, tokenizer, LoraSpec(**TINY), text_file=text_file)
    assert torch.equal(torch.rand(3), expected)


def test_mlp_targets_train_through_the_fused_swiglu(tokenizer, text_file):
    """fla's fused SwiGLU reads down_proj.weight directly, which would bypass a LoRA wrapper; the
    recovery trains the MLPs unfused, so down_proj is really trained (and the fuse flag comes back)."""
    model = pruned_tiny("gated_deltanet")
    mlp = model.model.layers[0].mlp
    assert mlp.fuse_swiglu
    down = mlp.down_proj.weight.detach().clone()
    recovered, stats = lora_recover(
        model, tokenizer, LoraSpec(**TINY, targets=ATTENTION_TARGETS + MLP_TARGETS), text_file=text_file
    )
    assert stats["lora_modules"] == 2 * 7
    assert mlp.fuse_swiglu
    assert not torch.equal(recovered.model.layers[0].mlp.down_proj.weight, down)


def test_failure_leaves_the_model_as_it_was(tokenizer, text_file):
    model = pruned_tiny("deltanet")
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def interrupt(n=1):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lora_recover(model, tokenizer, LoraSpec(**TINY), text_file=text_file, advance=interrupt)
    assert not any("lora" in n.lower() for n, _ in model.named_modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert all(p.requires_grad for p in model.parameters())


def test_trains_on_the_train_split_by_default(tokenizer, monkeypatch):
    import harness.calibration

    asked = []
    real = harness.calibration.load_text

    def spy(text_file, split="train"):
        asked.append(split)
        return real(text_file, split)

    monkeypatch.setattr(harness.calibration, "load_text", spy)
    from harness.recovery import train_stream

    ids = train_stream(tokenizer)
    assert asked == ["train"]
    assert len(ids) > 100_000


def test_bad_target_names_it(tokenizer, text_file):
    model = pruned_tiny("deltanet")
    with pytest.raises(ValueError, match="'qkv_proj'") as err:
        lora_recover(model, tokenizer, LoraSpec(targets=("q_proj", "qkv_proj")), text_file=text_file)
    assert "\n" not in str(err.value) and "k_proj" in str(err.value)  # one line, listing real names
    with pytest.raises(ValueError, match="'q_conv1d'.*nn.Linear"):
        lora_recover(model, tokenizer, LoraSpec(targets=("q_conv1d",)), text_file=text_file)
    assert not any("lora" in n.lower() for n, _ in model.named_modules())


@pytest.mark.parametrize(
    "bad, word",
    [
        ({"steps": 0}, "steps"),
        ({"rank": 0}, "rank"),
        ({"lr": 0.0}, "lr"),
        ({"targets": ()}, "targets"),
        ({"seq_len": 4}, "seq_len"),
    ],
)
def test_bad_spec_raises(bad, word):
    with pytest.raises(ValueError, match=word):
        LoraSpec(**bad)


def test_spec_key_is_json_and_complete():
    spec = LoraSpec(targets=["q_proj", "k_proj"])
    assert spec.targets == ("q_proj", "k_proj")
    key = json.loads(json.dumps(spec.key()))
    assert key == {
        "steps": 200,
        "rank": 8,
        "alpha": 16.0,
        "lr": 1e-3,
        "batch_size": 8,
        "seq_len": 256,
        "targets": ["q_proj", "k_proj"],
        "seed": 0,
    }
    assert LoraSpec().key() != LoraSpec(seed=1).key()
