"""``wsimil export``: write wsimil outputs in other tools' layouts (glue over :mod:`wsimil.features.export`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.common import READER_HELP, _report_batch, _user_errors, app

export_app = typer.Typer(no_args_is_help=True, help="Write features in other tools' layouts (CLAM).")
app.add_typer(export_app, name="export")


@export_app.command("clam")
@_user_errors
def clam(
    features: Annotated[Path, typer.Option(help="Feature folder (TRIDENT features_{encoder}/ or a TRIDENT job).")],
    out: Annotated[Path, typer.Option(help="CLAM data folder to write: h5_files/, pt_files/ (and patches/).")],
    patches: Annotated[
        bool, typer.Option(help="Also write CLAM patch files patches/{slide_id}.h5 (opens each slide).")
    ] = False,
    slides: Annotated[
        Path | None, typer.Option(help="Slide folder or table, for features that record no slide file.")
    ] = None,
    reader: Annotated[str, typer.Option(help=READER_HELP)] = "auto",
) -> None:
    """Write CLAM's h5_files/{id}.h5 and pt_files/{id}.pt (and with --patches patches/{id}.h5, whose patch_level
    is chosen so that patch_size × downsample is the true footprint). Exits 1 if any slide failed."""
    import pandas as pd

    from wsimil.features.export import export_clam
    from wsimil.io import write_csv

    table = pd.DataFrame(export_clam(features, out, patches=patches, slides=slides, reader=reader))
    write_csv(out / "export_status.csv", table)
    _report_batch(table, "Exported", out, out / "export_status.csv")
