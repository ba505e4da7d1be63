"""``wsimil demo``: the whole pipeline on built-in synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.common import Threads, _user_errors, app


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the demo's data and outputs.")] = Path("wsimil_demo"),
    slides: Annotated[int, typer.Option(help="Synthetic slides to make.")] = 20,
    epochs: Annotated[int, typer.Option()] = 30,
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option()] = "auto",
    threads: Threads = None,
) -> None:
    """Run the whole pipeline on built-in synthetic slides (a few minutes on CPU).

    synth → tile (20x, 5x) → features → ABMIL training → results; prints where the outputs are."""
    from wsimil.demo import run_demo

    run_demo(out, seed=seed, epochs=epochs, device=device, n_slides=slides, threads=threads)
