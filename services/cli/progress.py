"""Progress for the ``flywheel`` commands: live bars where a person watches a terminal, one plain line per step
everywhere else (logs, CI, a pipe), so long work is never silent."""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, Self

import click

__all__ = ["EvalSink", "Progress", "Stage", "on_terminal"]


def on_terminal() -> bool:
    """Live bars only where a person watches: stderr is a terminal that can redraw, and rich is installed (a
    serving-only install has no rich; it gets the plain lines)."""
    try:
        from rich.console import Console
    except ImportError:
        return False
    console = Console(stderr=True)
    return console.is_terminal and not console.is_dumb_terminal


class Stage:
    """One step of a long command: a bar when its size is known (``total``), a spinner otherwise.

    ``status`` is the step's latest news (a library's progress line); ``advance``/``update`` move the bar. Without
    a terminal every status is one plain line and the count is printed at each tenth (or every 15 s), so a CI log
    gets a few lines per step, never a redraw.
    """

    PLAIN_EVERY_S = 15.0

    def __init__(self, progress: Progress, description: str, total: float | None, unit: str) -> None:
        self._progress = progress
        self.description = description
        self.total = total
        self.unit = unit
        self.completed = 0.0
        self.finished = False
        self._started = time.monotonic()
        self._shown_at = self._started
        self._shown_tenth = 0
        self._task: Any = None
        bars = progress.bars
        if bars is not None:
            self._task = bars.add_task(description, total=total, status="", unit=unit)
        else:
            progress.say(f"==> {description}")

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._started

    def status(self, text: str) -> None:
        self.update(status=text)

    def advance(self, n: float = 1) -> None:
        self.update(completed=self.completed + n)

    def update(self, *, completed: float | None = None, total: float | None = None, status: str | None = None) -> None:
        if total is not None:
            self.total = total
        if completed is not None:
            self.completed = completed
        bars = self._progress.bars
        if bars is not None:
            fields: dict[str, Any] = {"status": status} if status is not None else {}
            bars.update(self._task, completed=self.completed, total=self.total, **fields)
            return
        if status is not None:
            self._progress.say(f"    {status.strip()}")
        if completed is not None and self.total:
            tenth = int(10 * self.completed / self.total)
            now = time.monotonic()
            if tenth > self._shown_tenth or now - self._shown_at >= self.PLAIN_EVERY_S:
                self._shown_tenth, self._shown_at = tenth, now
                self._progress.say(f"    {self.completed:.0f}/{self.total:.0f} {self.unit}".rstrip())

    def done(self, note: str = "", *, failed: bool = False) -> None:
        """Finish the step (idempotent): the bar full, or one line with the time it took."""
        if self.finished:
            return
        self.finished = True
        bars = self._progress.bars
        if bars is not None:
            total = self.total if self.total else max(self.completed, 1.0)
            bars.update(self._task, total=total, completed=self.completed if failed else total,
                        status="failed" if failed else note)
            bars.stop_task(self._task)
        else:
            verb = "failed after" if failed else "done in"
            self._progress.say(f"    {verb} {self.elapsed_s:.1f}s{': ' + note if note else ''}")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.done(failed=kind is not None)


class Progress:
    """How far a long command is, on stderr: rich's live bars on a terminal, plain one-line messages elsewhere
    (CI logs, pipes, ``TERM=dumb``), so a log file never fills with redraws. Results stay on stdout.

    While the bars are live, lines printed to stderr (the libraries' own progress lines, the logs) appear above
    them instead of tearing them.
    """

    def __init__(self, *, live: bool | None = None, refresh_per_second: float = 8.0, console: Any = None) -> None:
        """``live``: bars or plain lines (default: bars on a terminal); ``console``: a rich Console to draw on
        instead of stderr."""
        self._live = live
        self._refresh = refresh_per_second
        self._console = console
        self.bars: Any = None
        self._stages: list[Stage] = []
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def __enter__(self) -> Self:
        if self._live is not None:
            live = self._live
        elif self._console is not None:
            live = self._console.is_terminal and not self._console.is_dumb_terminal
        else:
            live = on_terminal()
        if not live:
            return self
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bars

        before = sys.stderr
        self.bars = Bars(
            SpinnerColumn(finished_text="[green]done[/]"),
            TextColumn("{task.description}", markup=False),
            BarColumn(bar_width=28),
            _count_column(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}", markup=False),
            console=self._console or Console(stderr=True),
            # stdout is redirected (printed above the bars) only when it is the same terminal: results sent to a
            # file or a pipe stay there
            redirect_stdout=sys.stdout.isatty(),
            redirect_stderr=True,
            refresh_per_second=self._refresh,
        )
        self.bars.start()
        if sys.stderr is not before:  # the logs' handler holds the real stderr: route it above the bars too
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is before:
                    self._handlers.append((h, h.setStream(sys.stderr)))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for stage in self._stages:
            stage.done(failed=kind is not None)
        if self.bars is not None:
            for h, stream in self._handlers:
                h.setStream(stream)
            self.bars.stop()
            self.bars = None

    def stage(self, description: str, total: float | None = None, unit: str = "") -> Stage:
        """A new step; finish it with ``done`` or use it as a context manager (failed when an error escapes)."""
        stage = Stage(self, description, total, unit)
        self._stages.append(stage)
        return stage

    def say(self, message: str) -> None:
        """A line for the person waiting (above the bars on a terminal)."""
        if self.bars is not None:
            self.bars.console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            click.echo(message, err=True)


def _count_column() -> Any:
    """"12/60 files" when a step's size is known, nothing for a spinner (rich imported only when bars are live)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Count(ProgressColumn):
        def render(self, task: Any) -> Text:
            if task.total is None or not task.fields.get("unit"):
                return Text("")
            return Text(f"{task.completed:.0f}/{task.total:.0f} {task.fields.get('unit', '')}".rstrip())

    return Count()


class EvalSink:
    """What ``models.evaluate`` reports to: its stage lines become the step's status, its step counts the bar."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage

    def __call__(self, message: str) -> None:
        self.stage.status(message)

    def advance(self, done: int, total: int) -> None:
        self.stage.update(completed=done, total=total)
