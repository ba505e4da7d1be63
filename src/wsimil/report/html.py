"""``wsimil report RUN``: one self-contained HTML page (no external files; images embedded as base64, no script)
for a training run.

Sections: summary (model, method, cohort), notes from the caller, a comparison with other runs (e.g. the demo's
20× and 5× runs), metrics (mean ± std over folds), per-fold metrics with bootstrap 95% CIs (``results.json``
``folds[].ci``; "n/a (fold too small)" when a fold has fewer than ``MIN_PER_CLASS`` slides of a class), the pooled
out-of-fold metrics with their CIs (``pooled``), extra heads (``metrics_<head>``, with ``ci_<head>``), the LRMIL HR/LR
comparison and timing when ``results.json`` has ``teacher_hr``/``baseline_lr``/``student_lr`` and
``seconds_per_slide``, ROC and precision–recall curves, confusion matrix and calibration of the out-of-fold
predictions, training curves, per-slide predictions with out-of-fold heatmaps (when the slides can be found) and
the resolved config.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from wsimil import __version__
from wsimil.errors import WsimilError
from wsimil.evaluation.metrics import MIN_PER_CLASS
from wsimil.io import write_text
from wsimil.progress import console

LRMIL_ARMS = {"teacher_hr": "HR teacher (20×)", "baseline_lr": "LR baseline (5×)", "student_lr": "LR student (5×)"}
METRIC_ORDER = ["auc", "accuracy", "balanced_accuracy", "f1_macro", "f1_weighted", "instance_auc", "c_index"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 60px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.2em;margin:34px 0 10px;border-bottom:2px solid #dde2ea;
padding-bottom:4px} h3{font-size:1em;margin:18px 0 6px}
.sub{color:#5a6474;font-size:.92em} .note{color:#5a6474;font-size:.88em;margin:6px 0}
table{border-collapse:collapse;font-size:.86em;background:#fff;margin:6px 0 12px}
th,td{border:1px solid #dde2ea;padding:4px 8px;text-align:right} th{background:#eef1f5}
td.l,th.l{text-align:left} tr.bad td{background:#fff1f0}
.plots{display:flex;flex-wrap:wrap;gap:14px} .plots figure{margin:0;background:#fff;padding:8px;
border:1px solid #dde2ea} .plots img{max-width:520px;height:auto;display:block}
.plots figure.wide img{max-width:1100px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
.card{background:#fff;border:1px solid #dde2ea;padding:8px} .card img{width:100%;height:auto;display:block}
.card .cap{font-size:.85em;margin-top:4px} pre{background:#fff;border:1px solid #dde2ea;padding:10px;
overflow:auto;font-size:.8em} details summary{cursor:pointer;color:#2a5db0}
.ok{color:#1a7f37} .wrong{color:#c62828}
"""


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{base64.b64encode(data).decode()}">'


def _jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    return buf.tobytes()


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    if isinstance(v, int | np.integer):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def _metric_names(names) -> list[str]:
    names = list(dict.fromkeys(names))
    return [m for m in METRIC_ORDER if m in names] + sorted(m for m in names if m not in METRIC_ORDER)


def _table(header: list[str], rows: list[list[str]], left: int = 1, classes: list[str] | None = None) -> str:
    """An HTML table; the first ``left`` columns are left-aligned. Cells are escaped by the caller."""
    th = "".join(f'<th class="{"l" if i < left else ""}">{h}</th>' for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cls = f' class="{classes[r]}"' if classes and classes[r] else ""
        tds = "".join(f'<td class="{"l" if i < left else ""}">{c}</td>' for i, c in enumerate(row))
        body.append(f"<tr{cls}>{tds}</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _summary_table(metrics: dict[str, Any]) -> str:
    """``{metric: {mean, std}}`` (or ``{value, ci_low, ci_high}``, or a number) → table."""
    rows = []
    for m in _metric_names(metrics):
        v = metrics[m]
        if isinstance(v, dict) and "mean" in v:
            cell = f"{_num(v.get('mean'))} ± {_num(v.get('std'))}"
        elif isinstance(v, dict) and "value" in v:
            cell = f"{_num(v.get('value'))} {_interval(v)}"
        else:
            cell = _num(v) if not isinstance(v, dict) else html.escape(json.dumps(v))
        rows.append([html.escape(m), cell])
    return _table(["metric", "value"], rows)


TOO_SMALL = "n/a (fold too small)"
POOLED_TOO_SMALL = "n/a (too few slides)"


def _interval(c: dict, why: str = TOO_SMALL) -> str:
    """``[low, high]``, or ``why`` there is none (fewer than ``MIN_PER_CLASS`` slides of a class)."""
    if c.get("too_small"):
        return why
    return f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}]"


def _ci_cell(metrics: dict, ci: dict | None, m: str) -> str:
    """A value with its CI; a CI too small to compute leaves the value alone (the row's "95% CI" cell says why)."""
    if ci and m in ci and isinstance(ci[m], dict):
        c = ci[m]
        v = c.get("value", metrics.get(m))
        return _num(v) if c.get("too_small") else f"{_num(v)} <span class='sub'>{_interval(c)}</span>"
    return _num(metrics.get(m))


def _ci_note(ci: dict | None, why: str = TOO_SMALL) -> str:
    """The last cell of a row of values with CIs: ``why`` when its intervals could not be computed."""
    small = bool(ci) and any(isinstance(c, dict) and c.get("too_small") for c in ci.values())
    return f"<span class='sub'>{why}</span>" if small else ("bootstrap" if ci else "")


def _pooled_table(pooled: list[dict]) -> str:
    """Pooled out-of-fold metrics with CIs, one row per repeat (``results.json`` ``pooled``)."""
    names = _metric_names(m for p in pooled for m in p.get("metrics", {}))
    rows = [
        [str(p.get("repeat", 0)), _num(p.get("n"))]
        + [_ci_cell({}, p.get("metrics"), m) for m in names]
        + [_ci_note(p.get("metrics"), POOLED_TOO_SMALL)]
        for p in pooled
    ]
    return _table(["repeat", "n slides", *map(html.escape, names), "95% CI"], rows, left=1)


def _pooled_auc(res: dict) -> str:
    p = (res.get("pooled") or [{}])[0].get("metrics", {}).get("auc")
    if not isinstance(p, dict):
        return "n/a"
    return f"{_num(p.get('value'))} <span class='sub'>{_interval(p, POOLED_TOO_SMALL)}</span>"


def _folds_table(folds: list[dict], metrics_key: str = "metrics", ci_key: str = "ci") -> str:
    names = _metric_names(m for f in folds for m in (f.get(metrics_key) or {}))
    rows = []
    for f in folds:
        ms, ci = f.get(metrics_key) or {}, f.get(ci_key)
        rows.append(
            [str(f.get("repeat", 0)), str(f.get("fold", "")), _num(f.get("n_test"))]
            + [_ci_cell(ms, ci, m) for m in names]
            + [_ci_note(ci)]
        )
    return _table(["repeat", "fold", "n test", *map(html.escape, names), "95% CI"], rows, left=2)


def lrmil_arms(res: dict) -> dict[str, dict]:
    """The LRMIL arms of a ``results.json`` as ``{arm: {"metrics": {m: {mean, std}}, "folds": [...]}}``, in the
    layout ``wsimil lrmil`` writes (``metrics`` and ``folds`` keyed by arm) or with one top-level entry per arm."""
    arms: dict[str, dict] = {}
    metrics, folds = res.get("metrics"), res.get("folds")
    for arm in LRMIL_ARMS:
        if isinstance(metrics, dict) and isinstance(metrics.get(arm), dict):
            arms[arm] = {"metrics": metrics[arm], "folds": folds.get(arm, []) if isinstance(folds, dict) else []}
        elif isinstance(res.get(arm), dict):
            v = res[arm]
            arms[arm] = {"metrics": v.get("metrics", v), "folds": v.get("folds", [])}
    return arms


def _arm_cell(v: Any) -> str:
    if isinstance(v, dict) and "mean" in v:
        return f"{_num(v.get('mean'))} ± {_num(v.get('std'))}"
    if isinstance(v, dict) and "value" in v:
        return f"{_num(v['value'])} {_interval(v)}"
    return _num(v) if not isinstance(v, dict) else ""


def _lrmil_section(res: dict) -> str:
    """The HR/LR comparison (one row per arm, then each arm's folds with CIs) and the measured seconds per slide."""
    arms = lrmil_arms(res)
    if not arms and "seconds_per_slide" not in res:
        return ""
    from wsimil.viz.plots import timing_png

    parts = ["<h2>LRMIL: high vs. low resolution</h2>"]
    if arms:
        names = _metric_names(m for a in arms.values() for m in a["metrics"])
        rows = [[html.escape(LRMIL_ARMS[k]), *(_arm_cell(a["metrics"].get(m)) for m in names)] for k, a in arms.items()]
        parts += ["<p class='note'>Mean ± standard deviation over test folds.</p>"]
        parts.append(_table(["model", *map(html.escape, names)], rows))
        for k, a in arms.items():
            if a["folds"]:
                parts += [f"<h3>{html.escape(LRMIL_ARMS[k])} per fold (95% CI)</h3>", _folds_table(a["folds"])]
    sps = res.get("seconds_per_slide")
    if isinstance(sps, dict):
        flat = _flatten(sps)
        parts.append("<h3>Inference time per slide</h3>")
        parts.append(_table(["", "value"], [[html.escape(k), _num(v, 3)] for k, v in flat.items()]))
        paths = {"hr": "HR path (20× tiles, E_T, teacher)", "lr": "LR path (5× tiles, E_S, student)"}
        secs = {paths[k]: float(sps[k]) for k in paths if isinstance(sps.get(k), int | float)}
        if secs:
            parts.append(f'<div class="plots"><figure>{_img(timing_png(secs), "seconds per slide")}</figure></div>')
    elif isinstance(sps, int | float):
        parts.append(f"<p>Seconds per slide: {_num(sps)}</p>")
    return "\n".join(parts)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix} / {k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def _plots_section(pred: pd.DataFrame, classes: list[str], history: pd.DataFrame | None) -> str:
    from wsimil.viz.plots import calibration_png, confusion_matrix_png, curve_png, history_png

    parts = []
    prob_cols = [f"prob_{c}" for c in classes]
    if "label" in pred.columns and all(c in pred.columns for c in prob_cols) and len(pred):
        rep0 = pred[pred["repeat"] == pred["repeat"].min()]
        index = {c: i for i, c in enumerate(classes)}
        y = rep0["label"].astype(str).map(index).to_numpy()
        if not np.isnan(y.astype(float)).any():
            y = y.astype(int)
            probs = rep0[prob_cols].to_numpy(dtype=float)
            folds = rep0["fold"].to_numpy()
            figs = [
                (curve_png(y, probs, classes, folds, "roc"), "ROC curves"),
                (curve_png(y, probs, classes, folds, "pr"), "precision-recall curves"),
                (confusion_matrix_png(y, probs.argmax(1), classes), "confusion matrix"),
                (calibration_png(y, probs, classes), "calibration"),
            ]
            note = " (first repeat)" if pred["repeat"].nunique() > 1 else ""
            parts.append(f"<h2>Out-of-fold predictions{note}</h2>")
            parts.append('<div class="plots">' + "".join(f"<figure>{_img(b, a)}</figure>" for b, a in figs) + "</div>")
    if history is not None and (png := history_png(history)) is not None:
        parts.append("<h2>Training curves</h2>")
        parts.append(f'<div class="plots"><figure class="wide">{_img(png, "training curves")}</figure></div>')
    return "\n".join(parts)


def _pick_map(maps: dict[str, np.ndarray], kind: str, predicted: str) -> str:
    """The map to show for a slide: the predicted class's row of the preferred kind when there is one per class."""
    names = list(maps)
    prefix = names[0].split(":")[0]
    for n in names:
        if n == f"{prefix}:{predicted}":
            return n
    return names[0]


def _report_maps(maps: dict[str, np.ndarray], kind: str, predicted: str) -> list[str]:
    """The maps shown for a slide: the one :func:`_pick_map` picks, preceded by ABMIL's patch evidence for the
    predicted (binary: positive) class when the model has it."""
    main = _pick_map({k: v for k, v in maps.items() if not k.startswith("evidence")} or maps, kind, predicted)
    evidence = [k for k in maps if k.startswith("evidence")]
    pick = [k for k in evidence if k == f"evidence:{predicted}"] or evidence[:1]
    return [*pick, main] if main not in pick else pick


def _classification_table(first: pd.DataFrame, classes: list[str]) -> str:
    """Slide, fold, label, predicted class (argmax), ✓/✗ and class probabilities; adds ``predicted`` to ``first``."""
    prob_cols = [f"prob_{c}" for c in classes if f"prob_{c}" in first.columns]
    if prob_cols:
        first["predicted"] = [classes[i] for i in first[prob_cols].to_numpy(dtype=float).argmax(1)]
    rows, row_cls = [], []
    for _, r in first.iterrows():
        label = str(r.get("label", ""))
        pcol = str(r.get("predicted", ""))
        ok = "label" in r and pcol == label
        mark = "<span class='ok'>✓</span>" if ok else "<span class='wrong'>✗</span>" if "label" in r else ""
        rows.append(
            [html.escape(str(r["slide_id"])), str(r["fold"]), html.escape(label), html.escape(pcol), mark]
            + [_num(r[c]) for c in prob_cols]
        )
        row_cls.append("" if ok or "label" not in r else "bad")
    header = ["slide", "fold", "label", "predicted", "", *map(html.escape, prob_cols)]
    return _table(header, rows, left=4, classes=row_cls)


def _slides_section(
    run: Path, pred: pd.DataFrame, classes: list[str], slides, max_heatmaps: int, size: int, top_k: int
) -> str:
    from wsimil.predict.runs import score_run_slides
    from wsimil.viz.heatmap import render_heatmap, run_heatmap_input, run_truth

    first = pred.drop_duplicates("slide_id", keep="first").copy()
    parts = ["<h2>Per-slide predictions</h2>"]
    if "risk" in first.columns:  # survival: time, event and the predicted risk
        cols = [c for c in ("time", "event", "risk") if c in first.columns]
        rows = [[html.escape(str(r["slide_id"])), str(r["fold"]), *(_num(r[c]) for c in cols)] for _, r in
                first.iterrows()]  # fmt: skip
        parts.append(_table(["slide", "fold", *cols], rows, left=2))
    else:
        parts.append(_classification_table(first, classes))

    cards = []
    notes = []
    chosen = first["slide_id"].tolist()[:max_heatmaps]
    scored, truth = [], {}
    if (run / "bundle").is_dir() and max_heatmaps > 0:
        try:
            scored = score_run_slides(run, chosen, slides)
            truth = run_truth(run, slides)
        except WsimilError as e:
            notes.append(f"No heatmaps: {e}")
    pmap = dict(zip(first["slide_id"], first["predicted"], strict=True)) if "predicted" in first.columns else {}
    for s in scored:
        if s.slide_path is None or s.coords is None or s.patch_size_level0 is None:
            continue
        for name in _report_maps(s.scores.maps, s.scores.kind, str(pmap.get(s.slide_id, ""))):
            h = run_heatmap_input(s, name, classes or None, truth.get(s.slide_id))
            try:
                rgb = render_heatmap(h, None, size, top_k)
            except WsimilError as e:
                notes.append(html.escape(str(e)))
                continue
            cap = f"<b>{html.escape(s.slide_id)}</b> — {html.escape(name)}, fold {s.fold} model (held out)"
            if s.slide_id in pmap:
                cap += f"; predicted {html.escape(str(pmap[s.slide_id]))}"
            alt = f"heatmap {s.slide_id}" + (" evidence" if name.startswith("evidence") else "")
            cards.append(f'<div class="card">{_img(_jpeg(rgb), alt, "image/jpeg")}'
                         f'<div class="cap">{cap}</div></div>')  # fmt: skip
    if cards:
        parts.append(
            "<h3>Heatmaps</h3><p class='note'>Each slide scored by the fold model that did not train on it; its "
            "probability, prediction and label are in each title. Colours use one scale for every slide: "
            "attention as attention × N (1 = the uniform share of the slide's N patches, log scale from 1/16 to 16), "
            "instance probabilities on 0–1. Attention shows where the model looks, not whether the slide is "
            "positive; for ABMIL the map beside it, <i>evidence</i>, is the slide classifier applied to each patch "
            "alone (the slide's logit is the attention-weighted mean of these patch logits), so a negative slide "
            "stays blue there. Tissue contours in black, ground-truth tumour (when the cohort has masks) in "
            f"magenta, the top-{top_k} patches outlined, numbered and shown below each slide.</p>"
        )
        parts.append('<div class="cards">' + "".join(cards) + "</div>")
        if len(first) > max_heatmaps:
            parts.append(f"<p class='note'>Heatmaps for the first {max_heatmaps} of {len(first)} slides.</p>")
    elif not notes and not (run / "bundle").is_dir():
        notes.append(f"No heatmaps: {run / 'bundle'} is missing (written by `wsimil train`).")
    elif not notes:
        notes.append(
            "No heatmaps: the slide files or patch coordinates of this run's features were not found "
            "(pass --slides DIR|CSV to locate the slides)."
        )
    parts += [f"<p class='note'>{n}</p>" for n in notes]
    return "\n".join(parts)


def _results(run: Path) -> dict:
    path = run / "results.json"
    if not path.is_file():
        raise WsimilError(f"{run} is not a finished wsimil run: {path} is missing")
    return json.loads(path.read_text())


def _compare_table(runs: dict[str, dict]) -> str:
    """One row per run: AUC and balanced accuracy (mean ± std over folds) and the pooled out-of-fold AUC [CI]."""
    rows = []
    for name, res in runs.items():
        m = res.get("metrics", {})
        n = (res.get("pooled") or [{}])[0].get("n")
        rows.append([html.escape(name), _num(n), _arm_cell(m.get("auc")), _pooled_auc(res),
                     _arm_cell(m.get("balanced_accuracy"))])  # fmt: skip
    header = ["run", "slides", "AUC (mean ± std over folds)", "pooled out-of-fold AUC [95% CI]", "balanced accuracy"]
    return "<h2>Runs compared</h2>" + _table(header, rows)


def _other_run_section(name: str, run: Path, slides, max_heatmaps: int, size: int, top_k: int) -> str:
    """Curves, per-slide predictions and a few heatmaps of a compared run."""
    cfg_path = run / "config.yaml"
    cfg = (yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    pred_path = run / "predictions.csv"
    if not pred_path.is_file():
        return f"<h2>{html.escape(name)}</h2><p class='note'>No predictions in {html.escape(str(run))}.</p>"
    pred = pd.read_csv(pred_path, dtype={"slide_id": str, "label": str})
    classes = [str(c) for c in cfg.get("classes", [])] or [c[5:] for c in pred.columns if c.startswith("prob_")]
    body = _plots_section(pred, classes, None) + _slides_section(run, pred, classes, slides, max_heatmaps, size, top_k)
    body = body.replace("<h2>", "<h3>").replace("</h2>", "</h3>")
    return f"<h2>{html.escape(name)}: {html.escape(str(run.name))}</h2>{body}"


def build_report(
    run: str | Path,
    out: str | Path | None = None,
    slides: str | Path | None = None,
    max_heatmaps: int = 40,
    heatmap_size: int = 900,
    top_k: int = 6,
    compare: dict[str, str | Path] | None = None,
    label: str | None = None,
    notes: list[str] | None = None,
) -> Path:
    """Write the HTML report of a training run (default ``RUN/report.html``); returns its path.

    ``compare`` adds other runs by name (e.g. ``{"5×": run_5x}``): a table of their headline metrics beside this
    run's (named ``label``), then each one's curves and heatmaps. ``notes`` are sentences shown under the title."""
    run = Path(run)
    res_path, cfg_path = run / "results.json", run / "config.yaml"
    if not res_path.is_file():
        raise WsimilError(f"{run} is not a finished wsimil run: {res_path} is missing")
    res = json.loads(res_path.read_text())
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else res.get("config", {})
    cfg = cfg or {}
    arms = lrmil_arms(res)
    nested = bool(arms) and isinstance(res.get("metrics"), dict) and set(res["metrics"]) <= set(LRMIL_ARMS)
    # an LRMIL run (wsimil lrmil): curves and slides are those of the deployed LR student's run folder
    pred_run = run / str((res.get("runs") or {}).get("student_lr", "student")) if nested else run
    pred = pd.read_csv(pred_run / "predictions.csv", dtype={"slide_id": str, "label": str}) if (
        pred_run / "predictions.csv").is_file() else pd.DataFrame()  # fmt: skip
    history = pd.read_csv(pred_run / "history.csv") if (pred_run / "history.csv").is_file() else None
    classes = [str(c) for c in cfg.get("classes", [])] or [c[5:] for c in pred.columns if c.startswith("prob_")]
    out = Path(out) if out is not None else run / "report.html"
    console.print(f"Writing report of {run} → {out}")

    title = f"wsimil report — {run.resolve().name}"
    n_models = pred.groupby(["repeat", "fold"]).ngroups if {"repeat", "fold"} <= set(pred.columns) else "?"
    n_slides = pred["slide_id"].nunique() if len(pred) else "?"
    sub = (
        f"model <b>{html.escape(str(cfg.get('model', '?')))}</b>, method <b>{html.escape(str(cfg.get('method', '?')))}"
        f"</b>, task {html.escape(str(cfg.get('task', 'classification')))}, {n_slides} slides, classes "
        f"{html.escape(', '.join(classes))}; {n_models} fold model(s)"
    )
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>{sub}</p>",
        f"<p class='sub'>run {html.escape(str(run.resolve()))} · trained with wsimil "
        f"{html.escape(str(cfg.get('wsimil_version', '?')))} · report by wsimil {__version__} on "
        f"{_dt.date.today().isoformat()}</p>",
    ]
    parts += [f"<p class='note'><b>Note:</b> {html.escape(n)}</p>" for n in notes or []]
    if compare:
        parts.append(_compare_table({label or run.name: res, **{k: _results(Path(v)) for k, v in compare.items()}}))
    if not nested:
        parts += [
            "<h2>Metrics</h2><p class='note'>Mean ± standard deviation over test folds.</p>",
            _summary_table(res.get("metrics", {})),
        ]
    if "repeat_metrics" in res:
        parts += ["<h3>Across repeats</h3>", _summary_table(res["repeat_metrics"])]
    if res.get("folds") and not nested:
        parts += [
            "<h3>Per fold</h3><p class='note'>Test-fold value with its bootstrap 95% confidence interval; "
            f"“{TOO_SMALL}” where the fold has fewer than {MIN_PER_CLASS} slides of a class (an interval "
            "from so few would read e.g. AUC [1, 1]).</p>",
            _folds_table(res["folds"]),
        ]
    if res.get("pooled") and not nested:
        parts += [
            "<h3>Pooled out-of-fold</h3><p class='note'>Every slide's prediction by the fold model that held it "
            "out, pooled over the folds of a repeat, with a bootstrap 95% CI over slides. Fold models need not "
            "share one score scale, so the pooled AUC can sit below the mean of the fold AUCs.</p>",
            _pooled_table(res["pooled"]),
        ]
    for key in sorted(k for k in res if k.startswith("metrics_")):
        head = key.removeprefix("metrics_")
        parts += [f"<h3>Head <code>{html.escape(head)}</code></h3>", _summary_table(res[key])]
        if not nested and any(key in f for f in res.get("folds", [])):
            parts.append(_folds_table(res["folds"], key, f"ci_{head}"))
    parts.append(_lrmil_section(res))
    if nested and len(pred):
        parts.append(f"<p class='note'>Curves and slides below: the LR student ({html.escape(str(pred_run))}).</p>")
    if classes and cfg.get("task", "classification") == "classification":
        parts.append(_plots_section(pred, classes, history))
    elif history is not None:
        parts.append(_plots_section(pd.DataFrame(), [], history))
    if len(pred):
        parts.append(_slides_section(pred_run, pred, classes, slides, max_heatmaps, heatmap_size, top_k))
    for name, other in (compare or {}).items():
        parts.append(_other_run_section(name, Path(other), slides, min(max_heatmaps, 6), heatmap_size, top_k))
    keys = ["model", "method", "model_kwargs", "method_kwargs", "epochs", "lr", "optimizer", "batch_size", "folds",
            "repeats", "standardize", "seed", "features", "manifest"]  # fmt: skip
    rows = [[html.escape(k), html.escape(json.dumps(cfg[k], default=str))] for k in keys if k in cfg]
    parts += [
        "<h2>Configuration</h2>",
        _table(["key", "value"], rows, left=2),
        "<details><summary>full resolved config (config.yaml)</summary><pre>"
        + html.escape(yaml.safe_dump(cfg, sort_keys=False))
        + "</pre></details>",
    ]
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{html.escape(title)}</title><link rel="icon" href="data:,"><style>{CSS}</style></head>'
        f"<body><main>{''.join(p for p in parts if p)}</main></body></html>\n"
    )
    write_text(out, doc)
    return out
