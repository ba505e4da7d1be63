"""Slide-sized feature bags for fast, many-seed method comparisons (no slides, no encoder).

What one bag models (a patch-feature bag of one whole-slide image, as a pathology encoder would give it):

- **Size**: ``N`` patches, log-uniform in ``[min_instances, max_instances]`` (default 1,000–10,000), on a 2-D grid
  (``coords``, in patch units) filling an irregular, roughly elliptical tissue section.
- **Tissue types, spatially clustered**: ``n_types`` (8) tissue classes, each a Gaussian cluster with its own mean
  (well separated, norm ≈ ``type_spread``) and its own low-rank covariance plus unit isotropic noise; a slide's
  section is a Voronoi mosaic of 6–16 regions of random types, so neighbouring patches share a type and each
  slide has its own mix.
- **Tumour**: positive slides hold one irregular focus (the nearest patches to a centre under a random anisotropic
  metric with jitter) whose share of the bag follows the metastasis size classes: ``macro`` 5–30%, ``micro``
  0.3–5% (at least 3 patches), ``itc`` 1–2 patches; ``size_shares`` sets the mix (default 40/40/20, as
  ``wsimil synth --preset camelyon``). A tumour patch is its host tissue shifted by ``signal`` noise standard
  deviations along a tumour direction ``t``.
- **Hard negatives**: in a share ``mimic_share`` of all slides (either label), a focus of a mimic (germinal
  centre / histiocyte-like) shifted by the same ``signal`` along a direction that shares half of ``t``'s
  coordinates and is zero on the others (cosine ≈ 0.7 with ``t``): a linear read-out of ``t`` scores mimics high,
  and only the other dimensions tell them apart.
- **Per-slide batch effects**: a shift of ``batch_shift`` (noise std units) in a random 4-d "stain" subspace and a
  ±10% global scale, different in every slide.
- **Labels**: slide ``label`` (1 = tumour present); ``instance_labels`` (1 = tumour patch, mimics are 0);
  manifest columns ``size_class`` (macro/micro/itc/negative), ``tumour_share``, ``n_instances``, ``has_mimic``.
- **Hierarchical variant** (:func:`make_hierarchical_slide_bags`): every slide holds tumour of one of 2 coarse
  classes (direction ``t_c``, strong) and one of 2–3 fine subtypes within it (an extra shift of ``fine_signal``
  along a subtype direction: a subtle instance cue); ``label`` = fine class, ``coarse_label`` its parent.
- **Survival variant** (:func:`make_survival_slide_bags`): the hazard rises with the tumour share
  (``log hazard = log_hazard_ratio · share / 0.1``), with censoring (:func:`wsimil.data.synthetic.survival_times`).

What it does not model: image content, patch overlap/neighbour correlation beyond the tissue mosaic, several foci
per slide, multiple sections, label noise, or the distribution of any real encoder's features. It complements, and
never replaces, features of synthetic slides (``wsimil synth`` → ``tile`` → ``extract``), which are the final check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from wsimil.data.synthetic import SynthBag, survival_times

SIZE_RANGES = {"macro": (0.05, 0.30), "micro": (0.003, 0.05), "itc": None}


@dataclass(frozen=True)
class SlideBagSpec:
    """Parameters of :func:`make_slide_bags` (see the module docstring for what each one models)."""

    dim: int = 256
    n_types: int = 8
    min_instances: int = 1000
    max_instances: int = 10000
    type_spread: float = 6.0
    type_rank: int = 8
    signal: float = 2.5
    mimic_share: float = 0.5
    batch_shift: float = 0.5
    size_shares: dict[str, float] = field(default_factory=lambda: {"macro": 0.4, "micro": 0.4, "itc": 0.2})
    pos_fraction: float = 0.5


class _World:
    """The feature space shared by every slide of one cohort: type clusters, tumour/mimic directions, stain basis."""

    def __init__(self, spec: SlideBagSpec, rng: np.random.Generator, n_coarse: int = 0, n_fine: int = 0):
        d = spec.dim
        self.spec = spec
        self.means = _unit(rng.standard_normal((spec.n_types, d))) * spec.type_spread
        self.factors = rng.standard_normal((spec.n_types, d, spec.type_rank)) * (0.7 / np.sqrt(spec.type_rank))
        self.tumour = _unit(rng.standard_normal(d))
        half = np.zeros(d)
        shared = rng.permutation(d)[: d // 2]
        half[shared] = self.tumour[shared]  # shares t's coordinates on half the dimensions
        self.mimic = _unit(half)  # cosine with t ≈ √½
        self.stain = np.linalg.qr(rng.standard_normal((d, 4)))[0]
        self.coarse = _unit(rng.standard_normal((max(n_coarse, 1), d)))
        self.fine = _unit(rng.standard_normal((max(n_coarse * n_fine, 1), d)))

    def sample(self, types: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Features of patches of the given tissue ``types (N,)``."""
        n, d = len(types), self.spec.dim
        x = rng.standard_normal((n, d))
        for t in np.unique(types):
            i = np.flatnonzero(types == t)
            x[i] += self.means[t] + rng.standard_normal((len(i), self.spec.type_rank)) @ self.factors[t].T
        return x


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _section(n: int, rng: np.random.Generator) -> np.ndarray:
    """Grid coordinates ``(n, 2)`` of an irregular elliptical tissue section of ``n`` patches."""
    aspect = rng.uniform(0.6, 1.0)
    side = int(np.ceil(np.sqrt(n / (0.7 * aspect)))) + 4
    yy, xx = np.mgrid[:side, :side].astype(float)
    c = (side - 1) / 2
    angle = np.arctan2(yy - c, xx - c)
    wobble = 1 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * angle + rng.uniform(0, 6.3))
    r = np.hypot((xx - c), (yy - c) / aspect) / wobble
    order = np.argsort(r.ravel() + rng.uniform(0, 0.5, r.size), kind="stable")[:n]
    return np.stack([xx.ravel()[order], yy.ravel()[order]], 1).astype(np.int64)


def _focus(coords: np.ndarray, k: int, rng: np.random.Generator, avoid: np.ndarray | None = None) -> np.ndarray:
    """Indices of an irregular focus of ``k`` patches (nearest to a random centre under a random anisotropic
    metric, with jitter), optionally not overlapping ``avoid``."""
    cand = np.flatnonzero(~avoid) if avoid is not None else np.arange(len(coords))
    centre = coords[rng.choice(cand)].astype(float)
    a = rng.uniform(0.5, 2.0)
    theta = rng.uniform(0, np.pi)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    d = (coords - centre) @ rot
    dist = np.hypot(d[:, 0] * a, d[:, 1] / a)
    dist = dist * rng.uniform(0.7, 1.3, len(dist))  # infiltrating, not a disc
    if avoid is not None:
        dist[avoid] = np.inf
    return np.argsort(dist, kind="stable")[:k]


def _size_class(spec: SlideBagSpec, rng: np.random.Generator) -> str:
    names = list(spec.size_shares)
    p = np.array([spec.size_shares[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _tumour_count(size_class: str, n: int, rng: np.random.Generator) -> int:
    rng_share = SIZE_RANGES[size_class]
    if rng_share is None:  # isolated tumour cells: one or two patches
        return int(rng.integers(1, 3))
    lo, hi = rng_share
    return max(3, int(round(np.exp(rng.uniform(np.log(lo), np.log(hi))) * n)))


def _slide(world: _World, i: int, size_class: str, rng: np.random.Generator, prefix: str,
           tumour_shift: np.ndarray | None = None) -> SynthBag:  # fmt: skip
    spec = world.spec
    n = int(np.exp(rng.uniform(np.log(spec.min_instances), np.log(spec.max_instances))))
    coords = _section(n, rng)
    seeds = rng.choice(n, int(rng.integers(6, 17)), replace=False)
    seed_types = rng.integers(0, spec.n_types, len(seeds))
    nearest = np.argmin(((coords[:, None, :] - coords[None, seeds, :]) ** 2).sum(-1), axis=1)
    types = seed_types[nearest]
    x = world.sample(types, rng)
    inst = np.zeros(n, dtype=np.int64)
    if size_class != "negative":
        k = min(_tumour_count(size_class, n, rng), n // 2)
        idx = _focus(coords, k, rng)
        x[idx] += spec.signal * world.tumour + (0 if tumour_shift is None else tumour_shift)
        inst[idx] = 1
    has_mimic = bool(rng.random() < spec.mimic_share)
    if has_mimic:
        k = max(3, int(round(np.exp(rng.uniform(np.log(0.003), np.log(0.05))) * n)))
        idx = _focus(coords, min(k, n // 4), rng, avoid=inst.astype(bool))
        x[idx] += spec.signal * world.mimic
    x += (world.stain @ rng.standard_normal(4)) * spec.batch_shift
    x *= 1 + 0.1 * rng.uniform(-1, 1)
    cols = {
        "size_class": size_class,
        "tumour_share": round(float(inst.mean()), 6),
        "n_instances": n,
        "has_mimic": int(has_mimic),
    }
    label = int(size_class != "negative")
    return SynthBag(f"{prefix}_{i:04d}", x.astype(np.float32), inst, label, cols, coords=coords)


def make_slide_bags(n_bags: int = 100, spec: SlideBagSpec | None = None, seed: int = 0) -> list[SynthBag]:
    """``n_bags`` slide-sized bags (``pos_fraction`` positive), one cohort's world drawn from ``seed``."""
    spec = spec or SlideBagSpec()
    rng = np.random.default_rng([seed, 11])
    world = _World(spec, rng)
    n_pos = int(round(n_bags * spec.pos_fraction))
    classes = [_size_class(spec, rng) if i < n_pos else "negative" for i in range(n_bags)]
    bags = [_slide(world, i, c, rng, "sbag") for i, c in enumerate(classes)]
    return [bags[i] for i in rng.permutation(n_bags)]


def make_hierarchical_slide_bags(n_bags: int = 120, spec: SlideBagSpec | None = None, n_fine: int = 2,
                                 fine_signal: float = 1.0, seed: int = 0) -> list[SynthBag]:  # fmt: skip
    """Bags of 2 coarse × ``n_fine`` (2–3) fine classes: every slide holds tumour; the coarse class sets a strong
    direction, the fine class adds ``fine_signal`` along its own (subtle). Fine classes are balanced."""
    if n_fine not in (2, 3):
        raise ValueError(f"n_fine must be 2 or 3, got {n_fine}")
    spec = replace(spec or SlideBagSpec(), mimic_share=0.3)
    rng = np.random.default_rng([seed, 12])
    world = _World(spec, rng, n_coarse=2, n_fine=n_fine)
    bags = []
    for i in range(n_bags):
        c, f = divmod(i % (2 * n_fine), n_fine)
        shift = spec.signal * world.coarse[c] + fine_signal * world.fine[c * n_fine + f]
        size_class = _size_class(replace(spec, size_shares={"macro": 0.5, "micro": 0.5}), rng)
        b = _slide(world, i, size_class, rng, "hbag", tumour_shift=shift - spec.signal * world.tumour)
        fine = f"c{c}f{f}"
        b.label = fine
        b.columns.update({"fine_label": fine, "coarse_label": f"c{c}"})
        bags.append(b)
    return [bags[i] for i in rng.permutation(n_bags)]


def make_survival_slide_bags(n_bags: int = 120, spec: SlideBagSpec | None = None, log_hazard_ratio: float = 0.6,
                             seed: int = 0) -> list[SynthBag]:  # fmt: skip
    """Slide bags with ``time, event``: hazard ``∝ exp(log_hazard_ratio · tumour_share / 0.1)`` (negatives: share
    0), right-censored."""
    bags = make_slide_bags(n_bags, spec, seed)
    rng = np.random.default_rng([seed, 13])
    share = np.array([b.columns["tumour_share"] for b in bags])
    time, event = survival_times(share / 0.1, rng, log_hazard_ratio=log_hazard_ratio)
    for b, t, e in zip(bags, time, event, strict=True):
        b.columns.update({"time": float(t), "event": int(e)})
    return bags
