"""Run reports: ``report.md`` and a self-contained ``report.html`` with plots.

Both say exactly what was measured: the metrics with their 95% bootstrap CIs and the counts behind
them (unparseable answers included), breakdowns by modality, body part, question type and (when the
samples mix them) source split (headline metric with CI error bars), the ablation deltas with paired
CIs, the contamination check, problems of a predictions file, examples of answers that could not be
parsed, and the configuration (prompts verbatim, decoding, versions, data hash, scorer; a compat scorer
is flagged at the top).

Plots are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no global
state) and saved as PNG files beside the reports (``plot_*.png``); the HTML embeds them as data URIs so
it can be mailed as one file. Without matplotlib the reports are written without plots and say so.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from emma.io.atomic import atomic_write

MD_FILE = "report.md"
HTML_FILE = "report.html"
MAX_EXAMPLES = 10
_MAX_TEXT = 160


# ------------------------------------------------------------------------------------------ helpers


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(ci: Sequence[float] | None, digits: int = 4) -> str:
    if not ci:
        return "–"
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _short(text: Any, limit: int = _MAX_TEXT) -> str:
    s = " ".join(str(text if text is not None else "").split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _md_cell(text: Any) -> str:
    return _short(text).replace("|", "\\|")


# -------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _errs(values: Sequence[float], cis: Sequence[Sequence[float] | None]) -> list[list[float]]:
    lo = [max(0.0, v - c[0]) if c else 0.0 for v, c in zip(values, cis)]
    hi = [max(0.0, c[1] - v) if c else 0.0 for v, c in zip(values, cis)]
    return [lo, hi]


def _unit(metrics: Mapping[str, float | None]) -> list[str]:
    """Metrics on a 0-1 scale (plotted together; BLEU's 0-100 is left to the tables); a null one is not
    plotted (the tables show it)."""
    return [n for n, v in metrics.items() if v is not None and 0.0 <= v <= 1.0 and not n.startswith("bleu")]


def plot_metrics(
    metrics: Mapping[str, float | None], ci95: Mapping[str, Sequence[float]], title: str
) -> bytes:
    names = _unit(metrics)
    values = [float(metrics[n]) for n in names]
    fig = _figure(7, 0.45 * len(names) + 1.2)
    ax = fig.subplots()
    y = list(range(len(names)))
    ax.barh(y, values, xerr=_errs(values, [ci95.get(n) for n in names]), color="#4C72B0", capsize=3)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel("value (error bars: 95% bootstrap CI)")
    ax.set_title(title)
    for yi, v in zip(y, values):
        ax.text(min(v, 1.0) + 0.01, yi, f"{v:.3f}", va="center", fontsize=8)
    return _png(fig)


def plot_breakdown(key: str, table: Mapping[str, Mapping[str, Any]], metric: str) -> bytes | None:
    groups = [g for g, row in table.items() if row.get("value") is not None]
    if not groups:
        return None
    values = [float(table[g]["value"]) for g in groups]
    fig = _figure(7, 0.4 * len(groups) + 1.2)
    ax = fig.subplots()
    y = list(range(len(groups)))
    ax.barh(y, values, xerr=_errs(values, [table[g].get("ci95") for g in groups]), color="#55A868", capsize=3)
    ax.set_yticks(y, [f"{_short(g, 30)} (n={table[g]['n']})" for g in groups])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(f"{metric} (error bars: 95% bootstrap CI)")
    ax.set_title(f"{metric} by {key.replace('_', ' ')}")
    return _png(fig)


def plot_ablation(
    ablation: Mapping[str, Any], metrics: Mapping[str, float | None], ci95: Mapping[str, Any]
) -> bytes:
    other = ablation["ablated"]
    names = [n for n in _unit(metrics) if n in _unit(other["metrics"])]
    fig = _figure(7, 0.55 * len(names) + 1.4)
    ax = fig.subplots()
    height = 0.38
    yb = [i - height / 2 for i in range(len(names))]
    ya = [i + height / 2 for i in range(len(names))]
    bv = [float(metrics[n]) for n in names]
    av = [float(other["metrics"][n]) for n in names]
    ax.barh(
        yb,
        bv,
        height,
        xerr=_errs(bv, [ci95.get(n) for n in names]),
        label="real image",
        color="#4C72B0",
        capsize=3,
    )
    ax.barh(
        ya,
        av,
        height,
        xerr=_errs(av, [other["ci95"].get(n) for n in names]),
        label=f"{ablation['mode']} image",
        color="#C44E52",
        capsize=3,
    )
    ax.set_yticks(list(range(len(names))), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"image ablation: {ablation['mode']}")
    return _png(fig)


def make_plots(results: Mapping[str, Any]) -> dict[str, bytes]:
    """PNG plots by file name (empty when matplotlib is not installed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return {}
    plots: dict[str, bytes] = {}
    title = f"{results['task']} ({results['split']}), {results['model']}"
    if _unit(results["metrics"]):
        plots["plot_metrics.png"] = plot_metrics(results["metrics"], results["ci95"], title)
    for key, table in (results.get("breakdowns") or {}).items():
        metric = next((row["metric"] for row in table.values()), results.get("headline", ""))
        png = plot_breakdown(key, table, metric)
        if png is not None:
            plots[f"plot_by_{key}.png"] = png
    ablation = results.get("ablation")
    if ablation and any(n in _unit(ablation["ablated"]["metrics"]) for n in _unit(results["metrics"])):
        plots["plot_ablation.png"] = plot_ablation(results["ablation"], results["metrics"], results["ci95"])
    return plots


# ------------------------------------------------------------------------------------------ content


def _examples(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r.get("parse_status") not in ("ok", None)][:MAX_EXAMPLES]


def _zero_shot_blocks(block: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The zero-shot protocol section: recipe, leakage check, metrics by group and their gap."""
    recipe = block["recipe"]
    check = block.get("leakage_check")
    if check is None:
        verdict = "not recorded (run `emma data check`)"
    else:
        leaks = sum(
            check[k]
            for k in (
                "group_in_training",
                "term_in_training",
                "label_in_training",
                "exact_image_overlap",
                "near_duplicate_images",
                "outside_group_in_test",
            )
        )
        verdict = (
            "clean: the held-out group is absent from training" if not leaks else f"LEAKED ({leaks} hits)"
        )
    blocks: list[tuple[str, Any]] = [
        ("h2", f"Zero-shot protocol: {block['held_out']} held out"),
        (
            "kv",
            [
                ("evaluated split is", block["role"]),
                ("source dataset", f"{recipe['source']} ({recipe['source_path']})"),
                ("training splits", ", ".join(recipe["train_splits"]) or "-"),
                ("terms kept out of training", ", ".join(recipe["terms"]) or "-"),
                ("leakage check", verdict),
            ],
        ),
    ]
    groups = [(name, block.get(name)) for name in ("zero_shot", "in_distribution")]
    names = sorted({m for _, g in groups if g for m in g["metrics"]})
    present = [(name, g) for name, g in groups if g]
    header = (
        ["metric"] + [f"{name} (n={g['n']})" for name, g in present] + ["95% CI " + n for n, _ in present]
    )
    rows = [
        [m] + [_fmt(g["metrics"].get(m)) for _, g in present] + [_ci(g["ci95"].get(m)) for _, g in present]
        for m in names
    ]
    blocks.append(("table", (header, rows)))
    if block.get("gap"):
        blocks.append(("p", "gap = in_distribution - zero_shot (different samples: unpaired bootstrap)"))
        blocks.append(
            (
                "table",
                (
                    ["metric", "zero-shot", "in-distribution", "gap", "95% CI", "p (boot.)"],
                    [
                        [
                            m,
                            _fmt(d["zero_shot"]),
                            _fmt(d["in_distribution"]),
                            _fmt(d["delta"]),
                            _ci(d["ci95"]),
                            _fmt(d["p_bootstrap"]),
                        ]
                        for m, d in block["gap"].items()
                    ],
                ),
            )
        )
    return blocks


def _sections(
    results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], plots: Mapping[str, bytes]
) -> list[tuple[str, Any]]:
    """The report as a list of (kind, payload) blocks, rendered to Markdown or HTML."""
    cfg = results["config"]
    blocks: list[tuple[str, Any]] = [("h1", f"EMMA evaluation: {results['task']} ({results['split']})")]
    if cfg.get("compat"):
        blocks.append(
            (
                "warn",
                (
                    f"Scored with {cfg['compat']}: a reproduction of a published scorer, bugs "
                    "included, for comparison only. These are not EMMA's numbers."
                ),
            )
        )
    if cfg.get("ablation"):
        blocks.append(
            (
                "warn",
                (
                    f"Image ablation '{cfg['ablation']}': the metrics below are measured with the "
                    "real images; the ablated-image metrics and the paired deltas follow."
                ),
            )
        )
    blocks.append(
        (
            "kv",
            [
                ("model", results["model"]),
                ("samples evaluated", results["n"]),
                ("data", cfg["data"]["data"]),
                ("data hash", cfg["data_hash"][:16]),
                ("scorer", cfg["scorer"]),
                ("created", results.get("created")),
            ],
        )
    )
    blocks.append(("h2", "Metrics"))
    blocks.append(
        (
            "table",
            (
                ["metric", "value", "95% CI"],
                [[m, _fmt(v), _ci(results["ci95"].get(m))] for m, v in results["metrics"].items()],
            ),
        )
    )
    if "plot_metrics.png" in plots:
        blocks.append(("img", "plot_metrics.png"))
    blocks.append(("h2", "Counts"))
    blocks.append(("table", (["count", "value"], [[k, _fmt(v)] for k, v in results["counts"].items()])))
    if results.get("notes"):
        blocks.append(("h2", "Notes"))
        blocks.append(("list", list(results["notes"])))
    for key, table in (results.get("breakdowns") or {}).items():
        blocks.append(("h2", f"By {key.replace('_', ' ')}"))
        metric = next((row["metric"] for row in table.values()), "")
        blocks.append(
            (
                "table",
                (
                    [key, "n", metric, "95% CI"],
                    [[g, row["n"], _fmt(row["value"]), _ci(row.get("ci95"))] for g, row in table.items()],
                ),
            )
        )
        if f"plot_by_{key}.png" in plots:
            blocks.append(("img", f"plot_by_{key}.png"))
    ablation = results.get("ablation")
    if ablation:
        blocks.append(("h2", f"Image ablation ({ablation['mode']}, seed {ablation['seed']})"))
        blocks.append(
            (
                "p",
                (
                    "delta = ablated − real image, on the same questions; paired bootstrap CI, "
                    "bootstrap and permutation p-values. A small delta means the answers do not "
                    "depend on the image."
                ),
            )
        )
        rows_ab = [
            [m, _fmt(d["a"]), _fmt(d["b"]), _fmt(d["delta"]), _ci(d["ci95"]), _fmt(d["p_permutation"])]
            for m, d in ablation["delta"].items()
        ]
        blocks.append(
            ("table", (["metric", "real image", ablation["mode"], "delta", "95% CI", "p (perm.)"], rows_ab))
        )
        if "plot_ablation.png" in plots:
            blocks.append(("img", "plot_ablation.png"))
    zero_shot = results.get("zero_shot")
    if zero_shot:
        blocks += _zero_shot_blocks(zero_shot)
    contamination = results.get("contamination")
    if contamination:
        blocks.append(("h2", "Contamination check"))
        blocks.append(
            (
                "kv",
                [
                    (
                        "training set",
                        (
                            f"{contamination['train_dataset']} ({', '.join(contamination['train_splits'])}; "
                            f"{contamination['train_samples']} samples)"
                        ),
                    ),
                    (
                        "evaluated images also in training (exact)",
                        f"{contamination['exact_image_overlap']} of {contamination['evaluated_images']}",
                    ),
                    (
                        f"near-duplicate images (pHash ≤ {contamination['phash_threshold']} bits)",
                        contamination["near_duplicate_images"],
                    ),
                    (
                        "evaluated questions asked in training",
                        f"{contamination['question_overlap']} of {contamination['evaluated_samples']}",
                    ),
                    ("same image and question in training", contamination["image_question_overlap"]),
                ],
            )
        )
    pf = results.get("predictions_file")
    if pf:
        blocks.append(("h2", "Predictions file"))
        blocks.append(
            (
                "kv",
                [
                    ("file", pf["file"]),
                    ("unknown ids (ignored)", pf["unknown_ids"]),
                    ("evaluated samples without a prediction", pf["missing_ids"]),
                    ("invalid lines", pf["invalid_lines"]),
                    ("duplicate ids (last kept)", pf["duplicate_ids"]),
                ],
            )
        )
        if pf["unknown_id_examples"]:
            blocks.append(("p", "unknown ids, e.g.: " + ", ".join(map(str, pf["unknown_id_examples"]))))
    examples = _examples(rows)
    if examples:
        blocks.append(("h2", "Answers that could not be parsed (first ten)"))
        blocks.append(
            (
                "table",
                (
                    ["id", "status", "prediction", "gold"],
                    [
                        [r["id"], r["parse_status"], _short(r.get("prediction")), _short(r.get("gold"))]
                        for r in examples
                    ],
                ),
            )
        )
    blocks.append(("h2", "Configuration"))
    blocks.append(
        (
            "kv",
            [
                ("decoding", ", ".join(f"{k}={v}" for k, v in cfg["decoding"].items())),
                ("batch size", cfg.get("batch_size")),
                ("limit", _fmt(cfg.get("limit"))),
                ("versions", ", ".join(f"{k} {v}" for k, v in cfg["versions"].items())),
                (
                    "bootstrap",
                    f"{cfg['bootstrap']['n_resamples']} resamples, seed {cfg['bootstrap']['seed']}",
                ),
                ("dataset", f"{cfg['data']['dataset_name']} at {cfg['data']['dataset_root']}"),
            ],
        )
    )
    blocks.append(("p", "Prompts (verbatim; {question} is the sample's question):"))
    for kind, template in cfg["prompts"].items():
        blocks.append(("code", f"[{kind}]\n{template}"))
    return blocks


# ---------------------------------------------------------------------------------------- rendering


# The text blocks of a report (heading, warning, paragraph) in each output format.
_MD_TEXT = {"h1": "# {}\n", "h2": "## {}\n", "warn": "> **Warning.** {}\n", "p": "{}\n"}
_HTML_TEXT = {
    "h1": "<h1>{}</h1>",
    "h2": "<h2>{}</h2>",
    "warn": "<p class='warn'><strong>Warning.</strong> {}</p>",
    "p": "<p>{}</p>",
}


def render_markdown(
    results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], plots: Mapping[str, bytes]
) -> str:
    out: list[str] = []
    for kind, payload in _sections(results, rows, plots):
        if kind in _MD_TEXT:
            out.append(_MD_TEXT[kind].format(payload))
        elif kind == "kv":
            out.append("\n".join(f"- **{k}**: {_md_cell(v)}" for k, v in payload) + "\n")
        elif kind == "list":
            out.append("\n".join(f"- {_md_cell(x)}" for x in payload) + "\n")
        elif kind == "table":
            header, body = payload
            lines = ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            out.append("\n".join(lines) + "\n")
        elif kind == "img":
            out.append(f"![{payload}]({payload})\n")
        elif kind == "code":
            out.append("```\n" + str(payload) + "\n```\n")
    if not plots:
        out.append("_No plots: matplotlib is not installed._\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left}
th{background:#f3f3f3}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5rem 1rem}
pre{background:#f6f6f6;padding:.5rem;white-space:pre-wrap}img{max-width:100%}"""


def render_html(
    results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], plots: Mapping[str, bytes]
) -> str:
    e = html.escape
    out = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{e(str(results['task']))} – EMMA eval</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for kind, payload in _sections(results, rows, plots):
        if kind in _HTML_TEXT:
            out.append(_HTML_TEXT[kind].format(e(payload)))
        elif kind == "kv":
            out.append(
                "<ul>"
                + "".join(f"<li><strong>{e(str(k))}</strong>: {e(_short(v))}</li>" for k, v in payload)
                + "</ul>"
            )
        elif kind == "list":
            out.append("<ul>" + "".join(f"<li>{e(_short(x))}</li>" for x in payload) + "</ul>")
        elif kind == "table":
            header, body = payload
            head = "".join(f"<th>{e(str(h))}</th>" for h in header)
            trs = "".join("<tr>" + "".join(f"<td>{e(_short(c))}</td>" for c in row) + "</tr>" for row in body)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(plots[payload]).decode("ascii")
            out.append(f"<p><img alt='{e(payload)}' src='data:image/png;base64,{data}'></p>")
        elif kind == "code":
            out.append(f"<pre>{e(str(payload))}</pre>")
    if not plots:
        out.append("<p><em>No plots: matplotlib is not installed.</em></p>")
    out.append("</body></html>")
    return "\n".join(out)


def write_reports(out_dir: Path, results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[Path]:
    """Write the plots, ``report.md`` and ``report.html`` into ``out_dir``; return the paths written."""
    out_dir = Path(out_dir)
    plots = make_plots(results)
    written = []
    for name, png in plots.items():
        atomic_write(out_dir / name, png, fsync=False)
        written.append(out_dir / name)
    atomic_write(out_dir / MD_FILE, render_markdown(results, rows, plots), fsync=False)
    atomic_write(out_dir / HTML_FILE, render_html(results, rows, plots), fsync=False)
    return written + [out_dir / MD_FILE, out_dir / HTML_FILE]
