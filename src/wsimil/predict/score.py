"""The one ensemble scorer of every bundle and method, and the per-slide scores file it fills.

:func:`score_bag` scores one bag with every member ``(model, standardizer)`` — on one shared feature matrix, or on
each member's own (members that carry their own encoder, e.g. LRMIL's folds) — and averages the members' class
probabilities (survival: risks), extra heads and per-patch maps.

Per-patch maps: for attention models the softmax attention weights (over the bag's patches) of each member averaged
over members — one map, or one per class when the model has one attention row per class (CLAM-MB, DSMIL, HMIL:
``attention:<class>``; HMIL's ``attention_maps`` give both levels, ``fine:<class>`` and ``coarse:<class>``); for
instance models (``instance_score == "instance"``, e.g. WENO, max pooling) the instance class probabilities
(``instance:<class>``; binary: the positive class only). The model's preferred kind comes first. ABMIL models add
patch evidence (``evidence:<class>``, binary: the positive class): the bag classifier applied to each patch alone,
``softmax(W h_i + b)``, whose logits the bag logit is the attention-weighted mean of.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from wsimil.io import atomic_path


@dataclass(frozen=True)
class Heads:
    """What the scorer needs of a bundle (a :class:`wsimil.predict.bundle.Bundle` has the same attributes): class
    names, the class names of extra heads, and the task."""

    classes: list[str] = field(default_factory=list)
    head_classes: dict[str, list[str]] = field(default_factory=dict)
    task: str = "classification"


@dataclass
class SlideScores:
    """One slide's ensemble prediction and per-patch maps."""

    probs: np.ndarray  # (C,) mean of the members' class probabilities
    member_probs: np.ndarray  # (F, C)
    maps: dict[str, np.ndarray]  # name → (N,) per-patch score, members averaged
    kind: str  # "attention" or "instance": what the first map is
    extra_probs: dict[str, np.ndarray] = field(default_factory=dict)  # head → (C_h,)
    risk: float | None = None  # survival: mean of the members' risks −Σ_k S_k (hazard logits)


def _softmax_n(e: torch.Tensor) -> torch.Tensor:
    """Softmax over the last (instance) axis in float32; ``-inf`` (padding) gets weight 0."""
    return torch.softmax(e.float(), dim=-1)


def _rows(t: torch.Tensor, names: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """Per-row maps of ``t (K, N)`` named ``prefix:<row name>`` (a single row is just ``prefix``)."""
    if t.shape[0] == 1:
        return {prefix: t[0]}
    labels = names if len(names) == t.shape[0] else [str(i) for i in range(t.shape[0])]
    return {f"{prefix}:{n}": t[i] for i, n in enumerate(labels)}


@torch.no_grad()
def member_maps(
    model, x: torch.Tensor, out, classes: list[str], head_classes: dict[str, list[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], str]:
    """Per-patch maps of one model for one bag ``x (1, N, D)`` with output ``out``: ``(attention maps, instance
    maps, preferred kind)``. Attention rows are softmax weights; a model whose heads are not one per class (TransMIL's
    8 heads) gets the mean over heads."""
    att: dict[str, torch.Tensor] = {}
    if hasattr(model, "attention_maps"):
        for level, e in model.attention_maps(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)).items():
            e = e[0] if e.dim() == 3 else e
            names = classes if e.shape[0] == len(classes) and level == "fine" else head_classes.get(level, [])
            att.update(_rows(_softmax_n(e), names, level))
    elif out.attention_logits is not None:
        e = out.attention_logits[0]
        w = _softmax_n(e if e.dim() == 2 else e[None])
        if w.shape[0] != len(classes):
            w = w.mean(0, keepdim=True)
        att = _rows(w, classes, "attention")
    inst: dict[str, torch.Tensor] = {}
    if out.instance_logits is not None:
        p = torch.softmax(out.instance_logits[0].float(), dim=-1).T  # (C, N)
        inst = {f"instance:{classes[1]}": p[1]} if len(classes) == 2 else _rows(p, classes, "instance")
    if hasattr(model, "patch_logits"):  # ABMIL: each patch's class probability under the bag classifier
        p = torch.softmax(model.patch_logits(x)[0].float(), dim=-1).T  # (C, N)
        inst.update({f"evidence:{classes[1]}": p[1]} if len(classes) == 2 else _rows(p, classes, "evidence"))
    prefer = getattr(model, "instance_score", "attention")
    if prefer == "instance" and inst:
        return att, inst, "instance"
    return att, inst, "attention" if att else "instance"


Features = np.ndarray | torch.Tensor


@torch.no_grad()
def score_bag(
    members: list[tuple],
    features: Features | Sequence[Features],
    bundle: Heads,
    device: str = "cpu",
    maps: bool = True,
) -> SlideScores:
    """Score one bag with every member ``(model, standardizer)``; average probabilities and maps. ``features``:
    the bag ``(N, D)`` every member reads, or one bag per member (the same N patches in the same order, encoded by
    each member's own encoder). ``bundle``: class names and task (a bundle, or :class:`Heads`). Without ``maps``
    only the probabilities are computed (``maps`` is then empty)."""
    per_member = isinstance(features, list | tuple)
    if per_member and len(features) != len(members):
        raise ValueError(f"{len(features)} feature bags for {len(members)} members")
    shared = None if per_member else _tensor(features, device)
    from wsimil.evaluation.tasks import get_task

    task = get_task(bundle.task)
    probs, risks, extra, maps_sum, kind = [], [], {}, {}, "attention"
    order: list[str] = []
    for i, (model, std) in enumerate(members):
        model.eval()
        x0 = _tensor(features[i], device) if per_member else shared
        x = std(x0) if std is not None else x0
        out = model(x, torch.ones(x.shape[:2], dtype=torch.bool, device=device))
        probs.append(torch.softmax(out.logits.float(), -1)[0].cpu().numpy())
        risk = task.risk(out.logits.float().cpu().numpy())
        if risk is not None:
            risks.append(float(risk[0]))
        for head, z in (out.extra_logits or {}).items():
            extra.setdefault(head, []).append(torch.softmax(z.float(), -1)[0].cpu().numpy())
        if not maps:
            continue
        att, inst, kind = member_maps(model, x, out, bundle.classes, bundle.head_classes)
        ordered = {**inst, **att} if kind == "instance" else {**att, **inst}
        for name, v in ordered.items():
            if name not in maps_sum:
                order.append(name)
                maps_sum[name] = np.zeros(x.shape[1], dtype=np.float64)
            maps_sum[name] += v.cpu().numpy()
    n = len(members)
    return SlideScores(
        probs=np.mean(probs, 0),
        member_probs=np.stack(probs),
        maps={k: (maps_sum[k] / n).astype(np.float32) for k in order},
        kind=kind,
        extra_probs={h: np.mean(v, 0) for h, v in extra.items()},
        risk=float(np.mean(risks)) if risks else None,
    )


def write_scores(path: Path, slide_id: str, coords: np.ndarray | None, s: SlideScores, attrs: dict) -> None:
    """``OUT/scores/{slide_id}.h5`` (layout: :mod:`wsimil.predict.pipeline`), atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        if coords is not None:
            f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        names = list(s.maps)
        n = len(coords) if coords is not None else (len(next(iter(s.maps.values()))) if s.maps else 0)
        d = f.create_dataset("maps", data=np.stack([s.maps[k] for k in names]) if names else np.zeros((0, n)))
        d.attrs["names"] = json.dumps(names)
        d.attrs["kind"] = s.kind
        f.create_dataset("probs", data=s.probs.astype(np.float32))
        f.create_dataset("member_probs", data=s.member_probs.astype(np.float32))
        f.attrs["slide_id"] = slide_id
        for k, v in attrs.items():
            if v is not None:
                f.attrs[k] = v


def read_scores(path: str | Path) -> dict:
    """Read a scores file: ``{coords, maps: {name: (N,)}, kind, probs, attrs}``."""
    with h5py.File(path, "r") as f:
        names = json.loads(f["maps"].attrs["names"])
        maps = f["maps"][()]
        return {
            "coords": f["coords"][()] if "coords" in f else None,
            "maps": {n: maps[i] for i, n in enumerate(names)},
            "kind": str(f["maps"].attrs.get("kind", "attention")),
            "probs": f["probs"][()],
            "attrs": {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()},
        }


def _tensor(features: Features, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(features, dtype=np.float32)).to(device)[None]


def prediction_row(sid: str, s: SlideScores, bundle: Heads) -> dict:
    """A slide's row of ``predictions.csv``: class probabilities and the predicted class (survival: the risk), and
    the same for each extra head."""
    row: dict = {"slide_id": sid}
    if s.risk is not None:  # survival: the bins' softmax is no class prediction (hazards are per-bin sigmoids)
        row["risk"] = s.risk
    else:
        row.update({f"prob_{c}": float(p) for c, p in zip(bundle.classes, s.probs, strict=True)})
        row["predicted"] = bundle.classes[int(np.argmax(s.probs))]
    for head, p in s.extra_probs.items():
        names = bundle.head_classes.get(head) or [str(i) for i in range(len(p))]
        row.update({f"{head}_prob_{c}": float(v) for c, v in zip(names, p, strict=True)})
        row[f"{head}_predicted"] = names[int(np.argmax(p))]
    return row
