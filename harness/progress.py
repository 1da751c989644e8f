"""Progress bars (rich) for long work, and a silent twin for tests and `--quiet`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[..., None]


class Bars:
    """`bars.task("calibrate", total)` returns `advance(n=1)`; disabled bars do nothing."""

    def __init__(self, progress: Progress | None):
        self._progress = progress

    def task(self, description: str, total: int) -> Advance:
        if self._progress is None:
            return lambda n=1: None
        task_id = self._progress.add_task(description, total=total)
        return lambda n=1: self._progress.advance(task_id, n)


@contextmanager
def bars(enabled: bool = True, console: Console | None = None) -> Iterator[Bars]:
    if not enabled:
        yield Bars(None)
        return
    columns = (TextColumn("[bold]{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        yield Bars(progress)
