"""The leaderboard in a real browser: `harness leaderboard` on a free loopback port, Debian's
chromium driven by playwright-python. The README's test command installs chromium first
(tests/setup-browser.sh); where it cannot be installed this test skips and says so."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium on this machine: `bash tests/setup-browser.sh` installs Debian's (needs root or sudo)",
)
# flags for a closed network: no background connections, no sandbox as root (the env notes)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(leaderboard_store, tmp_path):
    port = free_port()
    harness = Path(sys.executable).with_name("harness")
    log = (tmp_path / "streamlit.log").open("w")
    proc = subprocess.Popen(
        [str(harness), "leaderboard", "--store", str(leaderboard_store), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("harness leaderboard did not start:\n" + (tmp_path / "streamlit.log").read_text())
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_table_and_plot_render_in_chromium(server, evil_name, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    dialogs: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
            page.goto(server, wait_until="domcontentloaded")

            table = page.locator('[data-testid="stDataFrame"]').first
            expect(table).to_be_visible(timeout=90_000)
            box = table.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 100
            # the data grid draws on a canvas and mirrors its cells in an accessible table
            for text in ("drrqr", "random", "dense", "deltanet-tiny"):
                expect(table.get_by_text(text, exact=True).first).to_be_attached()
            # the first screen leads with a headline metric that has values (the grid's accessible mirror)
            headers = table.locator("th").all_text_contents()
            first = next(i for i, h in enumerate(headers) if "." in h)
            assert headers[first] == "compression.kept_ratio", headers
            column = [row.locator("td").all_text_contents()[first] for row in table.locator("tbody tr").all()]
            assert sum(cell.strip() != "" for cell in column) >= 3, column  # dense, drrqr, random
            page.screenshot(path=str(tmp_path / "leaderboard.png"), full_page=True)

            page.get_by_role("tab", name="pareto").click()
            chart = page.locator('[data-testid="stVegaLiteChart"]').first
            expect(chart).to_be_visible(timeout=60_000)  # the default axes (nothing chosen): points below
            # Vega draws SVG: one point mark per (method, ratio) row, and axes with numeric ticks
            points = chart.locator("g.mark-symbol.role-mark path")
            expect(points).to_have_count(5, timeout=30_000)  # dense; drrqr and random each at 0 and 0.5
            expect(chart.locator("g.role-axis-label text").first).to_be_attached()
            page.screenshot(path=str(tmp_path / "pareto.png"), full_page=True)

            # a method named <script>...: shown as text in the run picker, never run
            page.get_by_role("tab", name="run detail").click()
            expect(page.get_by_text(evil_name).first).to_be_visible(timeout=30_000)
            assert page.evaluate("() => document.querySelectorAll('script').length") == page.evaluate(
                "() => [...document.querySelectorAll('script')].filter(s => !s.textContent.includes('alert(1)')).length"
            )
            page.screenshot(path=str(tmp_path / "run-detail.png"), full_page=True)
        finally:
            browser.close()
    assert dialogs == []
    for name in ("leaderboard.png", "pareto.png", "run-detail.png"):
        assert (tmp_path / name).stat().st_size > 10_000
