"""A fuzz pass (hypothesis) over every parser and file reader a user feeds: `-p` values of every
method and suite, `--ratio`, sweep files, LeanK masks, results stores, calibration text files and
checkpoint configs. Each bad input is a one-line HarnessError (exit 2 on the command line), never
another exception, and a refused command leaves the store it was pointed at byte for byte.
Derandomized: CI sees the same examples every run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from harness import registry
from harness.errors import HarnessError
from harness.params import build, describe

FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NASTY = st.sampled_from(
    [
        "",
        " ",
        "nan",
        "-inf",
        "inf",
        "1e100000",
        "-0",
        "0x1f",
        "1_000",
        "true",
        "None",
        "[1]",
        "{}",
        "9" * 5000,
        "é",
        "\x00",
        "0.5,0.5",
        "=",
        "a=b",
    ]
)
TEXTS = NASTY | st.text(max_size=80)


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert message and "\n" not in message and len(message) < 600, message
    return message


def refused_or(fn, *args, **kwargs):
    """`fn`'s result, or None when it raised a one-line HarnessError (anything else fails)."""
    try:
        return fn(*args, **kwargs)
    except HarnessError as exc:
        one_line(exc)
        return None


def parameter_cases() -> list[tuple[str, str, str]]:
    out = []
    for group in (registry.METHODS, registry.SUITES):
        for entry in registry.entries(group):
            out += [(group, entry.name, name) for name, _t, _d in describe(entry.obj)]
    return out


PARAMETERS = parameter_cases()


@FUZZ
@given(case=st.sampled_from(PARAMETERS), value=TEXTS)
def test_parameter_values(case, value):
    group, name, parameter = case
    cls = registry.get(group, name)
    made = refused_or(build, cls, {parameter: value}, what=f"{name}")
    if made is not None:
        assert getattr(made, parameter) is not None or value.strip().lower() == "none"


@FUZZ
@given(values=st.lists(TEXTS, max_size=3))
def test_ratio_flags(values):
    from harness.cli import _ratios
    from harness.compress import check_ratios

    ratios = refused_or(_ratios, values)
    if ratios is not None and ratios:
        refused_or(check_ratios, ratios)


def sweep_values():
    scalar = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(allow_nan=True) | TEXTS
    return st.recursive(
        scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXTS, inner, max_size=3), max_leaves=8
    )


SWEEP_KEYS = [
    "models",
    "methods",
    "ratios",
    "suites",
    "suite_params",
    "seeds",
    "recovery",
    "calibration",
    "lora",
    "device",
    "dtype",
    "modles",
]


@FUZZ
@given(
    data=st.dictionaries(st.sampled_from(SWEEP_KEYS) | TEXTS, sweep_values(), max_size=5) | sweep_values(),
    form=st.sampled_from(["yaml", "text", "bytes"]),
    text=st.text(max_size=120),
    payload=st.binary(max_size=120),
    suffix=st.sampled_from([".yaml", ".toml", ".sqlite"]),
)
def test_sweep_files(tmp_path, data, form, text, payload, suffix):
    from harness.sweeps import Grid

    path = tmp_path / f"grid{suffix}"
    if form == "bytes":
        path.write_bytes(payload)
    else:
        path.write_text(text if form == "text" else yaml.safe_dump(data), encoding="utf-8")
    refused_or(Grid.load, path)


@FUZZ
@given(
    payload=st.binary(max_size=300),
    shape=st.lists(st.integers(0, 4), max_size=4),
    fill=st.sampled_from([0.0, 1.0, 0.5, 2.0, float("nan")]),
    as_tensor=st.booleans(),
)
def test_mask_files(tmp_path, payload, shape, fill, as_tensor):
    from harness.leank_mask import load_mask

    path = tmp_path / "mask.pth"
    if as_tensor:
        torch.save(torch.full(shape, fill), path)
    else:
        path.write_bytes(payload)
    mask = refused_or(load_mask, path)
    if mask is not None:
        assert mask.dim() == 3 and bool(mask.any()) and bool(((mask == 0) | (mask == 1)).all())


@FUZZ
@given(payload=st.binary(max_size=2000), read_only=st.booleans())
def test_store_files(tmp_path, payload, read_only):
    from harness.store import ResultStore

    path = tmp_path / "store.sqlite"
    path.write_bytes(payload)
    refused_or(ResultStore, path, read_only=read_only)


@FUZZ
@given(payload=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_calibration_text_files(tmp_path, payload):
    from harness.calibration import load_text

    path = tmp_path / "calib.txt"
    path.write_bytes(payload)
    text = refused_or(load_text, str(path))
    assert text is None or isinstance(text, str)


@settings(FUZZ, max_examples=15)
@given(
    config=st.dictionaries(
        st.sampled_from(["model_type", "auto_map", "hidden_size", "architectures"]) | TEXTS, sweep_values(), max_size=4
    )
    | sweep_values(),
    raw=st.binary(max_size=100),
    use_raw=st.booleans(),
)
def test_checkpoint_configs(tmp_path, config, raw, use_raw):
    from harness.loader import identify, load_model

    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_bytes(raw if use_raw else json.dumps(config).encode())
    refused_or(identify, str(folder))
    refused_or(load_model, str(folder), device="cpu")


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory):
    """A store holding one finished cell (written directly: no model runs)."""
    from harness.results import RunKey
    from harness.store import ResultStore
    from harness.suite import Metric

    path = tmp_path_factory.mktemp("fuzz-store") / "r.sqlite"
    key = RunKey(
        model="deltanet-tiny",
        model_digest="d",
        family="deltanet",
        method="random",
        method_params={},
        ratio=0.5,
        suite="ppl",
        suite_params={},
        seed=0,
    )
    ResultStore(path).begin(key)
    ResultStore(path).finish(key, [Metric("ppl", 12.0)], prov={}, duration_s=0.0)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))).hexdigest()


@settings(FUZZ, max_examples=25)
@given(
    flag=st.sampled_from(["-p", "--suite-param", "--ratio", "--calib-samples", "--dtype", "--device", "--finetune"]),
    value=TEXTS,
)
def test_refused_commands_exit_2_on_one_line_and_leave_the_store(filled_store, flag, value):
    """A command whose suite does not exist cannot run, whatever the fuzzed flag: it is refused
    with exit 2 on one line, and the store it names is left as it was."""
    before = digest(filled_store)
    if flag == "-p":
        value = f"f={value}"
    elif flag == "--suite-param":
        value = f"ppl.limit={value}"
    result = CliRunner().invoke(
        app_of(),
        ["run", "--method", "drrqr", "--suite", "no-such-suite", flag, value, "--store", str(filled_store), "-q"],
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 600, result.stderr
    assert digest(filled_store) == before


def app_of():
    from harness.cli import app

    return app
