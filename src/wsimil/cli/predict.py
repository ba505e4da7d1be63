"""``wsimil predict``, ``heatmap``, ``report``, ``digest``, ``convert bundle``: using a trained bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.common import (
    EXPECT_HELP,
    BundleOpt,
    ClaimTimeout,
    OldModelOpt,
    Threads,
    _bundle_option,
    _report_batch,
    _user_errors,
    app,
    convert_app,
)
from wsimil.errors import WsimilError
from wsimil.threads import use_threads


@convert_app.command("bundle")
@_user_errors
def convert_bundle(
    bundle: Annotated[Path, typer.Argument(help="An older bundle (format 1 .pt members, format 2, LRMIL lrmil.json).")],
    out: Annotated[Path, typer.Option(help="Folder for the converted bundle (current format, safetensors members).")],
) -> None:
    """Rewrite an older bundle in the current format (members read through the safe loader; code is refused)."""
    from wsimil.predict.digest import bundle_digest
    from wsimil.predict.write import upgrade_bundle
    from wsimil.progress import console

    path = upgrade_bundle(bundle, out)
    console.print(f"Wrote {path} (SHA-256 {bundle_digest(path)})", soft_wrap=True)


@app.command()
@_user_errors
def digest(
    bundle: Annotated[Path, typer.Argument(help="A model bundle folder (or a run folder with bundle/).")],
) -> None:
    """Print a bundle's SHA-256 (every file in it): share it with the bundle; receivers pass it to
    `wsimil predict --expect-sha256`."""
    from wsimil.predict.bundle import bundle_folder
    from wsimil.predict.digest import bundle_digest

    folder = bundle_folder(bundle)
    if not folder.is_dir():
        raise WsimilError(f"{bundle} is not a folder")
    typer.echo(f"{bundle_digest(folder)}  {folder}")


@app.command()
@_user_errors
def predict(
    out: Annotated[Path, typer.Option(help="Output folder: predictions.csv, scores/, status.csv, job/ (cache).")],
    bundle: BundleOpt = None,
    slides: Annotated[
        str | None, typer.Option(help="A slide folder, a CSV with a 'path' column, or one slide file.")
    ] = None,
    features: Annotated[
        Path | None, typer.Option(help="Score a feature folder instead of slides (same encoder as the bundle).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    backend: Annotated[str, typer.Option(help="Feature extraction: local, or ray (one task per slide).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address; default: start Ray locally.")] = None,
    workers: Annotated[int, typer.Option(help="Worker processes, one slide each (tiling).")] = 1,
    batch_size: Annotated[int, typer.Option(help="Patches per encoder batch.")] = 64,
    encoder_weights: Annotated[
        Path | None, typer.Option(help="Where the bundle's encoder weights file is now (checked by checksum).")
    ] = None,
    mpp: Annotated[float | None, typer.Option(help="Level-0 µm/px for slides whose metadata lacks it.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Redo tiles and features already cached in OUT/job.")] = False,
    fold: Annotated[
        list[int] | None, typer.Option(help="Fold model(s) of the ensemble to use (repeatable; default: all).")
    ] = None,
    expect_sha256: Annotated[str | None, typer.Option(help=EXPECT_HELP)] = None,
    claim_timeout: ClaimTimeout = 600.0,
    threads: Threads = None,
    model: OldModelOpt = None,
) -> None:
    """Predict new slides with a model bundle: tile → encode → aggregate (cached tiles and features are reused).

    Writes OUT/predictions.csv (slide_id, prob_<class>…, predicted), per-patch scores OUT/scores/{slide_id}.h5 and
    OUT/status.csv. Exits with status 1 if any slide failed (after finishing all others).

    An LRMIL bundle tiles at 5x only and encodes with each fold's distilled encoder (one --fold is fastest); nothing
    at 20x is read and no tiling cache is kept."""
    from wsimil.predict.pipeline import predict_features, predict_slides
    from wsimil.progress import console

    bundle = _bundle_option(bundle, model)
    if (slides is None) == (features is None):
        raise WsimilError("give exactly one of --slides (slide files) or --features (a feature folder)")
    use_threads(threads, "image" if slides else "mil", workers=workers)  # extraction re-resolves it for encoding
    if features is not None:
        table = predict_features(
            bundle, features, out, device=device, folds=fold or None, expect_sha256=expect_sha256,
            claim_timeout=claim_timeout,
        )  # fmt: skip
    else:
        table = predict_slides(
            bundle,
            slides,
            out,
            device=device,
            backend=backend,
            ray_address=ray_address,
            workers=workers,
            batch_size=batch_size,
            encoder_weights=encoder_weights,
            mpp=mpp,
            overwrite=overwrite,
            folds=fold or None,
            expect_sha256=expect_sha256,
            claim_timeout=claim_timeout,
        )
    if (table["status"] != "failed").any():  # else predictions.csv holds only a header
        console.print(f"Predictions: {out / 'predictions.csv'}  per-patch scores: {out / 'scores'}", soft_wrap=True)
    _report_batch(table, "Predicted", out, out / "status.csv")


@app.command()
@_user_errors
def heatmap(
    out: Annotated[Path, typer.Option(help="Folder for the PNGs ({slide_id}__{map}.png).")],
    bundle: Annotated[
        Path | None, typer.Option(help="Model bundle: predict --slides first (cache in OUT/predict).")
    ] = None,
    slides: Annotated[
        str | None, typer.Option(help="Slides (folder, CSV with 'path', or file); with --predictions/--run: where.")
    ] = None,
    predictions: Annotated[Path | None, typer.Option(help="An output folder of `wsimil predict`.")] = None,
    run: Annotated[Path | None, typer.Option(help="A training run: each slide scored by its held-out fold.")] = None,
    map_name: Annotated[
        list[str] | None, typer.Option("--map", help="Map(s) to draw, e.g. attention:tumour (default: all).")
    ] = None,
    size: Annotated[int, typer.Option(help="PNG width in pixels.")] = 1600,
    top_k: Annotated[int, typer.Option(help="Top-scoring patches shown as a strip.")] = 8,
    scale: Annotated[
        str, typer.Option(help="absolute (one scale for all slides: attention×N, probabilities 0-1), percentile.")
    ] = "absolute",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda ... (with --bundle/--run)")] = "auto",
    mpp: Annotated[float | None, typer.Option(help="Level-0 µm/px for slides whose metadata lacks it.")] = None,
    expect_sha256: Annotated[str | None, typer.Option(help=EXPECT_HELP)] = None,
    threads: Threads = None,
    model: OldModelOpt = None,
) -> None:
    """Draw attention / instance-score heatmaps over slide thumbnails, with tissue contours and the top-k patches.

    One of: --bundle BUNDLE --slides X (predicts first, reusing its cache), --predictions DIR, or --run RUN.
    Multi-class models get one map per class (HMIL: both levels). Exits 1 if any slide failed."""
    from wsimil.progress import console
    from wsimil.viz.heatmap import heatmaps_for_predictions, heatmaps_for_run

    bundle = _bundle_option(bundle, model, required=False)
    if sum(x is not None for x in (bundle, predictions, run)) != 1:
        raise WsimilError("give exactly one of --bundle (with --slides), --predictions or --run")
    kw = {"size": size, "k": top_k, "scale": scale}
    use_threads(threads, "image")
    if bundle is not None:
        from wsimil.predict.pipeline import predict_slides

        if slides is None:
            raise WsimilError("--bundle needs --slides (the slides to predict and draw)")
        predictions = out / "predict"
        table = predict_slides(bundle, slides, predictions, device=device, mpp=mpp, expect_sha256=expect_sha256)
        slides = None
    if run is not None:
        pngs, failed = heatmaps_for_run(run, out, map_name, slides, **kw)
    else:
        pngs, failed = heatmaps_for_predictions(predictions, out, map_name, slides, **kw)
    if bundle is not None:
        failed.update({r["slide_id"]: r["error"] for _, r in table.iterrows() if r["status"] == "failed"})
    console.print(f"Wrote {len(pngs)} heatmap(s) to {out}", soft_wrap=True)
    for sid, err in failed.items():
        console.print(f"[red]failed[/] {sid}: {err}", highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command()
@_user_errors
def report(
    run: Annotated[Path, typer.Argument(help="Run folder written by `wsimil train`.")],
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: RUN/report.html).")] = None,
    slides: Annotated[
        str | None, typer.Option(help="Where the slides are (folder or CSV with 'path'), for heatmaps.")
    ] = None,
    max_heatmaps: Annotated[int, typer.Option(help="Slides with a heatmap (0: none).")] = 40,
    heatmap_size: Annotated[int, typer.Option(help="Heatmap width in pixels.")] = 900,
) -> None:
    """Write one self-contained HTML report of a run: metrics with CIs, curves, calibration, per-slide heatmaps."""
    from wsimil.progress import console
    from wsimil.report import build_report

    path = build_report(run, out, slides, max_heatmaps, heatmap_size)
    console.print(f"Report: {path.resolve()}", soft_wrap=True)
