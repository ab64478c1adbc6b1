"""Which method to deploy: the one compatible in every cell with the highest mean update gain.

The criterion (BCT) is per cell: M(new->old) > M(old->old) for each direction and K. A method that
fails any cell makes some queries worse than not upgrading at all, so it is not recommended however
high its average. Among the methods that pass everywhere, the mean update gain decides: the share of
the upgrade's benefit obtained without a backfill.
"""

from __future__ import annotations

import math

from xbt.embed import DIRECTION_NAMES
from xbt.eval.matrix import UpgradeMatrix


def matrix_from_results(results: dict) -> UpgradeMatrix:
    """The matrix of a results.json, with each method's description (needs old model, ...) attached."""
    matrix = UpgradeMatrix.from_dict(results["matrix"])
    for name, info in (results.get("methods") or {}).items():
        if name in matrix.methods:
            matrix.method_info[name] = {**info, **matrix.method_info.get(name, {})}
    return matrix


def _gain(matrix: UpgradeMatrix, method: str) -> float:
    g = matrix.mean_gain(method)
    return g if math.isfinite(g) else -math.inf


def _needs_old(matrix: UpgradeMatrix, method: str) -> bool:
    return bool(matrix.method_info.get(method, {}).get("needs_old_model_at_query_time", False))


def _fmt_gain(value: float) -> str:
    return f"{value:.0f}%" if math.isfinite(value) else "undefined"


def recommend(matrix: UpgradeMatrix, allow_old_model_at_query_time: bool = True) -> tuple[str | None, str]:
    """(method, reason), or (None, what to do instead) when no method passes in every cell.

    `allow_old_model_at_query_time=False` leaves out ensembles (e.g. SLERP), for deployments that must
    retire the old encoder."""
    names = [m for m in matrix.methods if allow_old_model_at_query_time or not _needs_old(matrix, m)]
    if not names:
        return None, "no method to choose from: evaluate at least one compatibility method"
    n_cells = len(matrix.cells(names[0]))
    passing = [m for m in names if matrix.all_pass(m)]
    excluded = "" if allow_old_model_at_query_time else " (methods that need the old model at query time left out)"
    if passing:
        ranked = sorted(passing, key=lambda m: _gain(matrix, m), reverse=True)
        best = ranked[0]
        confident = matrix.n_passing(best, confidently=True)
        parts = [
            f"{best} passes the compatibility criterion (new->old above old->old) in all {n_cells} cells"
            f" and has the highest mean update gain, {_fmt_gain(matrix.mean_gain(best))}, of the"
            f" {len(passing)} method(s) that pass everywhere{excluded}."
        ]
        if len(ranked) > 1:
            parts.append(f"Next: {ranked[1]} ({_fmt_gain(matrix.mean_gain(ranked[1]))}).")
        if confident == n_cells:
            parts.append("Every cell passes confidently: the 95% interval of the difference lies above zero.")
        else:
            parts.append(
                f"Only {confident} of {n_cells} cells pass confidently (95% interval above zero); the others pass on"
                " the point estimate alone, so confirm on more evaluation queries before relying on them."
            )
        if _needs_old(matrix, best):
            parts.append("It needs the old model at query time (an ensemble): keep the old encoder serving queries.")
        return best, " ".join(parts)

    closest = max(names, key=lambda m: (matrix.n_passing(m), _gain(matrix, m)))
    failing = [
        f"{DIRECTION_NAMES[d]} R@{k}"
        for d, row in matrix.methods[closest].items() for k, c in row.items() if not c.passes
    ]
    within_noise = all(
        c.vs_old.high >= 0 for row in matrix.methods[closest].values() for c in row.values() if not c.passes
    )
    parts = [
        f"No method passes the compatibility criterion in every cell{excluded}. Closest: {closest}, which passes"
        f" {matrix.n_passing(closest)} of {n_cells} cells (fails {', '.join(failing)}), mean update gain"
        f" {_fmt_gain(matrix.mean_gain(closest))}.",
    ]
    if within_noise:
        parts.append("Its failures are within the noise (their intervals include zero): more evaluation queries may settle them.")
    parts.append(
        "Options: train an XBT compatible model with more image-text pairs and evaluate it here as"
        " compat:PATH; or backfill the gallery with the new model (new->new is the ceiling); or keep the old model."
    )
    return None, " ".join(parts)
