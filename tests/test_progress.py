"""Progress bars keep their counts and times whole on an 80-column terminal."""

import io
import re

import pytest
from rich.console import Console

import wsimil.progress as progress


@pytest.mark.parametrize("width", [80, 140])
def test_progress_bars_stay_readable(monkeypatch, width):
    buf = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=buf, width=width, force_terminal=True, color_system=None))
    monkeypatch.setenv("WSIMIL_PROGRESS", "1")
    with progress.make_progress() as p:
        folds = p.add_task("folds", total=5, info="last test auc 0.812")
        fold = p.add_task("repeat 0 fold 1", total=30, info="loss 0.693 val_loss 0.693 val_auc 0.500")
        enc = p.add_task("Encoding a_slide_with_a_rather_long_name at 20x", total=12345, info="")
        p.advance(folds, 2)
        p.advance(fold, 19)
        p.advance(enc, 500)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    last = [line for line in text.splitlines() if line.strip()][-3:]
    assert all(len(line) <= width for line in last), last
    for line, count in zip(last, ("2/5", "19/30", "500/12345"), strict=True):
        assert f" {count} " in line, line
        assert re.search(r" eta (\d:\d\d:\d\d|-:--:--)", line), line  # the remaining time, whole
        assert (re.search(r" \d:\d\d:\d\d eta", line) is not None) == (width > 110)  # elapsed: when there is room
    assert "━" in last[1]  # a bar is still drawn
    assert "last test auc" in last[0] and "loss 0.693" in last[1]
    assert "Encoding a_slide" in last[2] and "…" in last[2]  # a long description is cut, not the counts


def test_eta_is_estimated_for_slow_steps(monkeypatch):
    """Steps of a minute each still give an eta (rich's default window of 30 s would show -:--:--)."""
    clock = [0.0]
    monkeypatch.setenv("WSIMIL_PROGRESS", "0")
    p = progress.make_progress()
    monkeypatch.setattr(p, "get_time", lambda: clock[0])
    task = p.add_task("slides", total=10, info="")
    p.start_task(task)
    for _ in range(3):
        clock[0] += 60
        p.advance(task)
    assert p.tasks[0].time_remaining == pytest.approx(7 * 60)
