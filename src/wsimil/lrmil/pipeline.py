"""LRMIL end to end (SPEC §1), in its real dependency order, resumable step by step.

``run_lrmil(cfg, job, manifest, out)`` on a job tiled at 20× and 5× with links:

1. HR features with the frozen encoder ``E_T``: final embedding + per-layer summary tokens → ``features/hr/``.
2. HR teacher ABMIL per fold (the shared trainer, CE, selected on validation AUC) → ``teacher/``; its logits and
   raw/softmax attention for every slide → ``teacher/dump/fold{k}.h5``.
   LR baseline: ``E_T`` features at 5× → ``features/lr_teacher/``; plain ABMIL per fold → ``baseline_lr/``.
3. Stage 1 per fold: distil ``E_S`` from ``E_T`` on the fold's training slides → ``stage1/fold{k}/encoder.safetensors``.
4. LR features with fold k's ``E_S`` for every slide → ``features/lr_student_fold{k}/``.
5. Stage 2 per fold: student ABMIL (``method: lrmil``) → ``student/fold{k}/``, merged in ``student/``.
6. Timing of both inference paths on the same slides → ``timing.json``; the LR pipeline → ``bundle/``.

``RUN/results.json``: ``metrics`` = ``{teacher_hr, baseline_lr, student_lr}`` (each the trainer's ``metrics``),
``folds`` (the same, per fold), ``seconds_per_slide`` = ``{hr, lr, speedup}`` and where each part lives.

**Folds and leakage** (our decision; the official code reuses one student encoder across folds): one split of the
manifest (stratified, grouped by case) is shared by every model. For fold ``k`` the teacher is trained on fold ``k``'s
training slides (validation part for model selection), stage 1 sees only fold ``k``'s training slides (their LR
images, their HR teacher features and the fold teacher's attention), and the student is trained and selected on the
same training/validation slides. A test slide's label therefore never reaches its own prediction: not through the
teacher (trained without it), not through the distilled encoder (never saw the slide) nor through the student. The
teacher's outputs on a fold's test slides are dumped (useful for analysis) but never used in training.

``cfg.shared`` (``--shared DIR``) puts the steps that do not depend on the stage-2 options (features, teacher, LR
baseline, stage 1) in another run folder, so ablations of the student losses reuse them; do not run two commands on
one shared folder at the same time.

Resuming: every step records a key of everything it depends on; a re-run reuses steps (and per-slide feature files,
per-fold checkpoints) whose key is unchanged and redoes the rest.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from wsimil import __version__
from wsimil.checkpoint import SUFFIX, fold_checkpoint, load_checkpoint
from wsimil.config import TrainConfig, resolve_device
from wsimil.data.batching import Standardizer
from wsimil.data.manifest import read_manifest
from wsimil.data.splits import Split, kfold_splits
from wsimil.evaluation.metrics import nan_to_none, summarize
from wsimil.features.encoders import Encoder, create_encoder
from wsimil.features.extract import EncodeSettings, final_fn
from wsimil.io import write_csv, write_json, write_text, write_yaml
from wsimil.lrmil.config import LRMILConfig, MILSettings
from wsimil.lrmil.features import extract, taps_fn
from wsimil.lrmil.job import LRMILJob
from wsimil.lrmil.taps import check_layers, default_layers, n_blocks, undistilled_attrs, undistilled_lr_encoder
from wsimil.methods.teacher_dump import dump_covers, dump_hash, dump_teacher
from wsimil.progress import console, make_progress
from wsimil.slide.mag import mag_name
from wsimil.slide.tiling_job import links_dataset
from wsimil.threads import apply_threads

STEPS = ("hr_features", "teacher", "baseline", "stage1", "lr_features", "student", "timing", "bundle")
MODELS = ("teacher_hr", "baseline_lr", "student_lr")


def key_of(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fresh_dir(path: Path, key: str) -> Path:
    """``path`` for a step whose inputs hash to ``key``: outputs of another key are removed first."""
    marker = path / ".lrmil_key"
    if path.exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_text(marker, key + "\n")
    return path


def write_splits(splits: list[Split], path: Path) -> Path:
    """Patho-Bench style ``slide_id, fold_0…`` (train/val/test) so every trainer call sees the same folds."""
    ids = sorted({s for sp in splits for s in sp.train + sp.val + sp.test})
    df = pd.DataFrame({"slide_id": ids})
    for sp in splits:
        part = {**{s: "train" for s in sp.train}, **{s: "val" for s in sp.val}, **{s: "test" for s in sp.test}}
        df[f"fold_{sp.fold}"] = [part.get(s, "") for s in ids]
    write_text(path, df.to_csv(sep="\t", index=False))
    return path


def train_config(ms: MILSettings, cfg: LRMILConfig, classes: list[str], splits: Path, method: str = "supervised",
                 method_kwargs: dict | None = None) -> TrainConfig:  # fmt: skip
    """The trainer config of one LRMIL training (teacher, baseline or student): its :class:`MILSettings` (a subset
    of TrainConfig's fields) and the run-wide fields of the LRMIL config."""
    return TrainConfig(
        **ms.model_dump(),
        method=method,
        method_kwargs=method_kwargs or {},
        splits=str(splits),
        folds=cfg.folds,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        device=cfg.device,
        bootstrap=cfg.bootstrap,
        classes=classes,
        label_column=cfg.label_column,
        threads=cfg.threads,
    )


def build_teacher_encoder(cfg: LRMILConfig) -> Encoder:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*randomly initialised.*")
        return create_encoder(cfg.encoder, cfg.weights, cfg.seed)


def merge_fold_runs(runs: list[Path], out: Path, config: dict) -> dict:
    """One results.json / predictions.csv / history.csv in the trainer's schema from single-fold runs."""
    folds, preds, hist = [], [], []
    for r in runs:
        res = json.loads((r / "results.json").read_text())
        folds += res["folds"]
        preds.append(pd.read_csv(r / "predictions.csv"))
        if (r / "history.csv").is_file() and (r / "history.csv").stat().st_size > 1:
            hist.append(pd.read_csv(r / "history.csv"))
    metrics = summarize([{k: (float("nan") if v is None else v) for k, v in f["metrics"].items()} for f in folds])
    payload = nan_to_none({"metrics": metrics, "folds": folds, "config": config})
    write_json(out / "results.json", payload)
    write_csv(out / "predictions.csv", pd.concat(preds, ignore_index=True))
    if hist:
        write_csv(out / "history.csv", pd.concat(hist, ignore_index=True))
    return payload


def run_lrmil(
    cfg: LRMILConfig, job: str | Path, manifest: str | Path, out: str | Path, until: str | None = None
) -> dict:
    """Run LRMIL (module docstring) and write ``out``; ``until`` stops after the named step (one of ``STEPS``)."""
    from wsimil.errors import WsimilError
    from wsimil.methods.trainer import run_training

    if until is not None and until not in STEPS:
        raise WsimilError(f"unknown step {until!r}; steps in order: {', '.join(STEPS)}")
    out = Path(out).resolve()  # absolute: trainer configs (and so their hashes) hold these paths
    device = resolve_device(cfg.device)
    threads = apply_threads(cfg.threads, "encode", workers=cfg.workers)  # each step re-resolves it for its work
    man = read_manifest(manifest, cfg.classes, cfg.label_column)
    ids = man.slide_ids
    j = LRMILJob(job, cfg.hr_mag, cfg.lr_mag, cfg.patch_size)
    j.check(ids)
    extra = unlabelled_slides(cfg.stage1_slides, j, ids) if cfg.stage1.enabled else []
    hr_ids = ids + extra  # HR features and teacher outputs: stage 1 needs them for every slide it distils on
    reader = cfg.reader or j.tiling_job.settings.reader
    splits = kfold_splits(man, cfg.folds, 1, cfg.val_fraction, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    base = Path(cfg.shared).resolve() if cfg.shared else out  # steps that do not depend on the stage-2 options
    splits_all = write_splits(splits, base / "splits" / "all.tsv")
    teacher = build_teacher_encoder(cfg)
    nb = n_blocks(teacher.model)
    layers = check_layers(cfg.stage1.layers or default_layers(nb), nb, f"encoder {cfg.encoder!r}")
    s1_input = lr_input_size(cfg, j, teacher)
    resolved = {
        **cfg.model_dump(mode="json"),
        "device": device,
        "reader": reader,
        "patch_size": j.patch_size,
        "job": str(Path(job).resolve()),
        "manifest": str(Path(manifest).resolve()),
        "classes": man.classes,
        "stage1": {**cfg.stage1.model_dump(mode="json"), "layers": list(layers), "input_size": s1_input},
        "encoder_weights": teacher.weights,
        "wsimil_version": __version__,
        "threads_resolved": threads.to_dict(),  # feature extraction's; each training run's config has its own
    }
    write_yaml(out / "config.yaml", resolved)
    st = EncodeSettings(device, cfg.batch_size, cfg.workers, cfg.precision, reader, threads=cfg.threads)
    enc_id = (
        teacher.name,
        teacher.weights,
        teacher.weights_sha256,
        teacher.spec.input_size,
        j.tiling_job.settings_key,
    )
    hr_key = key_of("hr", enc_id, cfg.hr_mag, layers)
    lr_t_key = key_of("lr_teacher", enc_id, cfg.lr_mag, s1_input)
    split_key = key_of([(s.fold, s.train, s.val, s.test) for s in splits])
    console.print(
        f"LRMIL on {len(ids)} slides, {len(splits)} folds, encoder {cfg.encoder} ({teacher.weights}), "
        f"{mag_name(cfg.hr_mag)} → {mag_name(cfg.lr_mag)}, device {device} → {out}"
    )

    def done(step: str) -> bool:
        return until == step

    # 1. HR features + summary tokens ------------------------------------------------------------------------------
    hr_dir = extract(j, hr_ids, cfg.hr_mag, taps_fn(teacher, layers), teacher, base / "features" / "hr", hr_key, st,
                     f"1/6 HR features ({mag_name(cfg.hr_mag)}) + summary tokens of blocks {list(layers)}")  # fmt: skip
    if done("hr_features"):
        return {}

    # 2. HR teacher, dumps; LR baseline ----------------------------------------------------------------------------
    console.print("2/6 HR teacher ABMIL per fold")
    t_key = key_of(hr_key, split_key, cfg.teacher.model_dump(), man.classes, cfg.seed, cfg.bootstrap)
    t_dir = fresh_dir(base / "teacher", t_key)
    res_teacher = run_training(train_config(cfg.teacher, cfg, man.classes, splits_all), hr_dir, manifest, t_dir)
    dumps = {}
    for sp in splits:
        ckpt = fold_checkpoint(t_dir / "checkpoints", 0, sp.fold)
        dumps[sp.fold] = path = t_dir / "dump" / f"fold{sp.fold}.h5"
        ck_hash = load_checkpoint(ckpt)["config_hash"]
        if dump_hash(path) != ck_hash or not dump_covers(path, hr_ids):
            dump_teacher(ckpt, hr_dir, hr_ids, path, device)
    if done("teacher"):
        return {}
    # the undistilled encoder sees LR patches at the student's input size: E_S before stage 1, so that the baseline
    # and the no-stage-1 ablation differ from the student by the distillation alone (not by a resize to 224 px)
    lr_base = undistilled_lr_encoder(teacher, s1_input)
    lr_t_dir = extract(j, ids, cfg.lr_mag, final_fn(lr_base), lr_base, base / "features" / "lr_teacher", lr_t_key, st,
                       f"   LR features ({mag_name(cfg.lr_mag)}, {s1_input} px) of the undistilled encoder",
                       attrs=undistilled_attrs(teacher, s1_input))  # fmt: skip
    console.print("   LR baseline: plain ABMIL on those features")
    b_key = key_of(lr_t_key, split_key, cfg.student.model_dump(), man.classes, cfg.seed, cfg.bootstrap)
    b_dir = fresh_dir(base / "baseline_lr", b_key)
    res_base = run_training(train_config(cfg.student, cfg, man.classes, splits_all), lr_t_dir, manifest, b_dir)
    if done("baseline"):
        return {}

    # 3–5. per fold: stage 1, LR features, stage 2 -------------------------------------------------------------------
    student_runs, encoders = [], {}
    for sp in splits:
        k = sp.fold
        if cfg.stage1.enabled:
            from wsimil.lrmil.stage1 import load_student

            enc_path, lr_key = stage1_fold(cfg, j, teacher, sp, layers, s1_input, hr_dir, dumps[k], base, hr_key,
                                           dump_hash(dumps[k]), reader, device, extra)  # fmt: skip
            encoders[k] = enc_path
            if until == "stage1":
                continue
            student, _ = load_student(enc_path, teacher)
            feat_dir = extract(j, ids, cfg.lr_mag, final_fn(student), student,
                               base / "features" / f"lr_student_fold{k}", lr_key, st,
                               f"4/6 LR features ({mag_name(cfg.lr_mag)}) with fold {k}'s distilled encoder",
                               attrs={"encoder": f"lrmil-student:{teacher.name}",
                                      "lrmil_input_size": s1_input})  # fmt: skip
        else:
            encoders[k], lr_key, feat_dir = None, lr_t_key, lr_t_dir
        if until in ("stage1", "lr_features"):
            continue
        console.print(f"5/6 student ABMIL, fold {k}")
        kwargs = {
            "teacher_dump": str(dumps[k].resolve()),
            "links_dir": str((j.root / "links").resolve()),
            "links_dataset": links_dataset(cfg.lr_mag, cfg.hr_mag),
            **cfg.stage2.model_dump(),
        }
        s_key = key_of(lr_key, dump_hash(dumps[k]), kwargs, cfg.student.model_dump(), sp.test, cfg.seed, cfg.bootstrap)
        s_dir = fresh_dir(out / "student" / f"fold{k}", s_key)
        fold_split = write_splits([sp], base / "splits" / f"fold{k}.tsv")
        run_training(
            train_config(cfg.student, cfg, man.classes, fold_split, "lrmil", kwargs), feat_dir, manifest, s_dir
        )
        student_runs.append(s_dir)
    if until in ("stage1", "lr_features"):
        return {}
    res_student = merge_fold_runs(student_runs, out / "student", {**resolved, "folds": len(student_runs)})
    if done("student"):
        return {}

    # 6. timing and bundle -------------------------------------------------------------------------------------------
    timing = time_run(cfg, j, teacher, splits[0], t_dir, out, encoders, s1_input, st, device)
    if done("timing"):
        return {}
    from wsimil.predict.write import bundle_from_distilled

    bundle_from_distilled(
        out / "bundle",
        [
            (
                sp.fold,
                fold_checkpoint(out / "student" / f"fold{sp.fold}" / "checkpoints", 0, sp.fold),
                encoders.get(sp.fold),
            )
            for sp in splits
        ],  # fmt: skip
        classes=man.classes,
        encoder=teacher,
        seed=cfg.seed,
        student_input=s1_input,
        tiling=j.tile_settings([cfg.lr_mag]),
        config=resolved,
    )
    results = {name: r for name, r in zip(MODELS, (res_teacher, res_base, res_student), strict=True)}
    payload = {
        "metrics": {name: r["metrics"] for name, r in results.items()},
        "folds": {name: r["folds"] for name, r in results.items()},
        "seconds_per_slide": {
            "hr": timing.get("hr", {}).get("seconds_per_slide"),
            "lr": timing.get("lr", {}).get("seconds_per_slide"),
            "speedup": timing.get("speedup"),
            "n_slides": timing.get("n_slides", 0),
            "patches_per_slide": {p: timing.get(p, {}).get("patches_per_slide") for p in ("hr", "lr")},
        },
        "ablations": {
            "stage1": cfg.stage1.enabled,
            "bag_kd": cfg.stage2.lambda_bag > 0,
            "attention_kd": cfg.stage2.lambda_soft > 0,
            "instance_loss": cfg.stage2.lambda_hard > 0,
        },
        "runs": {
            "teacher_hr": str(t_dir.resolve()),
            "baseline_lr": str(b_dir.resolve()),
            "student_lr": str((out / "student").resolve()),
            "bundle": str((out / "bundle").resolve()),
        },
        "config": resolved,
    }
    payload = nan_to_none(payload)
    write_json(out / "results.json", payload)
    return payload


def stage1_fold(cfg, j, teacher, sp, layers, s1_input, hr_dir, dump, out, hr_key, d_hash, reader, device, extra=()):
    """Stage 1 of one fold (reused when its key matches); returns ``(encoder file, LR feature key)``."""
    from wsimil.lrmil.stage1 import Stage1Patches, Stage1Settings, save_student, train_stage1

    s1 = cfg.stage1
    train_ids, held_out = stage1_slides(sp, cfg.seed, extra, cfg.stage1_test_slides)
    key = key_of(hr_key, d_hash, s1.model_dump(), list(layers), s1_input, train_ids, held_out, cfg.seed)
    path = out / "stage1" / f"fold{sp.fold}" / f"encoder{SUFFIX}"
    have = load_checkpoint(path).get("key") if path.is_file() else None
    if have != key:
        n_extra = len(set(train_ids) - set(map(str, sp.train)))
        console.print(
            f"3/6 stage 1, fold {sp.fold}: distilling on {len(train_ids)} slides"
            + (f" ({n_extra} unlabelled)" if n_extra else "")
            + f", selecting on {len(held_out)} held-out slides"
        )
        apply_threads(cfg.threads, "encode", workers=s1.workers)
        data = Stage1Patches(j, train_ids, hr_dir, dump, layers, reader)
        val = Stage1Patches(j, held_out, hr_dir, dump, layers, reader) if held_out else None
        opts = s1.model_dump(exclude={"input_size"})
        settings = Stage1Settings(**opts, input_size=s1_input, seed=cfg.seed + sp.fold, device=device, reader=reader)
        with make_progress() as progress:
            student, adapters, history = train_stage1(teacher, data, settings, j.factor, progress=progress,
                                                       val_data=val)  # fmt: skip
        save_student(path, student, adapters, {"key": key, "layers": list(layers), "history": history,
                                               "fold": sp.fold, "n_patches": len(data),
                                               "slides": train_ids, "selection_slides": held_out})  # fmt: skip
        write_csv(path.parent / "history.csv", pd.DataFrame(history))
    return path, key_of("lr_student", key, cfg.lr_mag)


def stage1_slides(sp: Split, seed: int, extra=(), use_test: bool = False) -> tuple[list[str], list[str]]:
    """Stage 1's slides of a fold: ``(distil on, select on)``. Distils on the fold's training slides plus the
    ``extra`` (unlabelled) ones, less the fold's test slides (unless ``use_test``) and the held-out ones. Selection
    uses the fold's validation slides; with none, 15% of its training slides (at least one, when there are two or
    more) are held out."""
    train = [str(s) for s in sp.train]
    if sp.val:
        held = [str(s) for s in sp.val]
    elif len(train) >= 2:
        rng = np.random.default_rng(seed + 7919 * sp.fold)
        held = sorted(rng.choice(train, max(1, round(0.15 * len(train))), replace=False).tolist())
    else:
        held = []
    banned = set(held) | (set() if use_test else {str(s) for s in sp.test})
    distil = [s for s in train if s not in banned]
    distil += [str(s) for s in extra if str(s) not in banned and str(s) not in distil]
    return distil, held


def unlabelled_slides(spec: str | None, j: LRMILJob, labelled: list[str]) -> list[str]:
    """Slide ids of ``stage1_slides`` (a slide folder, or a CSV with ``slide_id`` or ``path``) not in the
    manifest, checked to be tiled in the job at both magnifications with links."""
    from wsimil.errors import WsimilError

    if not spec:
        return []
    p = Path(spec)
    if p.suffix.lower() == ".csv" and p.is_file():
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
        if "slide_id" in df.columns:
            found = [s for s in df["slide_id"] if s]
        elif "path" in df.columns:
            found = [Path(s).stem for s in df["path"] if s]
        else:
            raise WsimilError(f"stage1_slides table {p} needs a 'slide_id' or 'path' column")
    elif p.is_dir():
        from wsimil.slide.job import collect_slides

        found = [s.slide_id for s in collect_slides(p)]
    else:
        raise WsimilError(f"stage1_slides {spec} is neither a slide folder nor a CSV file")
    have = set(labelled)
    extra = list(dict.fromkeys(s for s in found if s not in have))
    try:
        j.check(extra)
    except WsimilError as e:
        raise WsimilError(
            f"{e}\nstage-1 slides must be tiled in the job like the cohort: wsimil tile --slides {spec} "
            f"--out {j.root} --mag {j.hr:g} --mag {j.lr:g}"
        ) from None
    return extra


def lr_input_size(cfg: LRMILConfig, j: LRMILJob, teacher: Encoder) -> int:
    """Pixels of the LR encoder input: ``stage1.input_size``, by default the LR patch size (for ViTs the nearest
    size whose token grid splits into whole child blocks, see :func:`~wsimil.lrmil.taps.student_input_size`). A
    size that splits tokens between children is refused."""
    from wsimil.errors import WsimilError
    from wsimil.lrmil.taps import check_student_input, student_input_size

    size = cfg.stage1.input_size or student_input_size(teacher.model, j.patch_size, j.factor)
    problem = check_student_input(teacher.model, size, j.factor)
    if problem:
        raise WsimilError(f"stage1.input_size: {problem}")
    return size


def time_run(cfg, j, teacher, sp, t_dir, out, encoders, lr_input, st, device) -> dict:
    """Time both inference paths on up to ``cfg.timing_slides`` test slides of the first fold with that fold's
    models; cached in ``timing.json`` under a key of the models."""
    from wsimil.lrmil.stage1 import load_student
    from wsimil.predict.memory import SlidePipeline, time_paths
    from wsimil.run import load_model

    slides = sp.test[: cfg.timing_slides]
    k = sp.fold
    t_ckpt = fold_checkpoint(t_dir / "checkpoints", 0, k)
    s_ckpt = fold_checkpoint(out / "student" / f"fold{k}" / "checkpoints", 0, k)
    key = key_of(slides, [p.stat().st_mtime_ns for p in (t_ckpt, s_ckpt)], encoders.get(k) and str(encoders[k]),
                 device, st.batch_size, st.precision)  # fmt: skip
    path = out / "timing.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("key") == key:
            return old
    if not slides:
        return {}

    def members(ckpt: Path):
        model, ck = load_model(ckpt, device)
        return [(model, Standardizer.from_state(ck.get("standardizer")))]

    lr_encoder = undistilled_lr_encoder(teacher, lr_input)
    if encoders.get(k) is not None:
        lr_encoder, _ = load_student(encoders[k], teacher)
    hr_path = SlidePipeline(j.tile_settings([cfg.hr_mag]), teacher, members(t_ckpt), st)
    lr_path = SlidePipeline(j.tile_settings([cfg.lr_mag]), lr_encoder, members(s_ckpt), st)
    console.print(f"6/6 timing both inference paths end to end on {len(slides)} slides (fold {k} test slides)")
    plan = apply_threads(cfg.threads, "encode", workers=st.workers)
    res = time_paths(hr_path, lr_path, [j.spec(s) for s in slides])
    res["key"] = key
    res["threads"] = plan.threads
    res["device"] = device
    write_json(path, res)
    return res
