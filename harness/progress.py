"""Progress bars (rich) for long work, and a silent twin for tests and `--quiet`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Advance = Callable[..., None]


class Bar:
    """One bar: call it to advance (`bar(n=1)`); `describe` changes its label."""

    def __init__(self, progress: Progress | None = None, task_id=None):
        self._progress, self._task_id = progress, task_id

    def __call__(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task_id, n)

    def describe(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task_id, description=description)


class Bars:
    """`bars.task("calibrate", total)` returns a Bar (`advance(n=1)`); disabled bars do nothing."""

    def __init__(self, progress: Progress | None):
        self._progress = progress
        self._added: list = []

    def task(self, description: str, total: int) -> Bar:
        if self._progress is None:
            return Bar()
        task_id = self._progress.add_task(description, total=total)
        self._added.append(task_id)
        return Bar(self._progress, task_id)

    @contextmanager
    def scope(self) -> Iterator["Bars"]:
        """Bars for one piece of a longer work (a sweep's current cell): removed when it ends."""
        inner = Bars(self._progress)
        try:
            yield inner
        finally:
            if self._progress is not None:
                for task_id in inner._added:
                    self._progress.remove_task(task_id)


@contextmanager
def bars(enabled: "bool | Bars" = True, console: Console | None = None) -> Iterator[Bars]:
    """A bar display for a `with` block; given existing Bars (a caller's display), a scope in it."""
    if isinstance(enabled, Bars):
        with enabled.scope() as inner:
            yield inner
        return
    if not enabled:
        yield Bars(None)
        return
    columns = (
        TextColumn("[bold]{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console or Console(stderr=True), transient=False) as progress:
        yield Bars(progress)
