"""Writing bundles (:mod:`wsimil.predict.bundle` describes the layout): from trainer checkpoints
(:func:`write_bundle`), from a finished training run (:func:`bundle_from_run`), from LRMIL's per-fold students and
distilled encoders (:func:`bundle_from_distilled`), and an older bundle rewritten in the current format
(:func:`upgrade_bundle`, ``wsimil convert bundle``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from wsimil.checkpoint import SUFFIX, fold_checkpoint, load_checkpoint, save_checkpoint
from wsimil.claims import remove_orphans
from wsimil.errors import WsimilError
from wsimil.io import temp_prefix, write_json
from wsimil.predict.bundle import BUNDLE_FILE, Bundle, load_bundle
from wsimil.predict.members import head_classes
from wsimil.predict.refs import EncoderRef, Member, TilingRef, coords_attrs, feature_attrs


def write_bundle(
    out: str | Path,
    checkpoints: list[str | Path],
    *,
    encoder: EncoderRef | None,
    tiling: TilingRef | None,
    config: dict[str, Any] | None = None,
    copy_encoder_weights: bool = False,
    slide_settings_missing: str | None = None,
    member_encoders: list[EncoderRef] | None = None,
) -> Path:
    """Write a bundle folder from trainer checkpoints (``checkpoints/repeat{r}_fold{k}.pt`` as written by
    :class:`wsimil.methods.trainer.Trainer`, all of one model: the ensemble members).

    ``encoder``/``tiling`` say how slides become features (both ``None`` for a feature-only bundle; give
    ``slide_settings_missing`` to tell users why). With ``copy_encoder_weights`` a weights file is copied into
    ``encoder/`` (recorded relative to the bundle, so the folder moves as one); otherwise its absolute path and
    checksum are recorded. ``member_encoders`` (one per checkpoint, instead of ``encoder``) gives each member its
    own encoder (LRMIL's distilled encoders, always copied into ``encoders/``); the members share ``tiling``. The
    folder is replaced atomically: readers never see a half-written bundle."""
    from wsimil.features.encoders import sha256_file

    out = Path(out)
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise WsimilError("a bundle needs at least one aggregator checkpoint")
    cks = []
    for c in checkpoints:
        ck = load_checkpoint(c)
        if "state_dict" not in ck or "model" not in ck:
            raise WsimilError(f"{c} is not a wsimil trainer checkpoint (no model/state_dict)")
        cks.append(ck)
    first = cks[0]
    for c, ck in zip(checkpoints, cks, strict=True):
        for key in ("model", "method", "in_dim", "classes", "task"):
            if ck.get(key) != first.get(key):
                raise WsimilError(
                    f"checkpoints disagree on {key}: {checkpoints[0]} has {first.get(key)!r}, {c} has {ck.get(key)!r}"
                )
    if member_encoders is not None and (encoder is not None or len(member_encoders) != len(checkpoints)):
        raise WsimilError("give either one encoder for the bundle or one encoder per member checkpoint")
    if (encoder is None and not member_encoders) != (tiling is None):
        raise WsimilError("give both encoder and tiling (a bundle that scores slides) or neither (features only)")
    for ref in [encoder, *(member_encoders or [])]:
        if ref is not None and ref.embed_dim is not None and ref.embed_dim != first["in_dim"]:
            raise WsimilError(
                f"encoder {ref.name!r} gives {ref.embed_dim}-d features, the aggregator takes {first['in_dim']}-d"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent, recursive=False)  # temporary folders of a killed write
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        members = []
        for i, ck in enumerate(cks):
            r, k = int(ck.get("repeat", 0)), int(ck.get("fold", i))
            rel = f"aggregators/repeat{r}_fold{k}{SUFFIX}"
            if any(m.file == rel for m in members):
                rel = f"aggregators/member{len(members)}{SUFFIX}"
            save_checkpoint(tmp / rel, {key: v for key, v in ck.items() if key != "history"})
            own = member_encoders[i] if member_encoders else None
            if own is not None and own.weights not in (None, "hub"):
                copy = tmp if own.distilled or copy_encoder_weights else None
                own = _record_weights(own, copy, f"encoders/{Path(rel).stem}{Path(own.weights).suffix}")
            members.append(Member(rel, r, k, sha256_file(tmp / rel), own))
        if encoder is not None and encoder.weights not in (None, "hub"):
            encoder = _record_weights(encoder, tmp if copy_encoder_weights else None)
        bundle = Bundle(
            path=out,
            classes=list(first["classes"]),
            task=first.get("task", "classification"),
            model=first["model"],
            model_kwargs=first.get("model_kwargs") or {},
            method=first.get("method", "supervised"),
            method_kwargs=first.get("method_kwargs") or {},
            in_dim=int(first["in_dim"]),
            members=members,
            encoder=encoder,
            tiling=tiling,
            head_classes=head_classes(checkpoints[0], list(first["classes"])),
            config=config or {},
            slide_settings_missing=None if encoder is not None or member_encoders else slide_settings_missing,
        )
        write_json(tmp / BUNDLE_FILE, bundle.to_json())
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _record_weights(encoder: EncoderRef, bundle_dir: Path | None, rel: str | None = None) -> EncoderRef:
    """Record a weights file by absolute path and SHA-256, or (``bundle_dir`` given) copy it into
    ``bundle_dir/rel`` (default ``encoder/<name>``) and record it relative to the bundle. A checksum already
    recorded (by ``wsimil extract``) is trusted unless the file is copied; a file that has moved since keeps its
    recorded checksum, so ``--encoder-weights`` can point to it later."""
    from wsimil.features.encoders import sha256_file

    src = Path(str(encoder.weights))
    sha = encoder.weights_sha256
    if bundle_dir is not None or (sha is None and src.is_file()):
        if not src.is_file():
            raise WsimilError(f"encoder weights {src} do not exist")
        got = sha256_file(src)
        if sha and got != sha:
            raise WsimilError(f"encoder weights {src} have SHA-256 {got[:12]}…, not the recorded {sha[:12]}…")
        sha = got
    if sha is None:
        raise WsimilError(f"encoder weights {src} do not exist and no checksum was recorded for them")
    if bundle_dir is not None:
        rel = rel or f"encoder/{src.name}"
        (bundle_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, bundle_dir / rel)
        return EncoderRef(**{**asdict(encoder), "weights": rel, "weights_sha256": sha})
    weights = str(src.resolve()) if src.exists() else str(src)
    return EncoderRef(**{**asdict(encoder), "weights": weights, "weights_sha256": sha})


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` onto ``out``; an existing ``out`` is moved aside first and deleted after."""
    old = None
    if out.exists():
        old = out.with_name(f"{temp_prefix(out.name)}old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def provenance_from_features(features: str | Path) -> tuple[EncoderRef | None, TilingRef | None, str | None]:
    """Encoder and tiling of a feature folder, read from its HDF5 attributes (``features``: encoder, weights and
    checksum; ``coords``: magnification, patch size, tiling settings key) and, for tissue detection and reader, from
    the tiling job the files were extracted from (:meth:`wsimil.slide.tiling_job.TilingJob.find_for_features`).

    Returns ``(encoder, tiling, None)``, or ``(None, None, reason)`` when the features cannot be reproduced from
    slides (no provenance, files that disagree, an encoder wsimil does not know)."""

    from wsimil.features.encoders import ENCODERS
    from wsimil.features.store import FeatureStore
    from wsimil.slide.tiling_job import TilingJob

    try:
        store = FeatureStore(features)
    except WsimilError as e:
        return None, None, str(e)
    if store.ext != ".h5":
        return None, None, f"the features in {store.dir} are .pt files, which carry no encoder or tiling provenance"
    files = sorted(store.dir.glob("*.h5"))
    seen: dict[tuple, list[str]] = {}
    first_f: dict[str, Any] = {}
    first_c: dict[str, Any] = {}
    for p in files:
        fa, ca = feature_attrs(p), coords_attrs(p)
        key = (
            fa.get("encoder"),
            fa.get("weights"),
            fa.get("weights_sha256"),
            ca.get("target_magnification"),
            ca.get("patch_size"),
            ca.get("settings_key"),
        )
        if not seen:
            first_f, first_c = fa, ca
        seen.setdefault(key, []).append(p.stem)
    if len(seen) > 1:
        parts = [f"{k[0]}/{k[1]}/{k[3]}x/{k[4]}px ({len(v)} slides, e.g. {v[0]})" for k, v in seen.items()]
        return None, None, "the feature files disagree on encoder or tiling: " + "; ".join(parts)
    if not first_f.get("encoder") or first_f.get("encoder") == "unknown" or "weights" not in first_f:
        return None, None, f"the feature files in {store.dir} record no encoder provenance (not made by wsimil extract)"
    if first_f["encoder"] not in ENCODERS:
        return None, None, f"the features come from encoder {first_f['encoder']!r}, which is not in wsimil's registry"
    if "target_magnification" not in first_c or "patch_size" not in first_c:
        return None, None, f"the feature files in {store.dir} record no tiling (coords without magnification)"
    try:
        enc = EncoderRef.from_feature_attrs(first_f)
    except (WsimilError, KeyError, ValueError) as e:
        return None, None, f"cannot read the encoder provenance: {e}"
    tissue: dict[str, float] = {}
    min_tissue, reader = 0.1, "auto"
    job = TilingJob.find_for_features(store.dir)  # from what the files record; None: features made elsewhere
    if job is not None:
        tissue = asdict(job.settings.tissue)
        min_tissue, reader = float(job.settings.min_tissue), str(job.settings.reader)
    tiling = TilingRef(
        mag=float(first_c["target_magnification"]),
        patch_size=int(first_c["patch_size"]),
        min_tissue=min_tissue,
        tissue=tissue,
        reader=reader,
    )
    return enc, tiling, None


def bundle_from_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Write ``RUN/bundle/`` (or ``out``) from a finished training run: its fold checkpoints (the folds in
    ``results.json``), resolved config and the provenance of its features (:func:`provenance_from_features`)."""
    import yaml

    run = Path(run)
    cfg_path, res_path = run / "config.yaml", run / "results.json"
    if not cfg_path.is_file() or not res_path.is_file():
        raise WsimilError(f"{run} is not a finished wsimil run (config.yaml and results.json are needed)")
    cfg = yaml.safe_load(cfg_path.read_text())
    res = json.loads(res_path.read_text())
    ckpts = [fold_checkpoint(run / "checkpoints", f["repeat"], f["fold"]) for f in res.get("folds", [])]
    missing = [str(c) for c in ckpts if not c.is_file()]
    if missing or not ckpts:
        raise WsimilError(f"run {run}: missing checkpoints {', '.join(missing) or '(no folds in results.json)'}")
    encoder, tiling, why = provenance_from_features(cfg["features"]) if cfg.get("features") else (None, None, None)
    if encoder is not None and encoder.embed_dim is not None and encoder.embed_dim != int(cfg["in_dim"]):
        why = f"encoder width {encoder.embed_dim} differs from the features' ({cfg['in_dim']})"
        encoder, tiling = None, None
    return write_bundle(
        Path(out) if out is not None else run / "bundle",
        ckpts,
        encoder=encoder,
        tiling=tiling,
        config=cfg,
        slide_settings_missing=why or ("no feature folder recorded" if encoder is None else None),
    )


def upgrade_bundle(src: str | Path, out: str | Path) -> Path:
    """Rewrite a bundle of any layout this wsimil reads (format 1: ``torch.save`` members; format 2; LRMIL's
    ``lrmil.json`` folders) at ``out`` in the current format. Members are read through
    :func:`wsimil.checkpoint.load_checkpoint`, so a member that holds code is refused, and their recorded checksums
    are checked first; encoder files kept in the bundle are copied with it."""
    from wsimil.features.encoders import sha256_file

    b = load_bundle(src)
    files = []
    for m in b.members:
        p = b.path / m.file
        if not p.is_file() or sha256_file(p) != m.sha256:
            raise WsimilError(f"bundle {b.path}: {m.file} is missing or does not match its recorded checksum")
        files.append(p)

    def absolute(ref: EncoderRef | None) -> EncoderRef | None:
        if ref is None or ref.weights in (None, "hub") or Path(ref.weights).is_absolute():
            return ref
        return replace(ref, weights=str(b.path / ref.weights))

    refs = [b.encoder, *(m.encoder for m in b.members)]
    copy = any(r is not None and absolute(r) != r for r in refs)
    return write_bundle(
        out,
        files,
        encoder=absolute(b.encoder),
        tiling=b.tiling,
        config=b.config,
        copy_encoder_weights=copy,
        slide_settings_missing=b.slide_settings_missing,
        member_encoders=[absolute(m.encoder) for m in b.members] if b.member_encoders else None,
    )


def bundle_from_distilled(
    out: str | Path,
    folds: list[tuple[int, Path, Path | None]],
    *,
    classes: list[str],
    encoder: Any,
    seed: int,
    student_input: int | None,
    tiling: Any,
    config: dict,
) -> Path:
    """Write LRMIL's bundle at ``out``: one member per fold ``(fold, student checkpoint, distilled encoder file or
    None)``, each carrying its own encoder: the fold's distilled encoder, or (stage 1 ablated) the teacher encoder
    ``encoder`` (a :class:`wsimil.features.encoders.Encoder`, seed ``seed``) at the LR input size. ``tiling``: the
    LR :class:`wsimil.slide.job.TileSettings` (one magnification)."""
    teacher = EncoderRef.from_feature_attrs(
        {"encoder": encoder.name, "weights": encoder.weights, "weights_sha256": encoder.weights_sha256,
         "embed_dim": encoder.embed_dim}
    )  # fmt: skip
    size = int(student_input) if student_input else None
    teacher = replace(teacher, seed=seed, input_size=size)
    refs = [
        EncoderRef(encoder.name, str(f), embed_dim=encoder.embed_dim, input_size=size, distilled=True)
        if f is not None
        else teacher
        for _, _, f in folds
    ]
    lr = TilingRef(float(tiling.mags[0]), tiling.patch_size, tiling.min_tissue, tiling.tissue.to_dict(), tiling.reader)
    got = [str(c) for c in load_checkpoint(folds[0][1]).get("classes", [])] if folds else []
    if got != [str(c) for c in classes]:
        raise WsimilError(f"the LRMIL students {folds[0][1] if folds else ''} predict classes {got}, not {classes}")
    return write_bundle(out, [c for _, c, _ in folds], encoder=None, tiling=lr, config=config, member_encoders=refs)
