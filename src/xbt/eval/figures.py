"""The report's figures (matplotlib, no pyplot: no global state, no display backend), drawn from a results
document alone, and the small formatting helpers the figures and the report's tables share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from xbt.embed import DIRECTION_NAMES, DIRECTIONS

SHORT = {"t2i": "T2I", "i2t": "I2T"}


def num(value: Any, digits: int = 1, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def mark(cell: dict[str, Any]) -> str:
    return "PASS" if cell["passes_confidently"] else ("pass" if cell["passes"] else "fail")


def matrix_cells(matrix: dict[str, Any]) -> list[tuple[str, str]]:
    return [(d, str(k)) for d in DIRECTIONS for k in matrix["ks"]]


def cell_label(d: str, k: str) -> str:
    return f"{SHORT[d]} R@{k}"


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
    methods, cells = list(matrix["methods"]), matrix_cells(matrix)
    values = np.array([[matrix["methods"][m][d][k]["vs_old"]["value"] for d, k in cells] for m in methods], dtype=float)
    limit = max(1.0, float(np.nanmax(np.abs(values)))) if values.size else 1.0
    fig = _figure(1.3 * len(cells) + 3, 0.5 * len(methods) + 1.8)
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(cells)), [cell_label(d, k) for d, k in cells])
    ax.set_yticks(range(len(methods)), methods)
    for i, m in enumerate(methods):
        for j, (d, k) in enumerate(cells):
            cell = matrix["methods"][m][d][k]
            strong = abs(values[i, j]) > 0.6 * limit
            ax.text(j, i, f"{num(values[i, j], signed=True)}\n{mark(cell)}", ha="center", va="center", fontsize=8,
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
