"""Synthetic bags for fast, checkable method tests.

- Digit bags (Ilse et al. 2018, with scikit-learn's bundled 8×8 digits, so nothing is downloaded): a bag is
  positive iff it holds the target digit; instance labels are known.
- MIL algorithmic unit tests (after Raff & Holt, NeurIPS 2023): bags where a model that respects the standard MIL
  assumption (a bag is positive iff it holds a positive instance) must succeed, and one that learns from
  negative-only evidence must fail.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from wsimil.features.store import write_bag
from wsimil.io import write_csv


@dataclass
class SynthBag:
    slide_id: str
    features: np.ndarray  # (N, D) float32
    instance_labels: np.ndarray  # (N,) int64
    label: int | str
    columns: dict[str, Any] = field(default_factory=dict)  # further manifest columns (fine_label, time, event, ...)
    coords: np.ndarray | None = None  # (N, 2) grid positions, when the bag has a layout


def make_digit_bags(
    n_bags: int = 100,
    mean_size: float = 10,
    std_size: float = 2,
    target: int = 9,
    pos_fraction: float = 0.5,
    seed: int = 0,
) -> list[SynthBag]:
    """Bags of 64-d digit images (pixel values / 16). Positive bags hold 1–3 images of ``target``."""
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target
    pos_pool, neg_pool = np.flatnonzero(y == target), np.flatnonzero(y != target)
    bags = []
    n_pos = int(round(n_bags * pos_fraction))
    for i in range(n_bags):
        n = max(2, int(round(rng.normal(mean_size, std_size))))
        label = int(i < n_pos)
        k = int(rng.integers(1, min(3, n - 1) + 1)) if label else 0
        idx = np.concatenate([rng.choice(pos_pool, k), rng.choice(neg_pool, n - k)])
        idx = rng.permutation(idx)
        bags.append(SynthBag(f"digits_{i:04d}", X[idx], (y[idx] == target).astype(np.int64), label))
    order = rng.permutation(n_bags)
    return [bags[i] for i in order]


def write_bags(bags: list[SynthBag], out: str | Path, encoder: str = "synthetic") -> Path:
    """Write ``out/features/{slide_id}.h5`` (with ``instance_labels``) and ``out/manifest.csv``."""
    out = Path(out)
    for b in bags:
        write_bag(out / "features" / f"{b.slide_id}.h5", b.features, b.coords, instance_labels=b.instance_labels,
                  encoder=encoder)  # fmt: skip
    mpath = out / "manifest.csv"
    rows = [{"case_id": b.slide_id, "slide_id": b.slide_id, "label": b.label, **b.columns} for b in bags]
    write_csv(mpath, pd.DataFrame(rows))
    return mpath


def _digit_pool() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target


#: fine class → key digit and coarse parent of the hierarchical digit bags: each coarse class holds two digits that
#: are easily confused (3/8, 4/9), so the fine distinction within a coarse class is the subtle one
HIERARCHICAL_DIGITS = {"d3": (3, "c38"), "d8": (8, "c38"), "d4": (4, "c49"), "d9": (9, "c49")}
BACKGROUND_DIGITS = (0, 1, 2, 5, 6, 7)


def make_hierarchical_digit_bags(
    n_bags: int = 80, mean_size: float = 10, std_size: float = 2, seed: int = 0
) -> list[SynthBag]:
    """Bags for hierarchical (fine/coarse) classification: every bag holds 1–3 images of its fine class's key digit
    (:data:`HIERARCHICAL_DIGITS`: 3 and 8 under ``c38``, 4 and 9 under ``c49``) among background digits 0, 1, 2, 5,
    6, 7. Fine classes are balanced (``n_bags // 4`` each, the remainder spread from the first); ``label`` and the
    ``fine_label`` column hold the fine class, ``coarse_label`` its parent; instance label 1 marks key digits."""
    X, y = _digit_pool()
    rng = np.random.default_rng([seed, 1])
    bg_pool = np.flatnonzero(np.isin(y, BACKGROUND_DIGITS))
    names = list(HIERARCHICAL_DIGITS)
    fine = [names[i % len(names)] for i in range(n_bags)]
    bags = []
    for i, name in enumerate(fine):
        digit, coarse = HIERARCHICAL_DIGITS[name]
        n = max(2, int(round(rng.normal(mean_size, std_size))))
        k = int(rng.integers(1, min(3, n - 1) + 1))
        idx = rng.permutation(np.concatenate([rng.choice(np.flatnonzero(y == digit), k), rng.choice(bg_pool, n - k)]))
        inst = (y[idx] == digit).astype(np.int64)
        bags.append(SynthBag(f"hdigits_{i:04d}", X[idx], inst, name, {"fine_label": name, "coarse_label": coarse}))
    return [bags[i] for i in rng.permutation(n_bags)]


def survival_times(
    risk: np.ndarray,
    rng: np.random.Generator,
    base_hazard: float = 1 / 60,
    log_hazard_ratio: float = 1.0,
    censor_low: float = 12.0,
    censor_high: float = 96.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Right-censored survival ``(time, event)`` from a proportional-hazards model: event times are exponential with
    hazard ``λ = base_hazard · exp(log_hazard_ratio · risk)`` (so the hazard rises with ``risk``), censoring times
    uniform in ``[censor_low, censor_high]``; ``time = min(T, C)``, ``event = T ≤ C`` (units: months)."""
    risk = np.asarray(risk, dtype=np.float64)
    hazard = base_hazard * np.exp(log_hazard_ratio * risk)
    t_event = rng.exponential(1.0 / hazard)
    t_censor = rng.uniform(censor_low, censor_high, size=risk.shape)
    return np.round(np.minimum(t_event, t_censor), 3), (t_event <= t_censor).astype(np.int64)


def make_survival_digit_bags(
    n_bags: int = 80,
    mean_size: float = 12,
    std_size: float = 2,
    target: int = 9,
    max_burden: int = 4,
    log_hazard_ratio: float = 0.8,
    seed: int = 0,
) -> list[SynthBag]:
    """Bags for survival: a bag's tumour burden is its number of ``target`` images, uniform in ``0…max_burden``; its
    ``time,event`` come from :func:`survival_times` with risk = burden (hazard ×``exp(log_hazard_ratio)`` per
    image), with censoring. Columns: ``time``, ``event``, ``burden``; ``label`` = 1 if the bag holds the target."""
    X, y = _digit_pool()
    rng = np.random.default_rng([seed, 2])
    pos_pool, neg_pool = np.flatnonzero(y == target), np.flatnonzero(y != target)
    burden = np.arange(n_bags) % (max_burden + 1)
    time, event = survival_times(burden, rng, log_hazard_ratio=log_hazard_ratio)
    bags = []
    for i, k in enumerate(burden):
        n = max(int(k) + 1, int(round(rng.normal(mean_size, std_size))))
        idx = rng.permutation(np.concatenate([rng.choice(pos_pool, k), rng.choice(neg_pool, n - k)]).astype(int))
        cols = {"time": float(time[i]), "event": int(event[i]), "burden": int(k)}
        bags.append(SynthBag(f"sdigits_{i:04d}", X[idx], (y[idx] == target).astype(np.int64), int(k > 0), cols))
    return [bags[i] for i in rng.permutation(n_bags)]


UNIT_TESTS = ("presence", "poison")
POS_SHIFT = 5.0


def unit_test_concepts(dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """The fixed concept means: positive = a clear shift (POS_SHIFT) in dimension 0; poison = a strong shift (norm 6)
    spread over the other dimensions."""
    mu_pos = np.zeros(dim)
    mu_pos[0] = POS_SHIFT
    mu_poison = np.random.default_rng(12345).normal(size=dim)
    mu_poison[0] = 0
    mu_poison *= 6.0 / np.linalg.norm(mu_poison)
    return mu_pos, mu_poison


def make_unit_test_bags(
    test: str, split: str, n_bags: int = 200, dim: int = 16, bag_size: int = 12, seed: int = 0
) -> list[SynthBag]:
    """Bags for one MIL algorithmic unit test.

    Background instances are ``N(0, I)``. A positive bag holds 1–2 instances of a positive concept
    ``N(μ_+, I)`` (instance label 1).

    - ``presence``: nothing else; train and test alike. Every sensible model should pass.
    - ``poison``: in training, every negative bag also holds 1–2 instances of a strong "poison" concept
      ``N(μ_p, I)``, so "poison present ⇒ negative" is an easier rule than "positive concept present ⇒ positive".
      That rule violates the standard MIL assumption (absence of evidence cannot make a bag positive). At test,
      the poison moves to the positive bags: a model that learned it scores below chance; one that respects the
      assumption still separates the classes.
    """
    if test not in UNIT_TESTS:
        raise ValueError(f"unknown unit test {test!r}; choose from {UNIT_TESTS}")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, UNIT_TESTS.index(test)])
    mu_pos, mu_poison = unit_test_concepts(dim)
    bags = []
    for i in range(n_bags):
        label = i % 2
        x = rng.normal(size=(bag_size, dim))
        inst = np.zeros(bag_size, dtype=np.int64)
        if label:
            k = int(rng.integers(1, 3))
            x[:k] += mu_pos
            inst[:k] = 1
        if test == "poison" and label == (0 if split == "train" else 1):
            k = int(rng.integers(1, 3))
            x[bag_size - k :] += mu_poison
        perm = rng.permutation(bag_size)
        bags.append(SynthBag(f"{test}_{split}_{i:04d}", x[perm].astype(np.float32), inst[perm], label))
    return bags
