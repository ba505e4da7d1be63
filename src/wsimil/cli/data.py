"""``wsimil synth``, ``tile``, ``extract``, ``encoders``, ``convert mil-csv``: slides to feature bags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.common import READER_HELP, ClaimTimeout, Threads, _report_batch, _user_errors, app, convert_app
from wsimil.errors import WsimilError
from wsimil.threads import apply_threads


@convert_app.command("mil-csv")
@_user_errors
def convert_mil_csv(
    file: Annotated[Path, typer.Argument(help="Classic MIL CSV: label, bag id, features (no header).")],
    out: Annotated[Path, typer.Option(help="Output folder: features/ and manifest.csv.")],
    instance_labels: Annotated[str, typer.Option(help="auto|yes|no: is column 3 an instance-label column?")] = "auto",
) -> None:
    """Turn a classic MIL CSV (MUSK, Elephant, ...) into a feature folder and a manifest."""
    from wsimil.data.mil_csv import convert_mil_csv as convert
    from wsimil.progress import console

    if instance_labels not in ("auto", "yes", "no"):
        raise WsimilError(f"--instance-labels must be auto, yes or no, not {instance_labels!r}")
    m = convert(file, out, instance_labels)
    console.print(f"Wrote {out / 'features'} and {m}")


@app.command()
@_user_errors
def synth(
    out: Annotated[Path, typer.Option(help="Cohort folder: slides/, masks/, manifest.csv.")],
    slides: Annotated[int, typer.Option(help="Number of slides (half positive).")] = 40,
    seed: Annotated[int, typer.Option()] = 0,
    width: Annotated[int | None, typer.Option(help="Level-0 width in pixels [default: the preset's].")] = None,
    height: Annotated[int | None, typer.Option(help="Level-0 height in pixels [default: the preset's].")] = None,
    mpp: Annotated[float, typer.Option(help="Level-0 µm/px (0.25 = 40x scan, 0.5 = 20x scan).")] = 0.25,
    tumor_fraction: Annotated[float, typer.Option(help="Tumour share of tissue in positive slides.")] = 0.03,
    task: Annotated[
        str, typer.Option(help="classification, hierarchical (2x2 classes) or survival.")
    ] = "classification",
    preset: Annotated[str, typer.Option(help="toy, or camelyon (lymph-node sections; see README).")] = "toy",
    workers: Annotated[int, typer.Option(help="Worker processes, one slide each (camelyon preset).")] = 1,
) -> None:
    """Write a synthetic cohort of pyramidal slides with tumour masks (for demos, tests and benchmarks)."""
    from wsimil.progress import console
    from wsimil.slide.mag import native_mag
    from wsimil.slide.synth import check_cohort_options, make_cohort
    from wsimil.slide.synth_camelyon import composition_text

    check_cohort_options(slides, width, height, mpp, tumor_fraction, task, preset)
    make_cohort(out, slides, seed, width, height, mpp, app_mag=native_mag(mpp), tumor_fraction=tumor_fraction,
                task=task, preset=preset, workers=workers)  # fmt: skip
    console.print(f"Wrote {slides} slides ({preset}, {task}) to {out / 'slides'} and {out / 'manifest.csv'}")
    if preset == "camelyon":
        console.print(composition_text(out / "manifest.csv"))


@app.command()
@_user_errors
def tile(
    slides: Annotated[str, typer.Option(help="A slide folder, a CSV with a 'path' column, or one slide file.")],
    out: Annotated[Path, typer.Option(help="Job folder.")],
    mag: Annotated[list[str], typer.Option(help="Magnification(s) to tile, e.g. --mag 20 --mag 5x (nested).")],
    patch_size: Annotated[int, typer.Option(help="Patch size in pixels at each magnification.")] = 256,
    mpp: Annotated[float | None, typer.Option(help="Level-0 µm/px for slides whose metadata lacks it.")] = None,
    reader: Annotated[str, typer.Option(help=READER_HELP)] = "auto",
    workers: Annotated[int, typer.Option(help="Worker processes, one slide each.")] = 1,
    min_tissue: Annotated[float, typer.Option(help="Least tissue share of a patch's footprint (0: any tissue).")] = 0.1,
    overwrite: Annotated[bool, typer.Option(help="Redo slides whose outputs are already valid.")] = False,
    claim_timeout: ClaimTimeout = 600.0,
    threads: Threads = None,
) -> None:
    """Find tissue and tile it at exact µm/px, at one or more nested magnifications.

    With several --mag the grids nest and JOB/links/ maps each coarse patch to the fine patches inside it.
    Exits with status 1 if any slide failed (after finishing all others); see JOB/status.csv."""
    from wsimil.slide.job import TileSettings, run_tiling

    apply_threads(threads, "image", workers=workers)
    settings = TileSettings(mags=list(mag), patch_size=patch_size, reader=reader, mpp=mpp, min_tissue=min_tissue)
    table = run_tiling(slides, out, settings, workers=workers, overwrite=overwrite, claim_timeout=claim_timeout)
    _report_batch(table, "Tiled", out, out / "status.csv")


@app.command()
@_user_errors
def extract(
    job: Annotated[Path, typer.Option(help="Tiling job folder written by `wsimil tile` (it knows the patch size).")],
    mag: Annotated[str, typer.Option(help="Magnification to encode, e.g. 20 or 20x (must have been tiled).")],
    encoder: Annotated[str, typer.Option(help="Encoder name (see `wsimil encoders`).")],
    encoder_weights: Annotated[
        str | None,
        typer.Option(help="Encoder weights file, or 'hub' to download (online). Without: random init with a warning."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1 ...")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Patches per encoder batch.")] = 64,
    loader_workers: Annotated[int | None, typer.Option(help="DataLoader workers reading patches. (default: 0)")] = None,
    precision: Annotated[str, typer.Option(help="fp32, fp16 or bf16 (autocast).")] = "fp32",
    reader: Annotated[str, typer.Option(help=READER_HELP)] = "auto",
    backend: Annotated[str, typer.Option(help="local, or ray (one task per slide on a Ray cluster).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address; default: start Ray locally.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random init when no weights are given.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Redo slides whose features are already valid.")] = False,
    claim_timeout: ClaimTimeout = 600.0,
    threads: Threads = None,
    weights: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --encoder-weights.")] = None,
    workers: Annotated[int | None, typer.Option(hidden=True, help="Deprecated: --loader-workers.")] = None,
    patch_size: Annotated[int | None, typer.Option(hidden=True, help="Deprecated: read from the job.")] = None,
) -> None:
    """Encode a tiling job's patches into feature bags.

    Writes JOB/{mag}x_{ps}px_0px_overlap/features_{encoder}/{slide_id}.h5 and a status.csv.
    Exits with status 1 if any slide failed (after finishing all others)."""
    from wsimil.config import resolve_device
    from wsimil.features.extract import ExtractSettings, run_extraction
    from wsimil.flags import deprecated_value, renamed
    from wsimil.slide.tiling_job import TilingJob

    tiling = TilingJob.open(job)
    deprecated_value(patch_size, "--patch-size", "the patch size is read from the job")
    tiling.check_patch_size(patch_size)
    st = ExtractSettings(
        mag=mag,
        encoder=encoder,
        weights=renamed(encoder_weights, weights, "--encoder-weights", "--weights"),
        device=resolve_device(device),
        batch_size=batch_size,
        workers=renamed(loader_workers, workers, "--loader-workers", "--workers", default=0),
        precision=precision,
        reader=reader,
        seed=seed,
        threads=threads,
    )
    table = run_extraction(tiling, st, overwrite=overwrite, backend=backend, ray_address=ray_address,
                           claim_timeout=claim_timeout)  # fmt: skip
    out_dir = tiling.features_dir(st.mag, st.encoder)
    _report_batch(table, "Encoded", out_dir, out_dir / "status.csv")


@app.command()
@_user_errors
def encoders() -> None:
    """List the available patch encoders with their embedding width and hub id."""
    from wsimil.features.encoders import ENCODERS

    for name, spec in sorted(ENCODERS.items()):
        typer.echo(f"{name:16s} {spec.embed_dim:5d}-d  input {spec.input_size}  {spec.hub_id or '-'}  {spec.note}")
