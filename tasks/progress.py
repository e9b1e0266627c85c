"""Progress of the long stages (pair building, training steps, distillation, scoring).

On a terminal: a rich progress bar (done/total, rate, ETA, and the stage's own fields such as the loss).
Elsewhere (Prefect workers, CI, a pipe): one plain line when the stage starts, one every
LOG_EVERY_SECONDS, and one when it ends, so a log shows the stage moving without a line per step.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

LOG_EVERY_SECONDS = 15.0  # often enough to see a stage move, rare enough for a worker's log


class StageProgress:
    """`with StageProgress("fine_tune", total=steps, unit="steps") as bar: bar.advance(1, loss=0.41)`."""

    def __init__(self, description: str, total: int, unit: str, rate_unit: str | None = None):
        self.description, self.total, self.unit = description, max(int(total), 0), unit
        self.rate_unit = rate_unit or unit  # e.g. steps advance the bar, pairs/s is the rate shown
        self.done, self.rated, self.fields = 0, 0, {}
        self.started = self._last_line = time.monotonic()
        self._bar: Progress | None = None
        self._task = None

    def __enter__(self) -> StageProgress:
        if sys.stderr.isatty():
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        else:
            print(f"{self.description}: {self.total} {self.unit} to go", flush=True)
        return self

    def advance(self, n: int = 1, rated: int | None = None, **fields: Any) -> None:
        """n more units done (rated: how many rate units they were, default n); fields shown beside the bar."""
        self.done += n
        self.rated += n if rated is None else rated
        self.fields.update(fields)
        if self._bar is not None:
            self._bar.update(self._task, advance=n, info=self._info())
        elif time.monotonic() - self._last_line >= LOG_EVERY_SECONDS:
            self._last_line = time.monotonic()
            print(self._line(), flush=True)

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()
        else:
            print(self._line(finished=exc[0] is None), flush=True)

    def _info(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        shown = [f"{self.rated / elapsed:,.1f} {self.rate_unit}/s"]
        shown += [f"{key} {v:.4f}" if isinstance(v, float) else f"{key} {v}" for key, v in self.fields.items()]
        return "  ".join(shown)

    def _line(self, finished: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        share = self.done / self.total if self.total else 1.0
        eta = "" if finished or not self.done else f", ETA {elapsed * (1 - share) / share:,.0f} s"
        state = f"done in {elapsed:,.0f} s" if finished else f"{share:.0%}{eta}"
        return f"{self.description}: {self.done}/{self.total} {self.unit} ({state}), {self._info()}"
