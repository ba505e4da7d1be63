"""``wsimil train``, ``evaluate``, ``methods``, ``models``: MIL training and its registries."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.common import Threads, _default, _fmt, _print_metrics, _user_errors, app
from wsimil.flags import renamed


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
        batch_size=renamed(bag_batch_size, batch_size, "--bag-batch-size", "--batch-size"),
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
