"""HMIL: hierarchical MIL for fine-grained labels (Jin et al., IEEE TMI 2025; SPEC §4).

Every slide has a fine class ``y_f`` (the manifest's ``fine_label`` unless ``--label-column`` says otherwise) whose
coarse parent ``y_c`` comes from the manifest's ``coarse_label`` column or from a YAML file (option
``hierarchy: PATH``); every fine class must have exactly one parent. ``M ∈ {0,1}^{K_c×K_f}`` maps fine classes to
their parents. The aggregator is :class:`wsimil.models.hmil.HMILNet`. Per mini-batch of bags:

- ``L_ce^f = CE(z_f, y_f)``, ``L_ce^c = CE(z_c, y_c)``;
- bag alignment ``L_ba = NLL(log(M·softmax(z_f)), y_c)`` **[SPEC decision: the official code feeds probabilities
  to CE as if they were logits]**;
- attention matching ``L_ia = mean_i (1 − cos(A_c[:, i], (M·A_f)[:, i]))`` over the real instances of each bag, then
  over bags, with ``A`` the softmax attention **[SPEC decision: the official code computes it but never adds it]**;
- supervised contrastive ``L_con`` on the ℓ2-normalised fine class-wise bag features: as in the official code the
  ``K_f`` rows of a bag are its "views", all labelled with the bag's fine class, and every row of every bag in the
  mini-batch is an anchor (SupCon "all" mode), temperature 0.1 (option: the official cosine schedule between
  ``temperature`` and ``temperature_max``, scaled by ``τ/temperature`` as the official SupCon's base temperature
  does). Decision: the mean over anchors is not further divided by the batch size (the official code does, which
  ties the term's weight to the batch size);
- total **[SPEC decision]** ``L = L_ce^f + β(e)(L_ce^c + λ_ia L_ia + λ_ba L_ba) + (1 − β(e)) L_con`` with
  ``β(e) = 1 − (e/E)²`` (option ``linear``: ``1 − e/E``), ``e`` the 0-based epoch and ``E = cfg.epochs``.

Optimisation follows SPEC/official where the trainer leaves room: Adam, lr 1e-4, no weight decay, mini-batches of
16 bags (``config_defaults``; SupCon needs several bags per step; the official uses 64) and ReduceLROnPlateau on the
epoch's training loss (factor 0.1, patience 5, as the official code; ``plateau_patience: 0`` turns it off, and it is
off whenever ``scheduler`` is not ``none``).

The run's ``results.json`` carries ``metrics`` (= ``metrics_fine``), ``metrics_coarse`` (coarse head) and
``metrics_coarse_from_fine`` (the fine prediction summed onto the hierarchy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor

from wsimil.errors import WsimilError, problems_error
from wsimil.methods.base import Batch, FoldContext, TrainingMethod, register_method
from wsimil.models.hmil import HierarchicalOutput, HMILNet, mapping_matrix, marginal_log_probs
from wsimil.models.layers import masked_softmax

if TYPE_CHECKING:
    from wsimil.data.manifest import Manifest

BETA_SCHEDULES = ("quadratic", "linear")
TEMPERATURE_SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------------------------------------------- hierarchy
@dataclass(frozen=True)
class Hierarchy:
    """Fine classes (model order), coarse classes, and ``parents[f]`` = index of fine class ``f``'s coarse class."""

    fine: list[str]
    coarse: list[str]
    parents: list[int]

    def matrix(self) -> Tensor:
        return mapping_matrix(self.parents, len(self.coarse))

    def coarse_labels(self, fine_labels: np.ndarray) -> np.ndarray:
        return np.asarray(self.parents, dtype=np.int64)[np.asarray(fine_labels, dtype=np.int64)]

    def state(self) -> dict:
        return {"fine": list(self.fine), "coarse": list(self.coarse), "parents": list(self.parents)}


def _sort_names(values) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _rows(idx) -> str:
    shown = [str(int(i) + 2) for i in idx[:10]]
    return ", ".join(shown) + (f" … ({len(idx)} rows)" if len(idx) > 10 else "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe YAML loader that rejects a key repeated within one mapping (PyYAML would keep the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise WsimilError(f"key {key!r} appears twice (line {key_node.start_mark.line + 1})")
        seen[key] = loader.construct_object(value_node, deep=deep)
    return seen


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_hierarchy_file(path: str | Path) -> dict[str, str]:
    """Read a fine → coarse mapping from YAML, written either by parent (``benign: [N, PB, UDH]``) or by child
    (``N: benign``). Raises with the offending class when a fine class is given two parents."""
    path = Path(path)
    if not path.is_file():
        raise WsimilError(f"hierarchy file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except WsimilError as e:
        raise WsimilError(f"hierarchy file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise WsimilError(f"hierarchy file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise WsimilError(
            f"hierarchy file {path} must map coarse classes to lists of fine classes (benign: [N, PB, UDH]) "
            "or fine classes to their coarse class (N: benign)"
        )
    lists = [isinstance(v, list) for v in data.values()]
    if any(lists) and not all(lists):
        raise WsimilError(f"hierarchy file {path} mixes 'coarse: [fine, ...]' and 'fine: coarse' entries; use one form")
    if not any(lists):
        bad = [k for k, v in data.items() if isinstance(v, dict) or v is None]
        if bad:
            raise WsimilError(f"hierarchy file {path}: fine class(es) {', '.join(map(str, bad))} have no coarse class")
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    problems = []
    for coarse, fines in data.items():
        for f in fines:
            f = str(f)
            if f in out and out[f] != str(coarse):
                problems.append(f"fine class {f!r} is listed under two coarse classes: {out[f]!r} and {str(coarse)!r}")
            out[f] = str(coarse)
    if problems:
        raise problems_error(f"hierarchy file {path} gives a fine class more than one parent", problems)
    return out


def build_hierarchy(manifest: Manifest, hierarchy_file: str | Path | None = None, column: str = "coarse_label"):
    """The label hierarchy of ``manifest`` (fine classes = ``manifest.classes``).

    Parents come from ``hierarchy_file`` when given (and, if the manifest also has ``column``, every row must agree
    with it), else from the manifest's ``column``. Raises :class:`WsimilError` naming each fine class with no or
    several parents, and the rows involved."""
    df, fine = manifest.df, list(manifest.classes)
    where = f"manifest {manifest.path}" if manifest.path else "the manifest"
    y = manifest.labels
    has_col = column in df.columns
    col = df[column].astype(str).str.strip().to_numpy() if has_col else None
    problems: list[str] = []
    if has_col and hierarchy_file is None:  # with a file, the column is only checked where it is filled in
        empty = np.flatnonzero((col == "") | (np.char.lower(col.astype(str)) == "nan"))
        if len(empty):
            sids = ", ".join(repr(s) for s in df["slide_id"].iloc[empty[:5]])
            problems.append(f"{column} is empty for {len(empty)} slide(s) (rows {_rows(empty)}: {sids})")

    if hierarchy_file is not None:
        mapping = read_hierarchy_file(hierarchy_file)
        for k, name in enumerate(fine):
            if name not in mapping:
                rows = np.flatnonzero(y == k)
                problems.append(f"fine class {name!r} (rows {_rows(rows) or 'none'}) has no parent in {hierarchy_file}")
        if has_col:
            for k, name in enumerate(fine):
                if name in mapping:
                    rows = np.flatnonzero((y == k) & (col != mapping[name]) & (col != ""))
                    if len(rows):
                        problems.append(
                            f"fine class {name!r}: {column} {sorted(set(col[rows]))} in rows {_rows(rows)} disagrees "
                            f"with {mapping[name]!r} in {hierarchy_file}"
                        )
        if problems:
            raise problems_error(f"the label hierarchy of {where} is invalid", problems)
        parent_names = [mapping[name] for name in fine]
    else:
        if not has_col:
            raise WsimilError(
                f"method hmil needs each fine class's coarse parent: {where} has no column {column!r} "
                f"(found {', '.join(c for c in df.columns if c != 'y')}); add it, or pass a YAML mapping with "
                "--method-opt hierarchy=PATH"
            )
        parent_names = []
        for k, name in enumerate(fine):
            rows = np.flatnonzero((y == k) & (col != ""))
            values = _sort_names(set(col[rows]))
            if not values:
                problems.append(f"fine class {name!r} has no slide with a {column}, so no parent")
            elif len(values) > 1:
                detail = "; ".join(f"{v!r} in rows {_rows(rows[col[rows] == v])}" for v in values)
                problems.append(f"fine class {name!r} has {len(values)} parents in {column}: {detail}")
            else:
                parent_names.append(values[0])
        if problems:
            raise problems_error(
                f"the label hierarchy of {where} is invalid (every fine class needs exactly one coarse parent)",
                problems,
            )
    coarse = _sort_names(set(parent_names))
    if len(coarse) < 2:
        raise WsimilError(f"the label hierarchy of {where} has a single coarse class {coarse}; HMIL needs at least two")
    index = {c: i for i, c in enumerate(coarse)}
    return Hierarchy(fine, coarse, [index[p] for p in parent_names])


# ------------------------------------------------------------------------------------------------------- losses
def bag_alignment_loss(fine_logits: Tensor, y_coarse: Tensor, m: Tensor) -> Tensor:
    """``L_ba = NLL(log(M · softmax(z_f)), y_c)``: ``fine_logits (B, K_f)``, ``y_coarse (B,)``, ``m (K_c, K_f)``."""
    return F.nll_loss(marginal_log_probs(fine_logits, m), y_coarse)


def attention_matching_loss(coarse_att: Tensor, fine_att: Tensor, m: Tensor, mask: Tensor) -> Tensor:
    """``L_ia = mean_b mean_{i real} (1 − cos(A_c[b, :, i], (M · A_f[b])[:, i]))``.

    ``coarse_att (B, K_c, N)`` and ``fine_att (B, K_f, N)`` are softmax attention weights, ``m (K_c, K_f)``, ``mask
    (B, N)`` True for real instances (padding is left out of the mean)."""
    mapped = torch.einsum("cf,bfn->bcn", m.to(fine_att.dtype), fine_att)
    cos = F.cosine_similarity(coarse_att, mapped, dim=1, eps=1e-8)  # (B, N)
    w = mask.to(cos.dtype)
    return (((1.0 - cos) * w).sum(1) / w.sum(1).clamp_min(1.0)).mean()


def supcon_loss(features: Tensor, labels: Tensor, temperature: float = 0.1, base_temperature: float = 0.1) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, "all" anchors) on ``features (B, V, d)`` (ℓ2-normalised; ``V``
    views per sample, all labelled ``labels[b]``).

    With ``z`` the ``B·V`` rows, ``s_ab = z_a·z_b / τ`` and ``P(a)`` the other rows with ``a``'s label::

        L = mean_{a: P(a) ≠ ∅} − (τ/τ_base) · mean_{p ∈ P(a)} [s_ap − log Σ_{k ≠ a} exp(s_ak)]

    Zero when no row has a positive."""
    b, v, d = features.shape
    z = features.transpose(0, 1).reshape(v * b, d)
    lab = labels.repeat(v)
    eye = torch.eye(v * b, dtype=torch.bool, device=z.device)
    sim = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (lab.unsqueeze(0) == lab.unsqueeze(1)) & ~eye
    n_pos = pos.sum(1)
    mean_pos = log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
    valid = n_pos > 0
    if not bool(valid.any()):
        return features.sum() * 0.0
    return -(temperature / base_temperature) * mean_pos[valid].mean()


def beta_schedule(epoch: int, epochs: int, kind: str = "quadratic") -> float:
    """Curriculum weight ``β(e) = 1 − (e/E)²`` (``linear``: ``1 − e/E``) for 0-based epoch ``e`` of ``E``."""
    t = min(max(epoch / max(epochs, 1), 0.0), 1.0)
    if kind == "quadratic":
        return 1.0 - t * t
    if kind == "linear":
        return 1.0 - t
    raise WsimilError(f"method hmil: beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {kind!r}")


def contrast_temperature(epoch: int, epochs: int, kind: str = "constant", low: float = 0.1, high: float = 1.0) -> float:
    """SupCon temperature: ``low`` (``constant``), or the official cosine schedule
    ``τ(e) = low + (high − low)(1 + cos(2π e/E))/2`` (``high`` at the start and end, ``low`` half way)."""
    if kind == "constant":
        return low
    if kind == "cosine":
        return low + (high - low) * (1.0 + math.cos(2.0 * math.pi * epoch / max(epochs, 1))) / 2.0
    raise WsimilError(
        f"method hmil: temperature_schedule must be one of {', '.join(TEMPERATURE_SCHEDULES)}, got {kind!r}"
    )


# ------------------------------------------------------------------------------------------------------- method
@register_method("hmil")
class HMIL(TrainingMethod):
    """HMIL: two-level class-wise attention, bag/attention alignment, SupCon, curriculum weights (fine_label)."""

    #: ``results.json`` also reports ``metrics`` (the fine level) as ``metrics_fine``
    primary_head = "fine"

    def __init__(self, cfg):
        super().__init__(cfg)
        o = self.opts
        if o["beta_schedule"] not in BETA_SCHEDULES:
            raise WsimilError(
                f"method hmil: beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {o['beta_schedule']!r}"
            )
        if o["temperature_schedule"] not in TEMPERATURE_SCHEDULES:
            raise WsimilError(
                f"method hmil: temperature_schedule must be one of {', '.join(TEMPERATURE_SCHEDULES)}, "
                f"got {o['temperature_schedule']!r}"
            )
        if not (float(o["temperature"]) > 0 and float(o["temperature_max"]) > 0):
            raise WsimilError("method hmil: temperature and temperature_max must be positive")
        if not 0 < float(o["plateau_factor"]) < 1 or int(o["plateau_patience"]) < 0:
            raise WsimilError("method hmil: plateau_factor must be in (0, 1) and plateau_patience at least 0")
        self.hierarchy: Hierarchy | None = None
        self._plateau: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.ReduceLROnPlateau] | None = None

    # ------------------------------------------------------------------ run-level
    def prepare(self, manifest: Manifest) -> None:
        self.hierarchy = build_hierarchy(manifest, self.opts["hierarchy"])

    def state(self) -> dict:
        return self.hierarchy.state() if self.hierarchy is not None else {}

    def restore(self, state: dict) -> None:
        if state:
            self.hierarchy = Hierarchy(list(state["fine"]), list(state["coarse"]), [int(p) for p in state["parents"]])

    def build(self, in_dim: int, n_classes: int) -> HMILNet:
        if self.cfg.model not in ("abmil", "gated_abmil"):
            raise WsimilError(
                "method hmil trains its own two-level gated-attention aggregator (wsimil.models.hmil); leave --model "
                f"at abmil (or gated_abmil), got {self.cfg.model!r}"
            )
        h = self.hierarchy
        if h is None:
            raise WsimilError("method hmil has no label hierarchy: call prepare(manifest) or restore(state) first")
        if len(h.fine) != n_classes:
            raise WsimilError(f"method hmil: the hierarchy has {len(h.fine)} fine classes but the model {n_classes}")
        try:
            return HMILNet(in_dim, n_classes, h.parents, **self.cfg.model_kwargs)
        except TypeError as e:
            raise WsimilError(
                f"bad model options for hmil: {e}; it takes mlp_dim, coarse_dim, fine_dim, coarse_attn_dim, "
                "fine_attn_dim, dropout, attn_dropout, init"
            ) from e

    # ------------------------------------------------------------------ training
    def hierarchical_losses(self, h: HierarchicalOutput, batch: Batch, m: Tensor, epoch: int) -> dict[str, Tensor]:
        """Every HMIL term of one mini-batch (see the module docstring); ``loss`` is the weighted total."""
        o, epochs = self.opts, self.cfg.epochs
        y_f = batch.y
        y_c = m.argmax(0)[y_f]
        mask = batch.mask
        beta = beta_schedule(epoch, epochs, o["beta_schedule"])
        tau = contrast_temperature(
            epoch, epochs, o["temperature_schedule"], float(o["temperature"]), float(o["temperature_max"])
        )
        ce_fine = F.cross_entropy(h.fine_logits, y_f)
        ce_coarse = F.cross_entropy(h.coarse_logits, y_c)
        bag_align = bag_alignment_loss(h.fine_logits, y_c, m)
        a_c = masked_softmax(h.coarse_attention, mask.unsqueeze(1))
        a_f = masked_softmax(h.fine_attention, mask.unsqueeze(1))
        att_match = attention_matching_loss(a_c, a_f, m, mask)
        con = supcon_loss(F.normalize(h.fine_features, dim=-1), y_f, tau, float(o["temperature"]))
        total = ce_fine + beta * (ce_coarse + o["lambda_ia"] * att_match + o["lambda_ba"] * bag_align)
        total = total + (1.0 - beta) * con
        terms = {
            "ce_fine": ce_fine,
            "ce_coarse": ce_coarse,
            "bag_align": bag_align,
            "attention_match": att_match,
            "contrastive": con,
        }
        return {
            "loss": total,
            **{k: v.detach() for k, v in terms.items()},
            "beta": torch.tensor(beta),
            "temperature": torch.tensor(tau),
        }

    def train_step(self, model: HMILNet, batch: Batch, epoch: int) -> dict[str, Tensor]:
        return self.hierarchical_losses(model.forward_hierarchy(batch.x, batch.mask), batch, model.mapping, epoch)

    def fit_epoch(
        self, model: HMILNet, opt: torch.optim.Optimizer, ctx: FoldContext, epoch: int, gen: torch.Generator
    ) -> dict[str, float]:
        """The default epoch, then a ReduceLROnPlateau step on the epoch's mean training loss (official)."""
        terms = super().fit_epoch(model, opt, ctx, epoch, gen)
        patience = int(self.opts["plateau_patience"])
        if patience > 0 and self.cfg.scheduler == "none":
            if self._plateau is None or self._plateau[0] is not opt:  # a new fold has a new optimiser
                sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                    opt, mode="min", factor=float(self.opts["plateau_factor"]), patience=patience
                )
                self._plateau = (opt, sched)
            self._plateau[1].step(terms["loss"])
        return terms

    # ------------------------------------------------------------------ evaluation
    def head_labels(
        self, head: str, slide_ids: list[str], labels: np.ndarray, classes: list[str]
    ) -> tuple[np.ndarray, list[str]]:
        """Coarse heads (``coarse``, ``coarse_from_fine``) are scored against the parents of the fine labels."""
        if head in ("coarse", "coarse_from_fine") and self.hierarchy is not None:
            return self.hierarchy.coarse_labels(labels), list(self.hierarchy.coarse)
        return super().head_labels(head, slide_ids, labels, classes)
