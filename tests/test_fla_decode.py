"""fla's one-token decode step on our kernel (kernels/fla_decode.py, reached through fla_cpu's wrappers).

CPU (CI): the routing rule (`refusal`) and the backend switch; CPU tensors still take the torch
references, untouched; the fast path's handling of fla's arguments, run on the kernel's torch twin
(fla_decode.KERNEL_DEVICES widened to "cpu") and on the Triton kernel under Triton's CPU
interpreter, against the token-loop references of fla's ops; a tiny fla model generating through it.
GPU: the installed fla ops against fla's originals, and fla DeltaNet / Gated DeltaNet models
generating with the fast path against HARNESS_FLA_DECODE=fla. Self-contained (no conftest
fixtures): it imports the installed `harness` package and installs the fla switch itself.
"""

from __future__ import annotations

import functools
import textwrap

import pytest
import torch

from harness.kernels import delta_rule, fla_cpu, fla_decode
from harness.kernels.fla_decode import refusal
from triton_interpreter import max_difference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fast path is Triton on a GPU)")
OPS = {
    "plain": "fused_recurrent_delta_rule",
    "gated": "fused_recurrent_gated_delta_rule",
    "layer": "fused_recurrent_gated_delta_rule",
}
REFERENCES = {
    "fused_recurrent_delta_rule": delta_rule.delta_rule_recurrent,
    "fused_recurrent_gated_delta_rule": delta_rule.gated_delta_rule_recurrent,
}
ENTRIES = {
    "fused_recurrent_delta_rule": fla_decode.delta_rule_decode,
    "fused_recurrent_gated_delta_rule": fla_decode.gated_delta_rule_decode,
}


@pytest.fixture(scope="module", autouse=True)
def _installed():
    fla_cpu.install()


@pytest.fixture
def steps(monkeypatch):
    """The list of delta_rule_step calls the fast path makes while the test runs."""
    calls, step = [], fla_decode.delta_rule_step

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return step(*args, **kwargs)

    monkeypatch.setattr(fla_decode, "delta_rule_step", counted)
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    return calls


def step_args(
    kind="plain", b=2, h=2, dk=16, dv=8, t=1, varlen=False, state=True, device="cpu", dtype=torch.float32, seed=0
) -> dict:
    """Keyword arguments of a fla fused_recurrent call, as fla's layers make it. kind: "plain"
    (DeltaNet), "gated" (log-space g, [K, V] state) or "layer" (what GatedDeltaNet passes: raw gate
    with A_log / dt_bias, raw beta, [V, K] state, 2 value heads per key head)."""
    gen = torch.Generator().manual_seed(seed)
    hv = 2 * h if kind == "layer" else h
    r = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    args = dict(
        q=r(b, t, h, dk),
        k=r(b, t, h, dk),
        v=r(b, t, hv, dv),
        beta=r(b, t, hv).sigmoid(),
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )
    if kind == "gated":
        args["g"] = -torch.rand(b, t, hv, generator=gen)
    if kind == "layer":
        args.update(
            g=r(b, t, hv),
            beta=r(b, t, hv),
            A_log=torch.rand(hv, generator=gen).add(1).log(),
            dt_bias=0.1 * r(hv),
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            state_v_first=True,
        )
    if state:
        args["initial_state"] = 0.1 * (r(b, hv, dv, dk) if kind == "layer" else r(b, hv, dk, dv))
    if varlen:  # a padded batch's decode step: [1, N] tokens, one per sequence
        args.update({n: args[n].transpose(0, 1) for n in ("q", "k", "v", "beta", "g") if n in args})
        args["cu_seqlens"] = torch.arange(b + 1, dtype=torch.int32)
    return {
        n: x.to(device, dtype if x.dtype == torch.float32 and n in ("q", "k", "v", "beta", "g") else x.dtype)
        if torch.is_tensor(x)
        else x
        for n, x in args.items()
    }


def clone(args: dict) -> dict:
    return {n: x.clone() if torch.is_tensor(x) else x for n, x in args.items()}


def rel_err(got, want) -> float:
    """max |got - want| over max |want|: bf16 rounding is relative to a tensor's scale."""
    got, want = got.double(), want.double()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# CPU: the rule, the switch, the CPU path


def test_decode_backend_is_read_at_call_time(monkeypatch):
    monkeypatch.delenv(fla_decode.ENV, raising=False)
    assert fla_decode.decode_backend() == "auto"
    for value, expected in (("fla", "fla"), (" FLA ", "fla"), ("ours", "ours"), ("", "auto"), ("Auto", "auto")):
        monkeypatch.setenv(fla_decode.ENV, value)
        assert fla_decode.decode_backend() == expected
    monkeypatch.setenv(fla_decode.ENV, "triton")
    with pytest.raises(ValueError, match="HARNESS_FLA_DECODE"):
        fla_decode.decode_backend()


def _why(kind="plain", devices=("cpu",), unsupported=(), **over):
    args = {**step_args(kind, **{k: over.pop(k) for k in ("t", "varlen", "state") if k in over}), **over}
    args.pop("use_qk_l2norm_in_kernel")
    return refusal(**args, gated=kind != "plain", unsupported=unsupported, devices=devices)


def _state(kind, dtype=torch.float32, transpose=False):
    s = step_args(kind)["initial_state"].to(dtype)
    return s.transpose(-1, -2).contiguous().transpose(-1, -2) if transpose else s


@pytest.mark.parametrize(
    "case, kwargs",
    [
        ("plain decode step", {}),
        ("no initial state (zeros)", dict(state=False)),
        ("padded batch: one token per packed sequence", dict(varlen=True)),
        ("gated, log-space g", dict(kind="gated")),
        ("GatedDeltaNet's call: raw gate, beta sigmoid, [V, K] state, grouped value heads", dict(kind="layer")),
        ("... with allow_neg_eigval", dict(kind="layer", allow_neg_eigval=True)),
    ],
)
def test_refusal_accepts_one_token_steps(case, kwargs):
    assert _why(**kwargs) is None, case


@pytest.mark.parametrize(
    "expected, kwargs",
    [
        ("tokens per sequence", dict(t=2)),
        ("packed sequences", dict(varlen=True, cu_seqlens=torch.tensor([0, 2], dtype=torch.int32))),
        ("output_final_state=False", dict(output_final_state=False)),
        ("not contiguous float32", dict(initial_state=_state("plain", torch.bfloat16))),
        ("not contiguous float32", dict(initial_state=_state("plain", transpose=True))),
        ("not contiguous float32", dict(kind="layer", state_v_first=False)),  # [V, K] state read as [K, V]
        ("not contiguous float32", dict(initial_state=_state("plain")[:1])),
        ("unsupported arguments: gk", dict(kind="gated", unsupported=("gk",))),
        ("one value per head", dict(beta=torch.rand(2, 1, 2, 8))),  # per-channel beta
        ("value heads over", dict(v=torch.randn(2, 1, 4, 8))),  # the plain op groups no value heads
        ("use_gate_in_kernel without", dict(kind="layer", A_log=None)),
        ("allow_neg_eigval without", dict(kind="gated", allow_neg_eigval=True)),
        ("scale <= 0", dict(scale=-1.0)),
        ("the kernel runs on cuda", dict(devices=("cuda",))),  # CPU tensors: never our kernel
        ("the kernel runs on cpu", dict(initial_state=torch.empty(2, 2, 16, 8, device="meta"))),  # mixed devices
        ("needs a gradient", dict(q=torch.randn(2, 1, 2, 16, requires_grad=True))),
    ],
)
def test_refusal_sends_everything_else_to_fla(expected, kwargs):
    why = _why(**kwargs)
    assert why is not None and expected in why, why


def test_refusal_allows_gradient_free_calls_on_trainable_tensors():
    with torch.no_grad():
        assert _why(q=torch.randn(2, 1, 2, 16, requires_grad=True)) is None


@pytest.mark.parametrize("kind", list(OPS))
def test_cpu_tensors_still_take_the_references(kind, steps):
    import fla.ops

    args = step_args(kind)
    op = getattr(fla.ops, OPS[kind])
    assert fla_cpu.installed() and op._harness_reference is REFERENCES[OPS[kind]]
    o, state = op(**clone(args))
    o_ref, state_ref = REFERENCES[OPS[kind]](**clone(args))
    assert torch.equal(o, o_ref) and torch.equal(state, state_ref)
    assert steps == []  # the fast path was never consulted


@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.parametrize("varlen, state", [(False, True), (True, True), (False, False)])
def test_fast_path_on_the_twin_computes_what_fla_computes(kind, varlen, state, steps, monkeypatch):
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))  # run the kernel's torch twin on CPU tensors
    args = step_args(kind, varlen=varlen, state=state)
    fail = lambda **_: pytest.fail("fell back to fla")  # noqa: E731
    ours = clone(args)
    o, final = ENTRIES[OPS[kind]](fail, **ours)
    o_ref, final_ref = REFERENCES[OPS[kind]](**clone(args))
    assert len(steps) == 1 and o.shape == o_ref.shape and o.dtype == o_ref.dtype and final.shape == final_ref.shape
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, final_ref, atol=1e-5, rtol=1e-5)
    if state:
        assert final is ours["initial_state"]  # updated in place


@pytest.mark.parametrize("kind", list(OPS))
def test_other_calls_reach_fla_with_their_arguments(kind, steps, monkeypatch):
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    seen = []
    original = lambda **kwargs: seen.append(kwargs) or "fla"  # noqa: E731
    prefill = step_args(kind, t=3)
    assert ENTRIES[OPS[kind]](original, **prefill) == "fla"
    assert all(seen[0][n] is x for n, x in prefill.items())
    monkeypatch.setenv(fla_decode.ENV, "fla")
    assert ENTRIES[OPS[kind]](original, **step_args(kind)) == "fla"
    assert len(seen) == 2 and steps == []


INTERPRETED = textwrap.dedent("""
    import torch
    from harness.kernels import delta_rule, fla_decode
    fla_decode.KERNEL_DEVICES = ("cpu",)
    gen = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=gen)
    worst = 0.0
    for gated, h, hv, dk, dv in ((False, 3, 3, 24, 16), (True, 2, 4, 32, 40), (True, 2, 2, 8, 16)):
        args = dict(q=r(2, 1, h, dk), k=r(2, 1, h, dk), v=r(2, 1, hv, dv), beta=r(2, 1, hv),
                    output_final_state=True, use_qk_l2norm_in_kernel=True)
        if gated:  # GatedDeltaNet's call
            args.update(g=r(2, 1, hv), A_log=r(hv).abs().log(), dt_bias=r(hv), use_gate_in_kernel=True,
                        use_beta_sigmoid_in_kernel=True, allow_neg_eigval=dk == 32, state_v_first=dk == 32)
            shape = (2, hv, dv, dk) if dk == 32 else (2, hv, dk, dv)
        else:
            args["beta"], shape = args["beta"].sigmoid(), (2, hv, dk, dv)
        state = r(*shape)
        entry = fla_decode.gated_delta_rule_decode if gated else fla_decode.delta_rule_decode
        reference = delta_rule.gated_delta_rule_recurrent if gated else delta_rule.delta_rule_recurrent
        o, s = entry(None, initial_state=state.clone(), **args)
        o_ref, s_ref = reference(initial_state=state.clone(), **args)
        worst = max(worst, (o - o_ref).abs().max().item(), (s - s_ref).abs().max().item())
    print("max difference", worst)
""")


def test_fast_path_on_the_triton_kernel_under_the_cpu_interpreter():
    assert max_difference(INTERPRETED, drop_env=(fla_decode.ENV,)) < 1e-5


# --------------------------------------------------------------------------------------------
# models: greedy generation, fast path vs fla's decode


def tiny_model(family: str, device="cpu", dtype=torch.float32, hidden=64, heads=2):
    from fla.models import DeltaNetConfig, DeltaNetForCausalLM, GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    # eos None: every generation runs all its steps
    common = dict(hidden_size=hidden, num_hidden_layers=2, num_heads=heads, vocab_size=512, eos_token_id=None)
    torch.manual_seed(0)
    if family == "deltanet":
        model = DeltaNetForCausalLM(DeltaNetConfig(**common))
    else:
        model = GatedDeltaNetForCausalLM(GatedDeltaNetConfig(head_dim=hidden // heads, **common))
    return model.to(device, dtype).eval()


def generate(model, prompt, new_tokens):
    """Greedy generation recording every attention layer's output at every forward."""
    outputs = {i: [] for i in range(len(model.model.layers))}
    hooks = [
        layer.attn.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(out[0].float()))
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            out = model.generate(
                prompt,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
    finally:
        for hook in hooks:
            hook.remove()
    return out, outputs


def compare_generations(ours, theirs, prompt_len, near_tie: float, out_tol: float, state_tol: float) -> int:
    """Same tokens, then per-forward layer outputs and final states close. bf16 logits of a random
    model have near-ties that the two kernels' roundings may break differently: tokens may differ
    only where fla's top-2 logits are within `near_tie` (relative), and from there on nothing is
    compared. Returns the number of new tokens compared."""
    (out, layers), (ref, ref_layers) = ours, theirs
    new, ref_new = out.sequences[:, prompt_len:], ref.sequences[:, prompt_len:]
    logits = torch.stack(ref.logits, 1).float()  # [B, steps, vocab]
    top2 = logits.topk(2, -1).values
    margin = (top2[..., 0] - top2[..., 1]) / logits.abs().amax(-1)
    agreed = new.shape[1]
    for step in range(new.shape[1]):
        differ = new[:, step] != ref_new[:, step]
        if differ.any():
            assert margin[:, step][differ].max() <= near_tie, f"token {step} differs where fla's choice is clear"
            agreed = step
            break
    for i in layers:  # forward j reads new token j - 1: identical inputs for j <= agreed
        for j, (got, want) in enumerate(zip(layers[i][: agreed + 1], ref_layers[i][: agreed + 1])):
            assert rel_err(got, want) <= out_tol, f"layer {i} forward {j}: {rel_err(got, want):.2e}"
    if agreed == new.shape[1]:
        for i in layers:
            got, want = out.past_key_values[i]["recurrent_state"], ref.past_key_values[i]["recurrent_state"]
            assert rel_err(got, want) <= state_tol, f"layer {i} state: {rel_err(got, want):.2e}"
    return agreed


@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
def test_fla_model_generates_through_the_fast_path_on_cpu(family, steps, monkeypatch):
    """fla's layers with their real cache, stepping the state in place (the kernel's twin on CPU)."""
    import fla.layers.delta_net as dn
    import fla.layers.gated_deltanet as gdn

    model, prompt = tiny_model(family), torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    reference_run = generate(model, prompt, 6)
    monkeypatch.setattr(fla_decode, "KERNEL_DEVICES", ("cpu",))
    module = dn if family == "deltanet" else gdn
    name = "fused_recurrent_delta_rule" if family == "deltanet" else "fused_recurrent_gated_delta_rule"
    monkeypatch.setattr(module, name, functools.partial(ENTRIES[name], REFERENCES[name]))
    fast_run = generate(model, prompt, 6)
    assert len(steps) == 2 * 5  # every decode forward of both layers
    assert compare_generations(fast_run, reference_run, 12, 0.0, 1e-5, 1e-5) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["deltanet", "gated_deltanet"])
@pytest.mark.gpu
@needs_cuda
def test_fla_model_generates_the_same_tokens_as_fla(family, dtype, steps, monkeypatch):
    model = tiny_model(family, "cuda", dtype, hidden=256, heads=4)
    prompt = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    monkeypatch.setenv(fla_decode.ENV, "fla")
    theirs = generate(model, prompt, 8)
    assert steps == []
    monkeypatch.setenv(fla_decode.ENV, "ours")
    ours = generate(model, prompt, 8)
    assert len(steps) == 2 * 7  # every decode forward of both layers took our kernel
    if dtype is torch.float32:
        assert compare_generations(ours, theirs, 16, 0.0, 1e-4, 1e-3) == 8
    else:  # bf16: fla's DeltaNet rounds l2-normalized q, k to bf16 before its kernel, ours does not
        compare_generations(ours, theirs, 16, 2e-2, 3e-2, 2e-2)


# --------------------------------------------------------------------------------------------
# GPU, op level: the installed fla ops (our kernel inside) against fla's originals


def fla_pair(kind):
    import fla.ops

    op = getattr(fla.ops, OPS[kind])
    return op, op._harness_original


# (o, state) tolerances against fla, relative to the largest value. fla's plain op l2-normalizes q
# and k into bf16 before its kernel (ours: fp32 in the kernel), which moves its state by ~5e-3 and
# o by ~1e-2 after one step (measured: fla's kernels and ours under Triton's interpreter, where
# ours matched fp32 torch to 1e-7); the gated ops do the same fp32 math as ours.
TOLERANCES = {"plain": (3e-2, 2e-2), "gated": (1e-2, 1e-3), "layer": (1e-2, 1e-3)}


@pytest.mark.parametrize("dk", [128, 64])
@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.gpu
@needs_cuda
def test_op_matches_fla(kind, dk, steps, monkeypatch):
    monkeypatch.setenv(fla_decode.ENV, "ours")  # the kernel itself, whatever `auto` chooses
    op, original = fla_pair(kind)
    args = step_args(kind, b=8, h=4, dk=dk, dv=128, device="cuda", dtype=torch.bfloat16)
    ours = clone(args)
    o, state = op(**ours)
    o_ref, state_ref = original(**clone(args))
    assert len(steps) == 1 and state is ours["initial_state"]  # our kernel, in place
    assert o.shape == o_ref.shape and o.dtype == o_ref.dtype and state.shape == state_ref.shape
    errors = rel_err(o, o_ref), rel_err(state, state_ref)
    assert errors[0] <= TOLERANCES[kind][0] and errors[1] <= TOLERANCES[kind][1], errors
    # and against plain torch in fp32 on the same inputs: ours is exact up to o's bf16 rounding
    o_exact, state_exact = REFERENCES[OPS[kind]](**clone(args))
    errors = rel_err(o, o_exact), rel_err(state, state_exact)
    assert errors[0] <= 1e-2 and errors[1] <= 1e-4, errors


@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.gpu
@needs_cuda
def test_op_padded_batch_and_fresh_state_match_fla(kind, steps, monkeypatch):
    monkeypatch.setenv(fla_decode.ENV, "ours")
    op, original = fla_pair(kind)
    o_tol, state_tol = TOLERANCES[kind]
    for args in (
        step_args(kind, b=4, h=4, dk=64, dv=64, varlen=True, device="cuda", dtype=torch.bfloat16),
        step_args(kind, b=4, h=4, dk=64, dv=64, state=False, device="cuda", dtype=torch.bfloat16),
    ):
        (o, state), (o_ref, state_ref) = op(**clone(args)), original(**clone(args))
        assert o.shape == o_ref.shape and state.shape == state_ref.shape
        assert rel_err(o, o_ref) <= o_tol and rel_err(state, state_ref) <= state_tol
    assert len(steps) == 2


@pytest.mark.parametrize("kind", list(OPS))
@pytest.mark.gpu
@needs_cuda
def test_op_calls_it_refuses_are_fla_bit_for_bit(kind, steps, monkeypatch):
    op, original = fla_pair(kind)
    prefill = step_args(kind, h=4, dk=64, dv=64, t=5, device="cuda", dtype=torch.bfloat16)
    decode = step_args(kind, h=4, dk=64, dv=64, device="cuda", dtype=torch.bfloat16)
    for args in (prefill, {**decode, "output_final_state": False}):
        (o, state), (o_ref, state_ref) = op(**clone(args)), original(**clone(args))
        assert torch.equal(o, o_ref) and (state is None and state_ref is None or torch.equal(state, state_ref))
    monkeypatch.setenv(fla_decode.ENV, "fla")
    (o, state), (o_ref, state_ref) = op(**clone(decode)), original(**clone(decode))
    assert torch.equal(o, o_ref) and torch.equal(state, state_ref)
    assert steps == []
