"""Discrete-time survival: quantile time bins, the negative log-likelihood over per-bin hazards, risk scores and
Harrell's concordance index with a bootstrap CI.

A model with ``C`` outputs predicts the hazard of each time bin, ``h_k = sigmoid(logit_k)``; the survival
function is ``S_k = Π_{j≤k} (1 − h_j)``. For a patient whose time falls in bin ``y``:

- event observed: ``−log S_{y−1} − log h_y`` (survived the earlier bins, then the event in bin y);
- censored: ``−log S_y`` (survived at least through bin y).

(Zadeh & Schmid 2021, as used by MCAT/Patho-Bench and the MHIM survival code.) Risk = ``−Σ_k S_k``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from wsimil.errors import WsimilError


def nll_survival_loss(logits: Tensor, y: Tensor, event: Tensor, alpha: float = 0.0) -> Tensor:
    """Mean discrete-time NLL; ``logits (B, K)`` hazards' logits, ``y (B,)`` bin index, ``event (B,)`` 1/0.

    ``alpha`` up-weights the uncensored term (``(1 − α)·NLL + α·uncensored NLL``, MCAT's option); 0 = plain NLL.
    """
    log_h = F.logsigmoid(logits)  # log h_k
    log_1mh = F.logsigmoid(-logits)  # log (1 − h_k)
    log_s = torch.cumsum(log_1mh, dim=1)  # log S_k
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], dim=1)  # log S_{k-1}, S_{-1} = 1
    y = y.long().unsqueeze(1)
    e = event.float()
    uncensored = -(log_s_prev.gather(1, y) + log_h.gather(1, y)).squeeze(1) * e
    censored = -log_s.gather(1, y).squeeze(1) * (1 - e)
    nll = uncensored + censored
    return ((1 - alpha) * nll + alpha * uncensored).mean()


def risk_from_logits(logits: np.ndarray) -> np.ndarray:
    """Risk ``−Σ_k S_k`` (higher = earlier event) from hazard logits ``(n, K)``."""
    z = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    return (-torch.cumprod(torch.sigmoid(-z), dim=1).sum(1)).numpy()


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: over comparable pairs (i had the event and ``t_i < t_j``), the share where ``risk_i > risk_j``;
    risk ties count one half. ``NaN`` when no pair is comparable."""
    t, e, r = (np.asarray(a, dtype=np.float64) for a in (time, event, risk))
    comparable = (e[:, None] == 1) & (t[:, None] < t[None, :])
    n = comparable.sum()
    if n == 0:
        return float("nan")
    wins = (r[:, None] > r[None, :]) & comparable
    ties = (r[:, None] == r[None, :]) & comparable
    return float((wins.sum() + 0.5 * ties.sum()) / n)


def bootstrap_cindex(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Percentile 95% CI of the c-index over patient resamples (resamples without a comparable pair skipped)."""
    rng = np.random.default_rng(seed)
    n = len(time)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, n, n)
        c = concordance_index(time[i], event[i], risk[i])
        if not np.isnan(c):
            vals.append(c)
    if not vals:
        return {"ci_low": float("nan"), "ci_high": float("nan")}
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return {"ci_low": float(lo), "ci_high": float(hi)}


def time_bins(time: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin edges from the quantiles of the *uncensored* times, the outer edges widened to cover every time."""
    t_ev = time[event == 1]
    if len(np.unique(t_ev)) < n_bins:
        raise WsimilError(
            f"survival needs at least {n_bins} distinct event times for {n_bins} quantile bins; "
            f"found {len(np.unique(t_ev))}. Pass fewer bins (survival_bins)"
        )
    edges = np.quantile(t_ev, np.linspace(0, 1, n_bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    return edges


def assign_bins(time: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin index of each time (``edges`` from :func:`time_bins`)."""
    return np.clip(np.searchsorted(edges, time, side="right") - 1, 0, len(edges) - 2)


def add_survival_columns(df: pd.DataFrame, n_bins: int, path: Path | str = "manifest") -> tuple[pd.DataFrame, list]:
    """Validate ``time`` and ``event`` columns of a manifest frame and add the bin index ``y``; returns the frame
    (time/event as numbers) and the class names ``bin0…``."""
    missing = [c for c in ("time", "event") if c not in df.columns]
    if missing:
        raise WsimilError(f"{path}: survival needs columns time,event; missing {', '.join(missing)}")
    problems = []
    t = pd.to_numeric(df["time"], errors="coerce")
    e = pd.to_numeric(df["event"], errors="coerce")
    for i, (sid, tv, ev) in enumerate(zip(df["slide_id"], t, e, strict=True)):
        if not np.isfinite(tv) or tv < 0:
            problems.append(f"row {i + 2} ({sid}): time {df['time'].iloc[i]!r} is not a number ≥ 0")
        if ev not in (0, 1):
            problems.append(f"row {i + 2} ({sid}): event {df['event'].iloc[i]!r} must be 0 (censored) or 1")
    if problems:
        from wsimil.errors import problems_error

        raise problems_error(f"{path}: bad survival columns", problems)
    df = df.copy()
    df["time"], df["event"] = t.to_numpy(float), e.to_numpy(int)
    edges = time_bins(df["time"].to_numpy(), df["event"].to_numpy(), n_bins)
    df["y"] = assign_bins(df["time"].to_numpy(), edges)
    return df, [f"bin{k}" for k in range(n_bins)]
