"""Rich progress bars that stay quiet when output is not a terminal (CI, logs) unless asked."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

T = TypeVar("T")
console = Console(stderr=True)


def enabled() -> bool:
    flag = os.environ.get("WSIMIL_PROGRESS")
    if flag is not None:
        return flag not in ("0", "false", "no")
    return sys.stderr.isatty()


class EtaColumn(TimeRemainingColumn):
    """``eta 0:01:23``: the remaining time, labelled."""

    def render(self, task) -> Text:
        return Text("eta ", style="progress.remaining") + super().render(task)


def make_progress() -> Progress:
    """Description, bar, done/total, elapsed time (wide terminals only), remaining time, then a free-text ``info``
    field. Every column has a width budget that fits the terminal (80 columns included): counts and times are
    never cut; the description and the info text end in an ellipsis when they are longer than their share."""
    width = console.width
    narrow = width < 110
    bar, desc, count = (10, 22, 11) if narrow else (30, 40, 11)

    def fixed(w: int, justify: str = "left") -> Column:
        return Column(no_wrap=True, min_width=w, max_width=w, justify=justify)

    def cut(w: int) -> Column:
        return Column(no_wrap=True, overflow="ellipsis", max_width=max(w, 4))

    columns = [
        TextColumn("[bold]{task.description}", table_column=cut(desc)),
        BarColumn(bar_width=bar, table_column=fixed(bar)),
        MofNCompleteColumn(table_column=fixed(count, "right")),
        *([] if narrow else [TimeElapsedColumn(table_column=fixed(7))]),
        EtaColumn(table_column=fixed(11)),
    ]
    used = desc + bar + count + 11 + (0 if narrow else 7) + len(columns)  # + one space between columns
    columns.append(TextColumn("{task.fields[info]}", table_column=cut(width - used - 1)))
    # the speed (hence the eta) is estimated over 10 minutes, not rich's 30 s: a slide can take longer than 30 s
    return Progress(*columns, console=console, disable=not enabled(), transient=False, expand=False,
                    speed_estimate_period=600)  # fmt: skip


def track(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    total = total if total is not None else len(items)  # type: ignore[arg-type]
    with make_progress() as p:
        task = p.add_task(desc, total=total, info="")
        for it in items:
            yield it
            p.advance(task)
