"""Bad input: one line on stderr, exit code 2, no traceback, nothing stored."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from harness.cli import app

runner = CliRunner()


def harness(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--method", "nope"], "unknown method 'nope'; registered methods: drrqr"),
        (["run", "--method", "random", "--suite", "nope"], "unknown suite 'nope'"),
        (["run", "--method", "random", "--ratio", "1.0"], "ratio must be in [0, 1)"),
        (["run", "--method", "random", "--ratio", "-0.1"], "ratio must be in [0, 1)"),
        (["run", "--method", "random", "--ratio", "abc"], "--ratio expects numbers"),
        (["run", "--method", "random", "--ratio", "0.99"], "keeps 0 of 32 key channels"),
        (["run", "--method", "random", "--model", "./no/such/model"], "model path './no/such/model' does not exist"),
        (["run", "--method", "drrqr", "-p", "f=0.5"], "bad parameters for method drrqr: f must be >= 1"),
        (["run", "--method", "drrqr", "-p", "g=1"], "unknown parameter 'g' for method drrqr"),
        (["run", "--method", "random", "--suite-param", "ppl.stride=0"], "bad parameters for suite ppl"),
        (["run", "--method", "random", "--device", "tpu"], "unknown device 'tpu'"),
        (["list", "widgets"], "unknown listing 'widgets'"),
        (
            ["run", "--method", "drrqr", "-p", "f=nan"],
            "parameter 'f' of method drrqr must be a finite number, got 'nan'",
        ),
        (["run", "--method", "drrqr", "-p", "f=1e100000"], "must be a finite number, got '1e100000'"),
        (["run", "--method", "random", "--ratio", ""], "--ratio is empty"),
        (["run", "--method", "random", "-p", "seed=" + "9" * 100_000], "... (100002 characters)"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
    result = harness(*args, "--store", str(tmp_path / "r.sqlite")) if args[0] == "run" else harness(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in " ".join(lines)
    assert "Traceback" not in result.output
    assert len(lines[0]) < 400  # a huge value is not echoed whole


def test_method_not_supporting_family(tmp_path):
    from conftest import tiny_config
    from transformers import LlamaConfig, LlamaForCausalLM

    from harness.method import LINEAR_FAMILIES  # wanda, like every linear method, supports each of them
    from harness.zoo import default_path

    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=2048,
        )
    )
    model.save_pretrained(tmp_path / "llama")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(default_path("deltanet-tiny")).save_pretrained(tmp_path / "llama")
    result = harness(
        "run", "--method", "wanda", "--model", str(tmp_path / "llama"), "--store", str(tmp_path / "r.sqlite")
    )
    assert result.exit_code == 2
    assert f"method 'wanda' supports {', '.join(LINEAR_FAMILIES)} models" in result.stderr
    assert "is llama" in result.stderr
    assert tiny_config  # the shared fixture module is importable here too


def test_unsupported_architecture_and_mismatched_weights(tmp_path):
    import json

    from conftest import tiny_model

    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    result = harness(
        "run", "--method", "random", "--model", str(tmp_path / "weird"), "--store", str(tmp_path / "r.sqlite")
    )
    assert result.exit_code == 2 and "unsupported architecture 'gpt2'" in result.stderr

    model = tiny_model("deltanet")
    model.save_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    config["expand_k"] = 0.5  # weights are for 1.0
    (tmp_path / "bad" / "config.json").write_text(json.dumps(config))
    result = harness(
        "run", "--method", "random", "--model", str(tmp_path / "bad"), "--store", str(tmp_path / "r.sqlite")
    )
    assert result.exit_code == 2
    assert "does not match its config" in result.stderr


def test_uncached_hub_id_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = harness(
        "run", "--method", "random", "--model", "some-org/some-model", "--store", str(tmp_path / "r.sqlite")
    )
    assert result.exit_code == 2
    assert (
        "'some-org/some-model' is not a local folder, a zoo name, or a hub id available in the local cache (offline)"
        in result.stderr
    )


def test_real_process_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--method", "nope", "--store", str(tmp_path / "r.sqlite")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown method 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_help_for_every_command():
    for args in (
        ["--help"],
        ["run", "--help"],
        ["list", "--help"],
        ["show", "--help"],
        ["zoo", "--help"],
        ["zoo", "build", "--help"],
    ):
        result = harness(*args)
        assert result.exit_code == 0 and "Usage" in result.output


def test_a_reader_that_stops_early_is_not_an_error():
    """`harness list | head -3`: the pipe closes while harness still writes; exit 0, nothing on stderr."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", "from harness.cli import main; main()", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd="/",
    )
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_the_command_line_hides_library_deprecations_only():
    import warnings

    from harness.cli import quiet_libraries

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        for module in ("transformers.modeling_utils", "fla.layers.utils", "harness.pipeline"):
            warnings.warn_explicit("old API", FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("a real problem", UserWarning, "x.py", 1, module="transformers.generation")
    assert [(str(w.message), w.category) for w in seen] == [("old API", FutureWarning), ("a real problem", UserWarning)]


def test_another_programs_database_is_refused_and_left_alone(tmp_path):
    import sqlite3

    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE users (id INTEGER)")
    before = other.read_bytes()
    result = runner.invoke(app, ["run", "--method", "random", "--suite", "ppl", "--store", str(other)])
    assert result.exit_code == 2 and "another program's SQLite database (tables: users)" in result.stderr
    assert other.read_bytes() == before  # no harness table added
    shown = runner.invoke(app, ["show", "--store", str(other)])
    assert shown.exit_code == 2 and "not a harness results store" in shown.stderr


def test_a_store_that_cannot_be_written_fails_before_any_model_loads(tmp_path, monkeypatch):
    from harness import pipeline

    monkeypatch.setattr(pipeline, "plan", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(
        app, ["run", "--method", "random", "--suite", "ppl", "--store", str(tmp_path / "afile" / "r.sqlite")]
    )
    assert (
        result.exit_code == 2
        and "cannot create its folder" in result.stderr
        and "pass a writable --store" in result.stderr
    )


def test_weights_that_give_nan_make_failed_cells_with_their_reason(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from harness.store import ResultStore
    from harness.zoo import default_path

    folder = tmp_path / "nan-model"
    loaded = AutoTokenizer.from_pretrained(default_path("deltanet-tiny"))
    from transformers import AutoModelForCausalLM

    from harness.loader import _register_fla

    _register_fla()
    model = AutoModelForCausalLM.from_pretrained(default_path("deltanet-tiny"))
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    loaded.save_pretrained(folder)
    store = tmp_path / "r.sqlite"
    result = runner.invoke(
        app,
        [
            "run",
            "--method",
            "random",
            "--model",
            str(folder),
            "--suite",
            "ppl",
            "--suite-param",
            "ppl.limit=256",
            "--store",
            str(store),
            "-q",
        ],
    )
    assert result.exit_code == 1, result.output
    assert "failed cell: dense 0.0 ppl: non-finite ppl=nan" in result.stderr
    cells = {(r["method"], r["suite"]): r for r in ResultStore(store).table(suite="ppl")}
    assert {r["status"] for r in cells.values()} == {"failed"}
    assert all("NaN or infinite weights" in r["error"] for r in cells.values())


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_unreadable_weights_are_one_line(tmp_path, damage):
    import shutil

    from harness.zoo import default_path

    folder = tmp_path / "model"
    shutil.copytree(default_path("deltanet-tiny"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x07" * 4096)
    result = harness("run", "--method", "random", "--model", str(folder), "--store", str(tmp_path / "r.sqlite"))
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "weights of" in lines[0] and "save or download it again" in lines[0], lines


def test_an_unknown_method_is_refused_before_torch_is_imported():
    import subprocess
    import sys

    code = (
        "import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
        "from harness.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "run", "--method", "nope"], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert proc.returncode == 2 and "unknown method 'nope'" in proc.stderr
    assert "torch imported: False" in proc.stdout


def test_custom_code_architecture_and_a_broken_tokenizer_say_what_to_do(tmp_path):
    import json
    import shutil

    from harness.zoo import default_path

    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(
        json.dumps({"model_type": "my_new_arch", "auto_map": {"AutoConfig": "configuration_mine.MyConfig"}})
    )
    result = harness(
        "run", "--method", "random", "--model", str(tmp_path / "custom"), "--store", str(tmp_path / "r.sqlite")
    )
    assert result.exit_code == 2 and "--trust-remote-code" in result.stderr and "auto_map" in result.stderr

    folder = tmp_path / "no-tokenizer"
    shutil.copytree(default_path("deltanet-tiny"), folder)
    for f in folder.iterdir():
        if "token" in f.name:
            f.unlink()
    result = harness("run", "--method", "random", "--model", str(folder), "--store", str(tmp_path / "r.sqlite"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "no usable tokenizer" in lines[0], result.stderr
    assert not lines[0].rstrip().endswith(":")  # the library's message whole, not cut before its list


def test_the_cli_names_the_loaders_default_model():
    from harness import cli, loader

    assert cli.DEFAULT_MODEL == loader.DEFAULT_MODEL
