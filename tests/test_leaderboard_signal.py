"""`harness leaderboard` stops with its server: a SIGTERM to the command leaves nothing answering
on the port (the command execs Streamlit, so the signal reaches the server itself)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok"
    except OSError:
        return False


def test_sigterm_to_the_command_stops_the_server(leaderboard_store, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    harness = Path(sys.executable).with_name("harness")
    with (tmp_path / "streamlit.log").open("w") as log:
        proc = subprocess.Popen(
            [str(harness), "leaderboard", "--store", str(leaderboard_store), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # its own process, not a process group
        try:
            deadline = time.monotonic() + 90
            while not answers(url):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "streamlit.log").read_text()
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)  # to the PID `harness leaderboard` started with, only
            assert proc.wait(timeout=30) is not None
            deadline = time.monotonic() + 10
            while answers(url) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not answers(url), "the server still answers after its command was stopped"
        finally:
            if proc.poll() is None:
                proc.kill()
