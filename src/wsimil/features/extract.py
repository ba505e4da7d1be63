"""Feature extraction for a tiling job: patches → encoder → ``JOB/{grid}/features_{encoder}/{slide_id}.h5``.

Resumable (a slide whose feature file matches the current encoder, weights and tiling is skipped), robust (a
slide that fails is reported in ``features_{encoder}/status.csv`` and the others go on) and shareable (runs on
several machines split the slides; :mod:`wsimil.claims`).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from wsimil import __version__
from wsimil.claims import CLAIM_TIMEOUT, holder, merge_rows, remove_orphans, try_claim
from wsimil.errors import WsimilError
from wsimil.features.encoders import Encoder, create_encoder
from wsimil.features.patches import PatchGrid, SlidePatchBlocks, patch_labels_from_mask
from wsimil.features.store import write_bag
from wsimil.slide.mag import mag_name, parse_mag
from wsimil.slide.tiling_job import TilingJob
from wsimil.slide.tiling_job import features_dir as layout_features_dir
from wsimil.threads import apply_threads

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class EncodeSettings:
    """How the extraction engine (:func:`encode_grid`) reads and encodes patches, whatever the encoder."""

    device: str = "cpu"
    batch_size: int = 64  # patches per encoder batch (CLI --batch-size)
    workers: int = 0  # DataLoader workers reading patches (CLI --loader-workers)
    precision: str = "fp32"
    reader: str = "auto"
    block: int = 4  # cells per side of one read; OpenSlide slows down on much larger regions
    threads: int | str | None = None  # CPU threads, N or auto; None: the process-wide request (wsimil.threads)

    def validate(self) -> None:
        """Refuse settings no slide could be encoded with, before the encoder is loaded."""
        if self.precision not in PRECISIONS:
            raise WsimilError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.batch_size < 1:
            raise WsimilError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise WsimilError(f"--loader-workers must be 0 (read in the main process) or more, got {self.workers}")


@dataclass(kw_only=True)
class ExtractSettings(EncodeSettings):
    """``wsimil extract``: the engine's settings plus which grid (``mag``) and encoder (name, weights, seed)."""

    mag: float
    encoder: str
    weights: str | None = None  # CLI --encoder-weights: a file, "hub", or None (seeded random init)
    seed: int = 0

    def __post_init__(self) -> None:
        self.mag = parse_mag(self.mag)


def encode_grid(
    fn: Callable[[Tensor], dict[str, Tensor]], grid: PatchGrid, st: EncodeSettings, mpp: float | None = None
) -> dict[str, np.ndarray]:
    """The extraction engine: apply ``fn`` (uint8 patches ``(b, ps, ps, 3)`` on ``st.device`` → named outputs
    ``(b, …)``) to every patch of ``grid`` in batches of ``st.batch_size``; returns the outputs as float32 arrays
    ``(N, …)`` in the grid's order (``{}`` for a grid without patches).

    ``fn`` is the hook: :func:`final_fn` gives the encoder embedding (``wsimil extract``), LRMIL's ``taps_fn`` adds
    per-layer summary tokens. Reads run in ``st.workers`` DataLoader workers, pinned for CUDA."""
    n = len(grid.coords)
    out: dict[str, np.ndarray] = {}
    if n == 0:
        return out
    cuda = st.device.startswith("cuda")
    loader = torch.utils.data.DataLoader(
        SlidePatchBlocks(grid, st.reader, mpp, st.block),
        batch_size=None,
        shuffle=False,
        num_workers=st.workers,
        pin_memory=cuda,
        persistent_workers=False,
        prefetch_factor=4 if st.workers else None,
    )
    dtype = PRECISIONS[st.precision]
    autocast = (
        torch.autocast(device_type="cuda" if cuda else "cpu", dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    pending_x: list[Tensor] = []
    pending_i: list[Tensor] = []

    def flush(force: bool) -> None:
        """Encode full batches of the pending patches (and, with ``force``, the remainder)."""
        if not pending_x or (not force and sum(len(x) for x in pending_x) < st.batch_size):
            return
        x, i = torch.cat(pending_x), torch.cat(pending_i)
        pending_x.clear()
        pending_i.clear()
        start, bs = 0, st.batch_size
        while len(x) - start >= bs or (force and start < len(x)):
            xb, ib = x[start : start + bs], i[start : start + bs]
            with torch.inference_mode(), autocast:
                res = fn(xb.to(st.device, non_blocking=True))
            for k, v in res.items():
                if k not in out:
                    out[k] = np.empty((n, *v.shape[1:]), dtype=np.float32)
                out[k][ib.numpy()] = v.float().cpu().numpy()
            start += bs
        if start < len(x):
            pending_x.append(x[start:])
            pending_i.append(i[start:])

    for patches, idx in loader:
        pending_x.append(patches)
        pending_i.append(idx)
        flush(False)
    flush(True)
    return out


def final_fn(encoder: Encoder) -> Callable[[Tensor], dict[str, Tensor]]:
    """The engine's default hook: patches → ``{"features": encoder embedding (b, D)}``."""
    return lambda u8: {"features": encoder.model(encoder.preprocess(u8))}


def encode_slide(encoder: Encoder, grid: PatchGrid, st: EncodeSettings, mpp: float | None = None) -> np.ndarray:
    """Features ``(N, D)`` float32 of one slide's patches, in the order of ``grid.coords``."""
    feats = encode_grid(final_fn(encoder), grid, st, mpp).get("features")
    return feats if feats is not None else np.empty((0, encoder.embed_dim), dtype=np.float32)


def features_dir(job: TilingJob | str | Path, st: ExtractSettings, patch_size: int | None = None) -> Path:
    """``JOB/{grid}/features_{encoder}/`` of ``st`` (the patch size is the job's unless given)."""
    if patch_size is None or isinstance(job, TilingJob):
        j = as_job(job)
        j.check_patch_size(patch_size)
        return j.features_dir(st.mag, st.encoder)
    return layout_features_dir(Path(job), st.mag, patch_size, st.encoder)


def as_job(job: TilingJob | str | Path) -> TilingJob:
    return job if isinstance(job, TilingJob) else TilingJob.open(job)


def _valid(path: Path, encoder: Encoder, grid: PatchGrid) -> bool:
    try:
        with h5py.File(path, "r") as f:
            a = f["features"].attrs
            return (
                a.get("encoder") == encoder.name
                and a.get("weights") == encoder.weights
                and a.get("tiling_key") == grid.attrs.get("settings_key")
                and len(f["features"]) == len(grid.coords)
            )
    except (OSError, KeyError):
        return False


def process_slide(
    encoder: Encoder,
    job: TilingJob,
    st: ExtractSettings,
    slide: dict,
    overwrite: bool,
    claim_timeout: float = CLAIM_TIMEOUT,
) -> dict:
    """Encode one slide of a job (``slide`` is its row of ``slides.csv``); returns its status row. Never raises
    for a bad slide: the error goes into the row. A slide another worker has claimed is left to it (``claimed``)."""
    sid = slide["slide_id"]
    t0 = time.perf_counter()
    row = {"slide_id": sid, "status": "ok", "error": "", "patches": 0, "seconds": 0.0}
    claim = None
    try:
        ppath = job.patches_path(st.mag, sid)
        if (tiler := holder(job.root, sid, claim_timeout)) is not None:  # its patches are being written
            row.update(status="claimed", error=f"being tiled by {tiler}")
            return row
        if not ppath.is_file():
            raise WsimilError(
                f"slide {sid!r}: no {mag_name(st.mag)} patches in {ppath.parent} (tiling failed or "
                "this magnification was not tiled)"
            )
        grid = PatchGrid.from_h5(ppath, slide["path"])
        fpath = job.features_dir(st.mag, st.encoder) / f"{sid}.h5"
        row["patches"] = len(grid.coords)
        if not overwrite and _valid(fpath, encoder, grid):
            row["status"] = "skipped"
        elif not (claim := try_claim(fpath.parent, sid, claim_timeout)).held:
            row.update(status="claimed", error=claim.describe())
        elif not overwrite and _valid(fpath, encoder, grid):  # finished by another worker meanwhile
            row["status"] = "skipped"
        else:
            mpp = float(slide["mpp"]) if slide.get("mpp") else None
            feats = encode_slide(encoder, grid, st, mpp)
            labels = None
            if slide.get("tumor_mask"):
                from PIL import Image

                mask = np.asarray(Image.open(slide["tumor_mask"]))
                labels = patch_labels_from_mask(grid, mask, float(slide.get("mask_downsample") or 16))
            write_bag(
                fpath,
                feats,
                grid.coords,
                instance_labels=labels,
                encoder=encoder.name,
                attrs={
                    "weights": encoder.weights,
                    "weights_sha256": encoder.weights_sha256 or "",
                    "transforms": encoder.transforms_description(),
                    "precision": st.precision,
                    "tiling_key": grid.attrs.get("settings_key", ""),
                    "tiling_job": str(job.root.resolve()),  # TilingJob.find_for_features
                    "embed_dim": encoder.embed_dim,
                    "wsimil_version": __version__,
                },
                coords_attrs={k: v for k, v in grid.attrs.items() if v is not None},
            )
    except WsimilError as e:
        row.update(status="failed", error=str(e))
    except Exception as e:  # noqa: BLE001 - one bad slide must not stop the batch
        msg = traceback.format_exception_only(type(e), e)[-1].strip()
        row.update(status="failed", error=f"unexpected: {msg}")
    finally:
        if claim is not None:
            claim.release()
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def run_extraction(
    job: TilingJob | str | Path,
    st: ExtractSettings,
    patch_size: int | None = None,
    overwrite: bool = False,
    encoder: Encoder | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    claim_timeout: float = CLAIM_TIMEOUT,
    slide_ids: list[str] | None = None,
) -> pd.DataFrame:
    """Encode every tiled slide of ``job`` at ``st.mag`` (or those in ``slide_ids``); returns (and writes) the
    per-slide status table. The patch size is the job's (``patch_size``, when given, must agree with it).

    ``backend="ray"`` runs one task per slide on a Ray cluster (see :mod:`wsimil.features.distributed`); the
    features are the same as with the local backend. Several runs may share ``job`` (:mod:`wsimil.claims`): each
    slide is encoded by the run that claims it; the others list it as ``claimed``."""
    from wsimil.progress import make_progress

    job = as_job(job)
    job.check_patch_size(patch_size)
    listed = list(job.slides().values())
    slides = [s for s in listed if slide_ids is None or s["slide_id"] in slide_ids]
    job.check_tiled(st.mag)
    st.validate()
    out_dir = job.features_dir(st.mag, st.encoder)
    remove_orphans(out_dir, claim_timeout, recursive=False)
    if backend == "ray":
        from wsimil.features.distributed import run_extraction_ray

        rows = run_extraction_ray(job, st, slides, overwrite, process_slide, ray_address, claim_timeout=claim_timeout)
    elif backend == "local":
        apply_threads(st.threads, "encode", workers=st.workers)
        encoder = encoder or create_encoder(st.encoder, st.weights, st.seed)
        encoder.model.to(st.device)
        rows = []
        with make_progress() as progress:
            task = progress.add_task(f"Encoding {mag_name(st.mag)} with {st.encoder}", total=len(slides), info="")
            for slide in slides:
                rows.append(process_slide(encoder, job, st, slide, overwrite, claim_timeout))
                progress.update(task, advance=1, info=f"{slide['slide_id']}: {rows[-1]['status']}")
    else:
        raise WsimilError(f"unknown backend {backend!r}; choose local or ray")
    table = pd.DataFrame(rows)
    owned = [r["slide_id"] for r in rows if r["status"] != "claimed"]
    merge_rows(out_dir / "status.csv", rows, [s["slide_id"] for s in listed], owned)
    return table
