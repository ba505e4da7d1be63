"""What every ``wsimil`` command shares: the app, option types, help texts and the user-error wrapper."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from wsimil.errors import WsimilError, one_line_warnings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Weakly supervised whole-slide image classification with multiple instance learning.",
)
convert_app = typer.Typer(no_args_is_help=True, help="Convert datasets from other formats.")
app.add_typer(convert_app, name="convert")


EXPECT_HELP = "Refuse the bundle unless its SHA-256 (`wsimil digest BUNDLE`) is this value, or the one in this file."
READER_HELP = "auto (tiffslide for SVS/TIFF: same pixels, ~4x faster; OpenSlide otherwise), openslide or tiffslide."
ClaimTimeout = Annotated[float, typer.Option(help="Seconds without heartbeat after which a slide claim is taken over.")]
Threads = Annotated[
    str | None, typer.Option(metavar="N|auto", help="CPU threads (default auto: chosen by the work and the free CPUs).")
]


#: ``train`` flags that set a method option: parameter → the methods whose option of that name it sets (type and
#: help are checked against :mod:`wsimil.methods.options` by tests/test_cli_options.py)
METHOD_FLAGS: dict[str, tuple[str, ...]] = {"teacher_init": ("mhim", "mhim_v1", "mhim_v2")}
#: flags renamed for one meaning per name across commands: old spelling → new; the old one is a hidden alias
#: that warns, kept for one release
RENAMED_FLAGS: dict[str, str] = {"--batch-size": "--bag-batch-size"}


def _default(field: str) -> str:
    """The TrainConfig default of ``field``, for help texts (flags left unset fall back to config/defaults)."""
    from wsimil.config import TrainConfig

    return f"(default: {TrainConfig.model_fields[field].default})"


def _user_errors(fn):
    """Print user errors without a traceback and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from wsimil.progress import console

        one_line_warnings()
        try:
            return fn(*args, **kwargs)
        except WsimilError as e:
            console.print("[bold red]Error:[/]", str(e), highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper


BundleOpt = Annotated[
    Path | None, typer.Option(help="Model bundle: RUN/bundle written by `wsimil train` or by `wsimil lrmil`.")
]
OldModelOpt = Annotated[Path | None, typer.Option("--model", hidden=True, help="Deprecated alias of --bundle.")]


def _bundle_option(bundle: Path | None, model: Path | None, required: bool = True) -> Path | None:
    """``--bundle``, or its deprecated alias ``--model`` (which names an aggregator in ``wsimil train``)."""
    if model is not None:
        typer.echo(
            "warning: --model is deprecated here (it names an aggregator in `wsimil train`); use --bundle", err=True
        )
        if bundle is not None:
            raise WsimilError("give --bundle once (--model is its deprecated alias)")
    if required and (bundle or model) is None:
        raise WsimilError("missing option --bundle (the model bundle folder)")
    return bundle or model


def _report_batch(table, verb: str, out: Path, status_csv: Path) -> None:
    """Summarise a per-slide batch, list each failed slide with its error, exit 1 if any failed."""
    from wsimil.progress import console

    counts = table["status"].value_counts().to_dict()
    left = f"left {counts['claimed']} to other workers, " if counts.get("claimed") else ""
    console.print(
        f"{verb} {counts.get('ok', 0)}, skipped {counts.get('skipped', 0)} (already done), {left}"
        f"failed {counts.get('failed', 0)} → {out}",
        soft_wrap=True,
    )
    failed = table[table["status"] == "failed"]
    for _, r in failed.iterrows():
        console.print(f"[red]failed[/] {r['slide_id']}: {r['error']}", highlight=False, soft_wrap=True)
    if len(failed):
        console.print(f"Status of every slide: {status_csv}", soft_wrap=True)
        raise typer.Exit(1)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def _print_metrics(metrics: dict) -> None:
    from wsimil.progress import console

    for k, v in metrics.items():
        console.print(f"  {k:18s} {_fmt(v['mean'])} ± {_fmt(v['std'])}")


# commands in their own modules register themselves on `app` (they use the helpers above)
