"""Plugins register through the entry point; a broken one is listed as broken, nothing else fails."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

GOOD = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "toy-harness-plugin"
        version = "0.1"
        [project.entry-points."harness.methods"]
        first-k = "toy_plugin:FirstK"
    """,
    "toy_plugin.py": """
        from dataclasses import dataclass
        import numpy as np
        from harness.method import Method

        @dataclass
        class FirstK(Method):
            name = "first-k"
            families = ("deltanet", "gated_deltanet")
            paper = "toy plugin: keeps the first channels"
            needs = frozenset()

            def select_head(self, layer, head, n_keep, rng):
                return np.arange(n_keep)
    """,
}
BROKEN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "broken-harness-plugin"
        version = "0.1"
        [project.entry-points."harness.methods"]
        broken-method = "broken_plugin:Nope"
        [project.entry-points."harness.suites"]
        broken-suite = "broken_plugin:Nope"
    """,
    "broken_plugin.py": """
        import a_dependency_that_is_not_installed  # noqa: F401
    """,
}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    for name, files in (("good", GOOD), ("broken", BROKEN)):
        pkg = root / name
        pkg.mkdir()
        for fname, body in files.items():
            (pkg / fname).write_text(textwrap.dedent(body))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(site),
                str(pkg),
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
    env = {**os.environ, "PYTHONPATH": str(site)}
    return env, root


def harness(env, *args):
    # cwd outside the checkout: the installed package must be what runs, not the source folders
    return subprocess.run(
        [sys.executable, "-m", "harness.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=env["PYTHONPATH"],
    )


def test_list_shows_plugin_and_broken_plugin(plugin_env):
    env, _ = plugin_env
    result = harness(env, "list", "methods")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    good = next(line for line in lines if "first-k" in line)
    assert " ok " in good and "toy-harness-plugin" in good
    broken = next(line for line in lines if "broken-method" in line)
    assert "broken: ModuleNotFoundError" in broken
    assert any("drrqr" in line and " ok " in line for line in lines)  # built-ins unaffected
    suites = harness(env, "list", "suites")
    assert suites.returncode == 0 and "broken-suite" in suites.stdout and "ppl" in suites.stdout


def test_plugin_method_runs_and_broken_one_fails_cleanly(plugin_env):
    env, root = plugin_env
    store = root / "r.sqlite"
    result = harness(
        env,
        "run",
        "--model",
        "deltanet-tiny",
        "--method",
        "first-k",
        "--ratio",
        "0.5",
        "--suite",
        "ppl",
        "--suite-param",
        "ppl.limit=1024",
        "--store",
        str(store),
        "-q",
    )
    assert result.returncode == 0, result.stderr
    assert "first-k" in result.stdout and "0.5" in result.stdout
    from harness.selection import ChannelSelection
    from harness.store import ResultStore

    rows = [r for r in ResultStore(store).table(method="first-k") if r["suite"] == "ppl"]
    assert rows and rows[0]["status"] == "complete" and rows[0]["kept_ratio"] == 0.5
    selection = ChannelSelection.load(Path(rows[0]["artifacts"]) / "selection.json")
    assert all(kept == tuple(range(16)) for layer in selection.layers.values() for kept in layer.kept)

    broken = harness(env, "run", "--method", "broken-method", "--store", str(store))
    assert broken.returncode == 2
    assert "failed to load (ModuleNotFoundError" in broken.stderr and "Traceback" not in broken.stderr
    # `all` skips the broken suite instead of failing the run
    result = harness(
        env,
        "run",
        "--model",
        "deltanet-tiny",
        "--method",
        "random",
        "--suite",
        "all",
        "--suite-param",
        "ppl.limit=512",
        "--store",
        str(store),
        "-q",
    )
    assert result.returncode == 0, result.stderr


def test_leaderboard_method_cards_include_plugins(plugin_env, tmp_path):
    env, _ = plugin_env
    script = textwrap.dedent("""
        from streamlit.testing.v1 import AppTest
        from harness.leaderboard import APP
        at = AppTest.from_file(str(APP), default_timeout=120).run()
        assert not at.exception, at.exception
        cards = next(t for t in at.tabs if t.label == "methods")
        print("\\n".join(s.value for s in cards.subheader))
        print("\\n".join(t.value for t in cards.text))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "HARNESS_STORE": str(tmp_path / "none.sqlite")},
        cwd=env["PYTHONPATH"],
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert r"first\-k" in lines and "drrqr" in lines  # card titles (markdown-escaped names)
    assert any(line.startswith("plugin from package toy-harness-plugin · toy_plugin:FirstK · ok") for line in lines)
    assert any("broken: ModuleNotFoundError" in line for line in lines)
