"""Progress on stderr: one line per stage with its time, a bar for long loops, silence when asked.

Stage timings are recorded here too, because the report's `stages` list is exactly what the
user watched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar

from rich.console import Console

from edgekit.errors import EdgekitError, StageError, first_line

T = TypeVar("T")


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, quiet=quiet, highlight=False)
        self.live = self.console.is_terminal and not quiet  # spinners and bars only where someone watches
        self.stages: list[dict[str, Any]] = []
        self._status: Any = None

    @contextmanager
    def stage(self, name: str, note: str = "") -> Iterator[dict[str, Any]]:
        """Time a stage; anything unexpected inside it becomes a StageError naming the stage."""
        record: dict[str, Any] = {"name": name, "status": "ran"}
        if note:
            record["note"] = note
        start = time.perf_counter()
        try:
            with self.console.status(f"{name}…") if self.live else nullcontext() as self._status:
                yield record
        except EdgekitError:
            self._close(record, start, "failed")
            raise
        except Exception as err:
            self._close(record, start, "failed")
            raise StageError(f"stage {name} failed: {type(err).__name__}: {first_line(err)}") from err
        self._close(record, start, "ran")
        extra = f"  [dim]{record['note']}[/]" if record.get("note") else ""
        self.console.print(f"[green]✓[/] {name:<10} {record['seconds']:6.2f} s{extra}")

    def _close(self, record: dict[str, Any], start: float, status: str) -> None:
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["status"] = status
        self.stages.append(record)

    def warn(self, text: str) -> None:
        """Legal but suspicious input: one line on stderr even when progress is quiet (the report notes it too)."""
        print(f"edgekit: warning: {text}", file=sys.stderr)

    def skip(self, name: str, reason: str) -> None:
        self.stages.append({"name": name, "status": "skipped", "seconds": 0.0, "note": reason})
        self.console.print(f"[dim]- {name:<10} skipped: {reason}[/]")

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        if not self.live:
            yield from items
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TimeRemainingColumn
        from rich.progress import Progress as Bar

        if self._status is not None:
            self._status.stop()  # rich shows one live display at a time: the bar replaces the spinner
        with Bar("  " + description, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                 console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        if self._status is not None:
            self._status.start()
