"""``wsimil lrmil``: glue over :func:`wsimil.lrmil.pipeline.run_lrmil` (registered on the main app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from wsimil.cli.common import Threads, _print_metrics, _user_errors, app


@app.command()
@_user_errors
def lrmil(
    job: Annotated[
        Path, typer.Option(help="Tiling job with both magnifications and links (wsimil tile --mag 20 --mag 5).")
    ],
    manifest: Annotated[Path, typer.Option(help="Slide manifest CSV: case_id,slide_id,label.")],
    out: Annotated[Path, typer.Option(help="Run folder (re-running resumes: finished steps are reused).")],
    encoder: Annotated[
        str | None, typer.Option(help="Teacher encoder E_T (see `wsimil encoders`). (default: resnet18)")
    ] = None,
    encoder_weights: Annotated[
        str | None, typer.Option(help="E_T weights file, or 'hub'. Without: seeded random init (a warning).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML config (see configs/lrmil.yaml); flags override it.")
    ] = None,
    folds: Annotated[
        int | None, typer.Option(help="k of the cross-validation shared by every model. (default: 5)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ... (default: auto)")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of splits, random init and training. (default: 0)")] = None,
    epochs: Annotated[int | None, typer.Option(help="Max epochs of teacher, baseline and student ABMIL.")] = None,
    stage1_steps: Annotated[int | None, typer.Option(help="Optimiser steps of stage 1. (default: 500)")] = None,
    stage1_epochs: Annotated[int | None, typer.Option(help="Epochs of stage 1 (instead of --stage1-steps).")] = None,
    stage1_slides: Annotated[
        str | None,
        typer.Option(help="More slides for stage 1 (needs no labels): folder or CSV, tiled in --job like the rest."),
    ] = None,
    stage1_test_slides: Annotated[
        bool, typer.Option(help="Let stage 1 distil on each fold's test slides too (they stay unlabelled).")
    ] = False,
    no_stage1: Annotated[bool, typer.Option("--no-stage1", help="Ablation: no encoder distillation.")] = False,
    no_bag_kd: Annotated[bool, typer.Option("--no-bag-kd", help="Ablation: no bag-logit KD.")] = False,
    no_attn_kd: Annotated[bool, typer.Option("--no-attn-kd", help="Ablation: no attention KD.")] = False,
    no_instance_loss: Annotated[
        bool, typer.Option("--no-instance-loss", help="Ablation: no top/bottom-k instance loss.")
    ] = False,
    timing_slides: Annotated[
        int | None, typer.Option(help="Slides timed on both inference paths. (default: 4)")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Patches per encoder batch. (default: 64)")] = None,
    loader_workers: Annotated[int | None, typer.Option(help="DataLoader workers reading patches. (default: 0)")] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Stop after a step: hr_features teacher baseline stage1 lr_features student timing."),
    ] = None,
    shared: Annotated[
        Path | None,
        typer.Option(help="Run folder whose features, teacher, baseline and stage 1 to reuse (e.g. for ablations)."),
    ] = None,
    threads: Threads = None,
    weights: Annotated[str | None, typer.Option(hidden=True, help="Deprecated: --encoder-weights.")] = None,
    workers: Annotated[int | None, typer.Option(hidden=True, help="Deprecated: --loader-workers.")] = None,
) -> None:
    """LRMIL: distil a 20x teacher into a 5x-only pipeline (SPEC §1), with HR teacher and LR baseline beside it.

    Writes RUN/results.json (metrics of teacher_hr, baseline_lr, student_lr; seconds per slide of both inference
    paths), every step's outputs, and RUN/bundle/ (the LR pipeline: `wsimil predict --bundle RUN/bundle` scores new
    slides from 5x alone)."""
    from wsimil.flags import renamed
    from wsimil.lrmil.config import load_lrmil_config
    from wsimil.lrmil.pipeline import run_lrmil
    from wsimil.progress import console

    overrides = {
        "encoder": encoder,
        "weights": renamed(encoder_weights, weights, "--encoder-weights", "--weights"),
        "folds": folds,
        "device": device,
        "seed": seed,
        "timing_slides": timing_slides,
        "batch_size": batch_size,
        "workers": renamed(loader_workers, workers, "--loader-workers", "--workers"),
        "threads": threads,
        "shared": str(shared) if shared else None,
        "teacher.epochs": epochs,
        "student.epochs": epochs,
        "stage1.epochs": stage1_epochs,
        "stage1.steps": stage1_steps,
        "stage1_slides": stage1_slides,
        "stage1_test_slides": True if stage1_test_slides else None,
        "stage1.enabled": False if no_stage1 else None,
        "stage2.lambda_bag": 0.0 if no_bag_kd else None,
        "stage2.lambda_soft": 0.0 if no_attn_kd else None,
        "stage2.lambda_hard": 0.0 if no_instance_loss else None,
    }
    cfg = load_lrmil_config(config, **overrides)
    res = run_lrmil(cfg, job, manifest, out, until=until)
    if not res:
        console.print(f"Stopped after step {until!r}; re-run without --until to continue ({out})")
        return
    for name, m in res["metrics"].items():
        console.print(f"[bold]{name}[/]")
        _print_metrics({k: v for k, v in m.items() if k in ("auc", "balanced_accuracy", "f1_weighted")})
    sp = res["seconds_per_slide"]
    if sp.get("hr") is not None:
        console.print(f"seconds per slide: HR {sp['hr']:.2f}, LR {sp['lr']:.2f} ({sp['speedup']:.1f}x faster)")
    console.print(f"Results: {out / 'results.json'}; LR pipeline: {out / 'bundle'}")
