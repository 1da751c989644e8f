"""The Streamlit leaderboard over the results store: `harness leaderboard` runs `app.py`."""

from pathlib import Path

APP = Path(__file__).with_name("app.py")
