"""The upgrade report: results.json, report.md and a self-contained report.html, with matplotlib figures.

Everything is rendered from the results document alone (`write_report(results, out_dir)`), so a
report can be regenerated from a results.json without recomputing anything. The Markdown and HTML
come from the same list of blocks, so they always say the same thing.

Marks used in every table: PASS = passes confidently (the 95% interval of M(new->old) - M(old->old)
lies above zero); pass = passes on the point estimate only; fail = does not pass.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xbt.eval.matrix import DIRECTION_NAMES, DIRECTIONS, UpgradeMatrix

FIGURES = "figures"
SHORT = {"t2i": "T2I", "i2t": "I2T"}
LEGEND = (
    "PASS = compatible with confidence (the 95% interval of new->old minus old->old lies above zero); "
    "pass = compatible on the point estimate only (the interval includes zero); fail = not compatible."
)


# ----- small helpers ------------------------------------------------------------------------------
def _num(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _interval(e: dict[str, Any], signed: bool = False) -> str:
    if e["value"] is None:
        return "n/a"
    return f"{_num(e['value'], signed=signed)} [{_num(e['low'], signed=signed)}, {_num(e['high'], signed=signed)}]"


def mark(cell: dict[str, Any]) -> str:
    return "PASS" if cell["passes_confidently"] else ("pass" if cell["passes"] else "fail")


def _cells(matrix: dict[str, Any]) -> list[tuple[str, str]]:
    return [(d, str(k)) for d in DIRECTIONS for k in matrix["ks"]]


def _cell_label(d: str, k: str) -> str:
    return f"{SHORT[d]} R@{k}"


def _cost(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


# ----- the document model: blocks rendered to Markdown and HTML -------------------------------------------
@dataclass
class Block:
    kind: str  # heading | text | table | figure | list
    content: Any
    level: int = 2


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            out.append("#" * b.level + " " + b.content)
        elif b.kind == "text":
            out.append(b.content)
        elif b.kind == "list":
            out.append("\n".join(f"- {item}" for item in b.content))
        elif b.kind == "table":
            header, rows = b.content
            out.append("| " + " | ".join(_md_escape(h) for h in header) + " |")
            out[-1] += "\n|" + "|".join("---" for _ in header) + "|"
            out[-1] += "".join("\n| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows)
        elif b.kind == "figure":
            path, caption = b.content
            out.append(f"![{caption}]({path})\n\n*{caption}*")
        out.append("")
    return "\n".join(out)


def _inline_md(text: str) -> str:
    """The two inline forms the report uses, **bold** and `code`, for HTML."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def to_html(blocks: Sequence[Block], title: str, figure_dir: Path) -> str:
    """One self-contained page: figures are embedded as base64 PNG."""
    body: list[str] = []
    for b in blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{html.escape(b.content)}</h{b.level}>")
        elif b.kind == "text":
            body.append(f"<p>{_inline_md(b.content)}</p>")
        elif b.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline_md(i)}</li>" for i in b.content) + "</ul>")
        elif b.kind == "table":
            header, rows = b.content
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
            cells = "".join(
                "<tr>" + "".join(f'<td class="{_css(c)}">{html.escape(str(c))}</td>' for c in row) + "</tr>" for row in rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif b.kind == "figure":
            path, caption = b.content
            data = base64.b64encode((figure_dir / Path(path).name).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;"
        "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        "td.pass-confident{background:#d4f0d4}td.pass-point{background:#f6f0c8}td.fail{background:#f6d4d4}"
        "img{max-width:100%}figcaption{font-style:italic;color:#555}code{background:#f3f3f3;padding:0 3px}"
    )
    return (
        f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _css(cell: str) -> str:
    text = str(cell)
    if text.endswith(" PASS"):
        return "pass-confident"
    if text.endswith(" pass"):
        return "pass-point"
    if text.endswith(" fail"):
        return "fail"
    return ""


# ----- tables -----------------------------------------------------------------------------------------------
def summary_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Recall per cell for old->old, new->new and every method, with each method's difference and mark."""
    matrix = results["matrix"]
    cells = _cells(matrix)
    header = ["system"] + [_cell_label(d, k) for d, k in cells]
    rows = [
        ["old->old (no upgrade)"] + [_num(matrix["old_old"][d][k]["value"]) for d, k in cells],
        ["new->new (full backfill)"] + [_num(matrix["new_new"][d][k]["value"]) for d, k in cells],
    ]
    for name, table in matrix["methods"].items():
        rows.append(
            [name]
            + [f"{_num(table[d][k]['recall']['value'])} ({_num(table[d][k]['vs_old']['value'], signed=True)}) {mark(table[d][k])}"
               for d, k in cells]
        )
    return header, rows


def format_summary(results: dict[str, Any]) -> str:
    """The summary table as plain aligned text, for the terminal."""
    header, rows = summary_table(results)
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    n = results["matrix"]["n_queries"]
    return "\n".join(
        [line(header), line(["-" * w for w in widths]), *map(line, rows), "",
         f"Recall@K in percent; (difference with old->old, points) and mark per method cell. "
         f"Queries: T2I {n['t2i']}, I2T {n['i2t']}.", LEGEND]
    )


def tower_maps_cell(info: dict[str, Any]) -> str:
    """Which map each query tower uses: one shared map, or (a gallery-modality method) one per tower."""
    maps = (info.get("details") or {}).get("query_maps")
    if not maps or maps.get("shared", True):
        return "one map, both towers"
    return (f"text queries: {maps['text']['kind']}, {maps['text']['fitted_on']}; "
            f"image queries: {maps['image']['kind']}, {maps['image']['fitted_on']}")


GALLERY_MODALITY_NOTE = (
    "Gallery-modality methods (suffix -gallery) map each query tower with the map fitted on the modality its "
    "queries search: text queries search the old image gallery, so the text tower's map is fitted on images "
    "(new image -> old image); image queries search the old captions, so the image tower's map is fitted on "
    "texts. For a gallery image g ~ R i_new, <R t, g> ~ <t, i_new>: the new model's own cross-modal score. "
    "Neither fit needs a caption: images (or texts) embedded by both models are enough.")


def methods_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    matrix = UpgradeMatrix.from_dict(results["matrix"])
    batch = [str(b) for b in results.get("protocol", {}).get("cost_batch_sizes", [1, 256])]
    header = ["method", "needs old model at query time", "fitted on", "query map per tower", "cells passing (confident / point)",
              "mean update gain"] + [f"us/query @ batch {b}" for b in batch]
    rows = []
    for name in matrix.methods:
        info = results.get("methods", {}).get(name, {})
        cost = info.get("query_cost_us", {})
        n_cells = len(matrix.cells(name))
        rows.append([
            name, "yes" if info.get("needs_old_model_at_query_time") else "no", str(info.get("fits_on", "?")),
            tower_maps_cell(info),
            f"{matrix.n_passing(name, confidently=True)} / {matrix.n_passing(name)} of {n_cells}",
            f"{_num(matrix.mean_gain(name), 0)}%",
        ] + [_cost(cost.get(b)) for b in batch])
    return header, rows


def difference_table(results: dict[str, Any], what: str) -> tuple[list[str], list[list[str]]]:
    """Per method and cell: the difference with old->old (`vs_old`, points) or the update gain (`gain`, %)."""
    matrix = results["matrix"]
    cells = _cells(matrix)
    header = ["method"] + [_cell_label(d, k) for d, k in cells]
    rows = [["new->new (ceiling)"] + [_interval(matrix["new_new_vs_old_old"][d][k], signed=True) for d, k in cells]] if what == "vs_old" else []
    for name, table in matrix["methods"].items():
        if what == "vs_old":
            rows.append([name] + [f"{_interval(table[d][k]['vs_old'], signed=True)} {mark(table[d][k])}" for d, k in cells])
        else:
            rows.append([name] + [_interval(table[d][k]["gain"]) for d, k in cells])
    return header, rows


def recall_table(results: dict[str, Any], direction: str) -> tuple[list[str], list[list[str]]]:
    matrix = results["matrix"]
    ks = [str(k) for k in matrix["ks"]]
    header = ["system"] + [f"R@{k}" for k in ks]
    rows = [
        ["old->old"] + [_interval(matrix["old_old"][direction][k]) for k in ks],
        ["new->new"] + [_interval(matrix["new_new"][direction][k]) for k in ks],
    ]
    rows += [[name] + [_interval(t[direction][k]["recall"]) for k in ks] for name, t in matrix["methods"].items()]
    return header, rows


def crossval_tables(results: dict[str, Any]) -> list[Block]:
    """The cross-validation section: how the pooled figures were made, each method's mean gain with its
    interval and seed spread, and the paired differences asked for."""
    cv = results.get("crossval")
    if not cv:
        return []
    matrix = UpgradeMatrix.from_dict(results["matrix"])
    spread = cv.get("seed_spread", {}).get("methods", {})
    n = cv["pooled_queries"]
    blocks = [
        Block("heading", "Cross-validation"),
        Block("text", f"{cv['folds']} folds over the Tux Paint caption groups, seeds {', '.join(map(str, cv['seeds']))} (each "
                      "seed deals the folds anew and reseeds every training); per fold, the old and new models, every peer "
                      "and every XBT variant are trained without that fold's items, and every choice is made on the fold's "
                      f"val split. Pooled: {n['t2i']} text and {n['i2t']} image queries, each query's hit averaged over the "
                      f"seeds; galleries of {min(cv['gallery_per_fold'])}-{max(cv['gallery_per_fold'])} items per fold (recalls "
                      "are higher than on a 299-item gallery). Interval: paired bootstrap over the pooled queries; seed "
                      "spread: standard deviation over seeds of each seed's pooled figure."),
    ]
    header = ["method", "mean update gain", "seed spread (sd)", "per seed", "cells passing (confident / point)"]
    rows = []
    gain = {name: matrix.mean_gain(name) for name in matrix.methods}
    for name in sorted(matrix.methods, key=lambda m: -gain[m] if math.isfinite(gain[m]) else math.inf):
        per_seed = spread.get(name, {}).get("mean_gain", {})
        one_seed = len(per_seed.get("values", [])) < 2  # a spread over one seed is not a figure: n/a, not 0.0
        rows.append([name, f"{_num(matrix.mean_gain(name), 1)}%", "n/a" if one_seed else f"{_num(per_seed.get('sd'), 1)}",
                     ", ".join(_num(v, 1) for v in per_seed.get("values", [])),
                     f"{matrix.n_passing(name, confidently=True)} / {matrix.n_passing(name)} of {len(matrix.cells(name))}"])
    blocks.append(Block("table", (header, rows)))
    if cv.get("differences"):
        header = ["a - b", "mean update gain difference (points, 95% paired interval)", "above zero"]
        rows = [[f"{d['a']} - {d['b']}", _interval(d["mean_gain_difference"], signed=True), "yes" if d["above_zero"] else "no"]
                for d in cv["differences"]]
        blocks += [Block("heading", "Paired differences", 3), Block("table", (header, rows))]
    return blocks


def gallery_size_tables(results: dict[str, Any], figure: str | None) -> list[Block]:
    """With gallery extras: how the figures move with the gallery's size (each method's mean update gain,
    with its interval and seed spread, at every size searched), the paired differences at each size, and
    the near-duplicate check of the extras against the evaluation items."""
    cv = results.get("crossval") or {}
    sizes = cv.get("gallery_sizes")
    if not sizes:
        return []
    import numpy as np

    extra = (results.get("data") or {}).get("gallery_extra") or {}

    def size_name(entry: dict[str, Any]) -> str:
        gi, gt = entry["gallery_images"], entry["gallery_texts"]
        images = f"{gi['min']:,}" if gi["min"] == gi["max"] else f"{gi['min']:,}-{gi['max']:,}"
        texts = f"{gt['min']:,}" if gt["min"] == gt["max"] else f"{gt['min']:,}-{gt['max']:,}"
        return f"{images} img / {texts} txt"

    blocks = [
        Block("heading", "Gallery size"),
        Block("text", f"Every gallery of every fold also holds gallery extras (`{extra.get('source')}`: {extra.get('n_images', 0):,} images "
                      f"and {extra.get('n_texts', 0):,} texts, never queries, never fitted or tuned on): old->old and every method "
                      "search the old model's galleries plus the extras embedded by the old model, the new->new ceiling the new "
                      "model's plus the extras embedded by the new model. Each fold is searched at its own size, at the sizes "
                      "below (the first extras of one seeded order, the same for every fold) and with every extra; NNN's bank "
                      "and alpha are those of the fold's training and val data at every size (each extra's bias comes from "
                      "the same bank). The headline matrix above is the largest size."),
    ]
    matrices = [UpgradeMatrix.from_dict(entry["matrix"] | {"method_info": {}}) for entry in sizes]
    header = ["system"] + [size_name(e) for e in sizes]
    rows = [["old->old mean R@1/5/10 (T2I, I2T)"] + [
        " / ".join(_num(np.mean([m.old_old[d][k].value for k in m.ks]), 1) for d in DIRECTIONS) for m in matrices]]
    rows.append(["new->new mean R@1/5/10 (T2I, I2T)"] + [
        " / ".join(_num(np.mean([m.new_new[d][k].value for k in m.ks]), 1) for d in DIRECTIONS) for m in matrices])
    last = matrices[-1]
    order = sorted(last.methods, key=lambda n: -last.mean_gain(n) if math.isfinite(last.mean_gain(n)) else math.inf)
    for name in order:
        cells = []
        for entry, m in zip(sizes, matrices):
            sd = entry["seed_spread"]["methods"].get(name, {}).get("mean_gain", {})
            spread = f" (sd {_num(sd.get('sd'), 1)})" if len(sd.get("values", [])) > 1 else ""
            t2i = _num(np.nanmean([m.methods[name]["t2i"][k].gain.value for k in m.ks]), 1)
            i2t = _num(np.nanmean([m.methods[name]["i2t"][k].gain.value for k in m.ks]), 1)
            cells.append(f"{_num(m.mean_gain(name), 1)}%{spread}; T2I {t2i} / I2T {i2t}")
        rows.append([name] + cells)
    blocks += [Block("heading", "Mean update gain by gallery size (seed spread; per direction)", 3), Block("table", (header, rows))]
    if figure:
        blocks.append(Block("figure", (figure, "Mean update gain against gallery size")))
    # R@1 with intervals for every method at each size
    for d in DIRECTIONS:
        header = ["system"] + [size_name(e) for e in sizes]
        rows = [["old->old"] + [_interval(m.old_old[d][1].to_dict()) for m in matrices],
                ["new->new"] + [_interval(m.new_new[d][1].to_dict()) for m in matrices]]
        rows += [[name] + [_interval(m.methods[name][d][1].recall.to_dict()) for m in matrices] for name in order]
        blocks += [Block("heading", f"{DIRECTION_NAMES[d]} R@1 by gallery size (%, 95% interval)", 3), Block("table", (header, rows))]
    if any(entry.get("differences") for entry in sizes):
        header = ["a - b"] + [size_name(e) for e in sizes]
        rows = []
        for i, diff in enumerate(sizes[0]["differences"]):
            rows.append([f"{diff['a']} - {diff['b']}"] + [
                _interval(e["differences"][i]["mean_gain_difference"], signed=True) + (" *" if e["differences"][i]["above_zero"] else "")
                for e in sizes])
        blocks += [Block("heading", "Paired differences of mean update gain by gallery size (points, 95% interval; * above zero)", 3),
                   Block("table", (header, rows))]
    near = cv.get("near_duplicates")
    if near:
        items = []
        for side in ("images", "texts"):
            n = near[side]
            items.append(f"{side}: highest cosine of any extra to any evaluation item {_num(n['max_cosine'], 3)} (median of the "
                         f"folds' medians {_num(n['median_of_fold_medians'], 3)}); extras at or above {near['threshold']}: "
                         f"{sum(n['at_or_above_per_fold'])} over {len(n['at_or_above_per_fold'])} folds"
                         + (f", left out of those folds' galleries ({sum(n['dropped_per_fold'])})" if n.get("dropped_per_fold") else "")
                         + ("; e.g. " + "; ".join(f"`{Path(str(x['item_name'])).name}` ~ `{Path(str(x['reference_name'])).name}`"
                                                  f" ({_num(x['cosine'], 3)})" for x in n["examples"][:3]) if n["examples"] else ""))
        info = extra.get("info") or {}
        checks = [f"{src}: {json.dumps(v.get('removed'))}" for src, v in info.items() if isinstance(v, dict) and v.get("removed")]
        blocks += [Block("heading", "Near-duplicates of evaluation items", 3),
                   Block("text", "Exact checks when the set was built (no extra shares its bytes with a testbed item, no extra "
                                 "text equals a testbed caption once normalised; removed: " + ("; ".join(checks) or "none") +
                                 "), and per fold, cosine with the fold's new model against that fold's evaluation items:"),
                   Block("list", items)]
    timings = cv.get("timings_s")
    if timings:
        blocks += [Block("heading", "Time per step, summed over folds (s)", 3),
                   Block("text", ", ".join(f"{k} {v:,.0f}" for k, v in timings.items()))]
    return blocks


def gallery_size_figure(results: dict[str, Any], path: Path) -> bool:
    """Each method's mean update gain against the gallery's size (log scale; items per gallery), in two
    panels: the methods as they are, and with NNN calibration (one colour per method in both); shaded: the
    range over seeds. Methods whose gain is negative at every size (no adaptation) are left out, named in
    the title."""
    sizes = (results.get("crossval") or {}).get("gallery_sizes")
    if not sizes:
        return False
    import numpy as np

    x = np.array([(e["gallery_images"]["min"] + e["gallery_images"]["max"]) / 2 for e in sizes], dtype=float)

    def gains(name: str) -> np.ndarray:
        return np.array([e["mean_gain"].get(name) if e["mean_gain"].get(name) is not None else np.nan for e in sizes], dtype=float)

    names = list(sizes[-1]["mean_gain"])
    left_out = sorted({n.removesuffix("+nnn") for n in names if not (gains(n) > 0).any()})
    names = [n for n in names if n.removesuffix("+nnn") not in left_out]
    bases = sorted({n.removesuffix("+nnn") for n in names}, key=lambda b: -np.nan_to_num(gains(b)[-1], nan=-1e9))
    colours = {b: _PALETTE[i % len(_PALETTE)] for i, b in enumerate(bases)}
    fig = _figure(11.5, 5.0)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, calibrated in zip(axes, (False, True)):
        for base in bases:
            name = base + "+nnn" if calibrated else base
            if name not in names:
                continue
            y = gains(name)
            values = [e["seed_spread"]["methods"].get(name, {}).get("mean_gain", {}).get("values", []) for e in sizes]
            ax.plot(x, y, "-", marker="o", markersize=3, linewidth=1.4, color=colours[base], label=base)
            if all(len(v) > 1 for v in values):
                ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=colours[base], alpha=0.1, linewidth=0)
        ax.set_xscale("log")
        ax.set_xlabel("gallery size (items per fold's image gallery; text gallery alike)")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title("with NNN calibration (+nnn)" if calibrated else "as fitted (no calibration)", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].set_ylabel("mean update gain (%), pooled over folds and seeds")
    axes[1].legend(fontsize=7, loc="upper right", ncol=2)
    fig.suptitle("Mean update gain against gallery size (shaded: range over seeds)"
                 + (f"; not drawn (negative at every size): {', '.join(left_out)}" if left_out else ""), fontsize=10)
    _save(fig, path)
    return True


#: Distinct colours for up to 20 methods (matplotlib's tab20, dark shades first).
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
            "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"]


# ----- figures ---------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: Path) -> None:
    fig.savefig(path, format="png", metadata={"Software": None})


def heatmap_figure(results: dict[str, Any], path: Path) -> None:
    """Methods x cells, colour = new->old minus old->old (points), with the pass mark in each cell."""
    import numpy as np

    matrix = results["matrix"]
    methods, cells = list(matrix["methods"]), _cells(matrix)
    values = np.array([[matrix["methods"][m][d][k]["vs_old"]["value"] for d, k in cells] for m in methods], dtype=float)
    limit = max(1.0, float(np.nanmax(np.abs(values)))) if values.size else 1.0
    fig = _figure(1.3 * len(cells) + 3, 0.5 * len(methods) + 1.8)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(cells)), [_cell_label(d, k) for d, k in cells])
    ax.set_yticks(range(len(methods)), methods)
    for i, m in enumerate(methods):
        for j, (d, k) in enumerate(cells):
            cell = matrix["methods"][m][d][k]
            strong = abs(values[i, j]) > 0.6 * limit
            ax.text(j, i, f"{_num(values[i, j], signed=True)}\n{mark(cell)}", ha="center", va="center", fontsize=8,
                    color="white" if strong else "black", fontweight="bold" if cell["passes_confidently"] else "normal")
    fig.colorbar(image, ax=ax, label="new->old minus old->old (points)")
    ax.set_title("Compatibility matrix (PASS: interval above 0; pass: point estimate only)", fontsize=10)
    _save(fig, path)


def recall_figure(results: dict[str, Any], path: Path) -> None:
    """Recall@K bars per system and direction, with 95% bootstrap error bars."""
    import numpy as np
    from matplotlib import colormaps

    matrix = results["matrix"]
    ks = [str(k) for k in matrix["ks"]]
    systems = [("old->old", matrix["old_old"]), ("new->new", matrix["new_new"])]
    systems += [(m, {d: {k: t[d][k]["recall"] for k in ks} for d in DIRECTIONS}) for m, t in matrix["methods"].items()]
    fig = _figure(max(8.0, 1.6 * len(ks) * len(DIRECTIONS) + 0.25 * len(systems) * len(ks)), 4.2)
    axes = fig.subplots(1, len(DIRECTIONS), sharey=True)
    width = 0.8 / len(systems)
    colours = colormaps["tab10"].colors
    for ax, d in zip(np.atleast_1d(axes), DIRECTIONS):
        for i, (name, table) in enumerate(systems):
            values = [table[d][k]["value"] for k in ks]
            low = [v - (table[d][k]["low"] if table[d][k]["low"] is not None else v) for v, k in zip(values, ks)]
            high = [(table[d][k]["high"] if table[d][k]["high"] is not None else v) - v for v, k in zip(values, ks)]
            x = np.arange(len(ks)) + (i - (len(systems) - 1) / 2) * width
            ax.bar(x, values, width, yerr=[low, high], capsize=2, label=name, color=colours[i % len(colours)],
                   hatch="//" if i < 2 else None, edgecolor="black" if i < 2 else None, linewidth=0.5)
        ax.set_xticks(range(len(ks)), [f"R@{k}" for k in ks])
        ax.set_title(DIRECTION_NAMES[d])
        ax.set_ylabel("recall (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    _save(fig, path)


def data_efficiency_figure(results: dict[str, Any], path: Path) -> bool:
    """Recall at the smallest K against the number of training pairs, per direction; False if no curve."""
    import numpy as np

    rows = results.get("data_efficiency") or []
    if not rows:
        return False
    matrix = results["matrix"]
    k = min(int(r["k"]) for r in rows)
    fig = _figure(10, 4)
    axes = fig.subplots(1, len(DIRECTIONS), sharey=True)
    for ax, d in zip(np.atleast_1d(axes), DIRECTIONS):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((r for r in rows if r["method"] == method and r["direction"] == d and int(r["k"]) == k),
                         key=lambda r: r["n_pairs"])
            if not pts:
                continue
            n = [r["n_pairs"] for r in pts]
            (line,) = ax.plot(n, [r["recall"] for r in pts], marker="o", label=method)
            ax.fill_between(n, [r["low"] if r["low"] is not None else r["recall"] for r in pts],
                            [r["high"] if r["high"] is not None else r["recall"] for r in pts],
                            alpha=0.12, color=line.get_color())
        for label, table, style in (("old->old", "old_old", "--"), ("new->new", "new_new", ":")):
            value = matrix[table].get(d, {}).get(str(k), {}).get("value")
            if value is not None:
                ax.axhline(value, color="black", linestyle=style, linewidth=1, label=label)
        sizes = sorted({r["n_pairs"] for r in rows})
        if sizes[0] == 0:  # a point without pairs (text only): linear near zero, logarithmic beyond
            ax.set_xscale("symlog", linthresh=max(1, min(n for n in sizes if n > 0) if len(sizes) > 1 else 1))
        else:
            ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training image-text pairs")
        ax.set_ylabel(f"R@{k} (%)")
        ax.set_title(DIRECTION_NAMES[d])
        ax.grid(alpha=0.3)
    fig.legend(*np.atleast_1d(axes)[0].get_legend_handles_labels(), loc="outside right upper", fontsize=8)
    _save(fig, path)
    return True


# ----- the report ------------------------------------------------------------------------------------------
def precision_line(protocol: dict[str, Any]) -> str:
    """Which device and precision the encoders ran at (results written before issue 16 do not say: fp32, CPU)."""
    if "precision" not in protocol:
        return "encoders: precision and device not recorded (results from an older xbt: fp32 on the CPU)"
    line = f"encoders: {protocol['precision']} on {protocol.get('device', '?')}"
    if "old_precision" in protocol:
        line += f" (old model: {protocol['old_precision']} on {protocol.get('old_device', '?')})"
    if protocol["precision"] != "fp32" or protocol.get("old_precision", "fp32") != "fp32":
        line += "; mixed precision (autocast) changes vectors slightly, never the weights or the embedding space"
    return line


def report_blocks(results: dict[str, Any], figures: dict[str, str], results_path: str = "results.json") -> list[Block]:
    models, data, protocol = results.get("models", {}), results.get("data", {}), results.get("protocol", {})
    old, new = models.get("old", {}), models.get("new", {})
    n_queries = results["matrix"]["n_queries"]
    blocks = [
        Block("heading", f"Upgrade report: {new.get('spec', 'new')} queries against a {old.get('spec', 'old')} gallery", 1),
        Block("text", f"Written by `{results.get('command') or 'xbt evaluate'}` on {results.get('created', '?')}; "
                      f"results in `{results_path}` (schema {results.get('schema', '?')})."),
        Block("heading", "Setup"),
        Block("list", [
            f"old model: `{old.get('spec')}` (space `{old.get('space_id')}`); the gallery stays embedded by it",
            f"new model: `{new.get('spec')}` (space `{new.get('space_id')}`)",
            _data_line("evaluation", data.get("eval", {})) + f"; queries: T2I {n_queries['t2i']}, I2T {n_queries['i2t']}",
            _data_line("training pairs (fitting)", data.get("fit_pairs", {})),
            f"unlabeled images (image-side fits, captions not used): {data.get('fit_images', {}).get('n_images', 0)}"
            + _from(data.get("fit_images", {}).get("source")),
            f"training texts (fitting): {data.get('fit_texts', {}).get('n_texts', 0)}"
            + _from(data.get("fit_texts", {}).get("source")) + " (plus the training pairs' captions)",
            _data_line("support split (model selection: SLERP's weight, affine's ridge, adapter's epochs)", data.get("support", {})),
            _gallery_line(data.get("gallery_extra"), protocol),
            f"protocol: exact search; Recall@{', '.join(map(str, protocol.get('ks', [])))}; a text query is correct if its"
            " image is in the top K, an image query if any of its captions is; ties count against the query; 95% "
            f"percentile bootstrap over queries ({protocol.get('n_resamples', '?')} resamples, paired across methods)",
            "update gain = (new->old - old->old) / (new->new - old->old): the share of the upgrade's benefit had without"
            " a backfill",
            precision_line(protocol),
        ]),
    ]
    rec = results.get("recommendation") or {}
    blocks += [Block("heading", "Recommendation"),
               Block("text", (f"**{rec['method']}**. " if rec.get("method") else "**No method qualifies.** ") + str(rec.get("reason", "")))]
    blocks += crossval_tables(results)
    blocks += gallery_size_tables(results, figures.get("gallery_size"))
    blocks += [Block("heading", "Methods"), Block("table", methods_table(results)),
               Block("text", "Query-time cost: microseconds per query added on top of the encoder (best of repeated "
                             "runs on one thread of the machine that ran the evaluation). A method that needs the old "
                             "model at query time also runs the old encoder for every query.")]
    if any(tower_maps_cell(info) != "one map, both towers" for info in results.get("methods", {}).values()):
        blocks.append(Block("text", GALLERY_MODALITY_NOTE))
    blocks += [Block("heading", "Summary"), Block("table", summary_table(results)), Block("text", LEGEND)]
    blocks += [Block("heading", "Compatibility: new->old minus old->old (points, 95% interval)"),
               Block("table", difference_table(results, "vs_old")), Block("figure", (figures["heatmap"], "Compatibility matrix"))]
    blocks += [Block("heading", "Update gain (%, 95% interval)"), Block("table", difference_table(results, "gain"))]
    blocks.append(Block("heading", "Recall@K (%, 95% interval)"))
    for d in DIRECTIONS:
        blocks += [Block("heading", DIRECTION_NAMES[d], 3), Block("table", recall_table(results, d))]
    blocks.append(Block("figure", (figures["recall"], "Recall@K per method and direction, 95% bootstrap error bars")))
    if "data_efficiency" in figures:
        blocks += [Block("heading", "Data efficiency"),
                   Block("text", "Each method refitted on a seeded random subset of the training pairs (text corpus kept "
                                 "whole); shaded: 95% interval."),
                   Block("figure", (figures["data_efficiency"], "Recall against the number of training pairs"))]
    if results.get("warnings"):
        blocks += [Block("heading", "Warnings"), Block("list", list(results["warnings"]))]
    return blocks


def _gallery_line(extra: dict[str, Any] | None, protocol: dict[str, Any]) -> str:
    sizes = (f"{protocol['gallery_images']:,} images, {protocol['gallery_texts']:,} texts"
             if "gallery_images" in protocol else "the evaluation items")
    if not extra:
        return f"galleries searched: {sizes} (the evaluation items only)"
    return (f"galleries searched: {sizes}, of which gallery extras {extra.get('n_images', 0):,} images and"
            f" {extra.get('n_texts', 0):,} texts" + _from(extra.get("source")) + " (never queries; in every system's galleries)")


def _from(source: Any) -> str:
    return f" from `{source}`" if source else ""


def _data_line(what: str, info: dict[str, Any]) -> str:
    if not info or not info.get("n_pairs"):
        return f"{what}: none"
    return f"{what}: {info['n_pairs']} pairs, {info['n_images']} images" + _from(info.get("source"))


def write_report(results: dict[str, Any], out_dir: str | Path, markdown_copy: str | Path | None = None) -> dict[str, Path]:
    """results.json, report.md (figures beside it, in figures/) and a self-contained report.html.
    `markdown_copy`: also write the Markdown report there (e.g. docs/results/testbed.md), its figure
    links made relative to that file's folder."""
    out = Path(out_dir)
    (out / FIGURES).mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["results"].write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    figures = {"heatmap": f"{FIGURES}/compatibility.png", "recall": f"{FIGURES}/recall.png"}
    heatmap_figure(results, out / figures["heatmap"])
    recall_figure(results, out / figures["recall"])
    if data_efficiency_figure(results, out / FIGURES / "data_efficiency.png"):
        figures["data_efficiency"] = f"{FIGURES}/data_efficiency.png"
    if gallery_size_figure(results, out / FIGURES / "gallery_size.png"):
        figures["gallery_size"] = f"{FIGURES}/gallery_size.png"
    blocks = report_blocks(results, figures)
    paths["markdown"].write_text(to_markdown(blocks))
    title = f"xbt upgrade report: {results.get('models', {}).get('new', {}).get('spec', 'new')}"
    paths["html"].write_text(to_html(blocks, title, out / FIGURES))
    if markdown_copy:
        copy = Path(markdown_copy)
        copy.parent.mkdir(parents=True, exist_ok=True)
        relative = {k: os.path.relpath(out / v, copy.parent) for k, v in figures.items()}
        copy.write_text(to_markdown(report_blocks(results, relative, os.path.relpath(paths["results"], copy.parent))))
        paths["markdown_copy"] = copy
    for name, rel in figures.items():
        paths[f"figure:{name}"] = out / rel
    return paths
