"""The ``wsimil`` command: a thin layer over the Python API."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

from wsimil.errors import WsimilError, one_line_warnings
from wsimil.threads import apply_threads, use_threads

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


def _renamed(new_value, old_value, old: str):
    """The value of a renamed flag: the new spelling's, else the deprecated one's (with a warning)."""
    if old_value is None:
        return new_value
    import warnings

    warnings.warn(f"{old} is deprecated here; use {RENAMED_FLAGS[old]}", FutureWarning, stacklevel=2)
    return old_value if new_value is None else new_value


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


@app.command()
@_user_errors
def train(
    features: Annotated[Path, typer.Option(help="Feature folder (TRIDENT features_{encoder}/ or CLAM layout).")],
    manifest: Annotated[Path, typer.Option(help="Slide manifest CSV: case_id,slide_id,label.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    model: Annotated[str | None, typer.Option(help="Aggregator (see `wsimil models`). " + _default("model"))] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config; flags override it.")] = None,
    method: Annotated[
        str | None, typer.Option(help="Training method (see `wsimil methods`). " + _default("method"))
    ] = None,
    method_opt: Annotated[
        list[str] | None,
        typer.Option("--method-opt", help="Method option KEY=VALUE (repeatable; VALUE parsed as YAML)."),
    ] = None,
    model_opt: Annotated[
        list[str] | None,
        typer.Option("--model-opt", help="Model option KEY=VALUE (repeatable), e.g. dropout=0.1."),
    ] = None,
    label_column: Annotated[
        str | None, typer.Option(help="Manifest column with the slide label. " + _default("label_column"))
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(help="classification, or survival (manifest columns time,event). " + _default("task")),
    ] = None,
    teacher_init: Annotated[
        Path | None,
        typer.Option(
            help="mhim, mhim_v1, mhim_v2: Run folder of a trained baseline (same splits) to initialise the teacher "
            "from; default: train one first."
        ),
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="k of stratified, case-grouped k-fold CV. " + _default("folds"))
    ] = None,
    repeats: Annotated[
        int | None, typer.Option(help="Repeats of k-fold CV with new shuffles. " + _default("repeats"))
    ] = None,
    splits: Annotated[
        Path | None,
        typer.Option(help="Fixed splits: CLAM splits_k.csv (file or folder), Patho-Bench .tsv, or CSV slide_id,split."),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option(help="Validation part of each training fold. " + _default("val_fraction"))
    ] = None,
    epochs: Annotated[int | None, typer.Option(help=_default("epochs"))] = None,
    lr: Annotated[float | None, typer.Option(help=_default("lr"))] = None,
    weight_decay: Annotated[float | None, typer.Option(help=_default("weight_decay"))] = None,
    bag_batch_size: Annotated[
        int | None,
        typer.Option(help="Bags per mini-batch (padded with a mask; config key batch_size). " + _default("batch_size")),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", hidden=True, help="Deprecated: --bag-batch-size.")
    ] = None,
    max_instances: Annotated[int | None, typer.Option(help="Randomly subsample bigger bags in training.")] = None,
    standardize: Annotated[
        bool | None, typer.Option("--standardize/--no-standardize", help="Standardise features on the training fold.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help=_default("seed"))] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ... " + _default("device"))] = None,
    threads: Threads = None,
) -> None:
    """Train a MIL model with cross-validation.

    Writes config.yaml, results.json, predictions.csv, history.csv, per-fold checkpoints and bundle/ to --out."""
    from wsimil.config import load_config, parse_key_values
    from wsimil.methods.trainer import run_training
    from wsimil.predict.write import bundle_from_run
    from wsimil.progress import console

    method_kwargs = parse_key_values(method_opt, "--method-opt")
    if teacher_init is not None:
        method_kwargs["teacher_init"] = str(teacher_init)
    cfg = load_config(
        config,
        model=model,
        method=method,
        task=task,
        label_column=label_column,
        model_kwargs=parse_key_values(model_opt, "--model-opt") or None,
        method_kwargs=method_kwargs or None,
        folds=folds,
        repeats=repeats,
        splits=str(splits) if splits else None,
        val_fraction=val_fraction,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=_renamed(bag_batch_size, batch_size, "--batch-size"),
        max_instances=max_instances,
        standardize=standardize,
        seed=seed,
        device=device,
        threads=threads,
    )
    res = run_training(cfg, features, manifest, out)
    bundle_from_run(out)  # RUN/bundle/: everything `wsimil predict` needs
    _print_metrics(res["metrics"])
    console.print(f"Results: {out / 'results.json'}")


@app.command()
@_user_errors
def evaluate(
    run: Annotated[Path, typer.Option(help="Run folder written by `wsimil train`.")],
    features: Annotated[Path, typer.Option(help="Feature folder of the test cohort.")],
    manifest: Annotated[Path, typer.Option(help="Manifest CSV of the test cohort.")],
    out: Annotated[Path, typer.Option(help="Folder for results.json and predictions.csv.")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% CIs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap resamples.")] = 0,
    bag_batch_size: Annotated[int, typer.Option(help="Bags per evaluation batch.")] = 8,
    threads: Threads = None,
) -> None:
    """Score an external test set with each fold model and their ensemble, with bootstrap 95% CIs."""
    from wsimil.evaluation.evaluate import evaluate_run
    from wsimil.progress import console

    res = evaluate_run(run, features, manifest, out, device=device, n_boot=bootstrap, seed=seed,
                       batch_size=bag_batch_size, threads=threads)  # fmt: skip
    for k, v in res["ensemble"]["metrics"].items():
        ci = "n/a (too few slides of a class)" if v.get("too_small") else f"{_fmt(v['ci_low'])}–{_fmt(v['ci_high'])}"
        console.print(f"  {k:18s} {_fmt(v['value'])}  [95% CI {ci}]")
    console.print(f"Results: {out / 'results.json'}")


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


@app.command()
@_user_errors
def methods() -> None:
    """List the training methods and their options (set with --method-opt KEY=VALUE)."""
    from wsimil.methods.base import list_methods, method_class
    from wsimil.progress import console

    for name in list_methods():
        cls = method_class(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        console.print(f"[bold]{name}[/]  {doc}", highlight=False)
        for o in cls.spec.options:
            console.print(f"    {o.name} ({o.type_name}) = {o.default!r}  {o.help}", highlight=False, soft_wrap=True)


@app.command()
@_user_errors
def models() -> None:
    """List the available MIL aggregators."""
    from wsimil.models import list_models

    for name in list_models():
        typer.echo(name)


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
    workers: Annotated[int, typer.Option(help="Slides tiled in parallel.")] = 1,
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
import wsimil.cli_export  # noqa: E402, F401
import wsimil.cli_lrmil  # noqa: E402, F401

if __name__ == "__main__":  # `python -m wsimil.cli`: run the importable module's app, which holds every command
    from wsimil.cli import app as registered

    registered()
