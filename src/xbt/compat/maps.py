"""Query maps: the small torch modules that carry new-model unit vectors into the old space.

Every upgrade method ends as one of these inside a `CompatibleModel` (compat/model.py): XBT's trained
`Projection`, and the peers' closed-form fits (`LinearMap` for Procrustes, the ridge affine map and
no adaptation; `ResidualMap` for the Drift-Adapter-style MLP; `SlerpMap` for SLERP, an ensemble that
also takes the old model's query; `OldQueryBlend`, XBT's projection blended with the old model's query). A map is saved as safetensors + its `config()` and rebuilt by
`build_map(config)`, so every method has one artifact format and one way to be applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xbt.errors import InputError
from xbt.models.device import model_device


class QueryMap(nn.Module):
    """new-space unit vectors (n, in_dim) [+ the old model's unit vectors (n, out_dim)] -> old-space
    vectors (n, out_dim), not yet normalised. Subclasses set `kind` and implement `forward`."""

    kind: str = "map"
    needs_old_query: bool = False  # an ensemble: the old model must encode every query too

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.in_dim, self.out_dim = int(in_dim), int(out_dim)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "out_dim": self.out_dim}

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.inference_mode()
    def apply(self, new: Any, old: Any | None = None) -> np.ndarray:
        """NumPy in, normalised float32 NumPy out: the evaluation's fast path on cached features."""
        if self.needs_old_query and old is None:
            raise InputError(f"a {self.kind} map is an ensemble: it needs the old model's vectors of the same queries")
        was_training = self.training
        self.eval()
        try:
            device = model_device(self)
            new_t = F.normalize(torch.as_tensor(np.asarray(new, dtype=np.float32), device=device), dim=-1)
            old_t = (F.normalize(torch.as_tensor(np.asarray(old, dtype=np.float32), device=device), dim=-1)
                     if self.needs_old_query else None)
            with torch.inference_mode():
                return F.normalize(self(new_t, old_t).float(), dim=-1).cpu().numpy()
        finally:
            self.train(was_training)


class LinearMap(QueryMap):
    """x W (+ b): Procrustes (an orthogonal W, no bias), the ridge affine map, or no adaptation (W = a
    padding / truncating identity). W is stored as (in_dim, out_dim), the orientation the fits produce."""

    kind = "linear"

    def __init__(self, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__(in_dim, out_dim)
        self.has_bias = bool(bias)
        # cpu-only: built on the CPU like every nn.Module parameter, moved with the module (.to / configure)
        self.weight = nn.Parameter(torch.zeros(in_dim, out_dim), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_dim), requires_grad=False) if bias else None  # cpu-only: as above

    @classmethod
    def from_arrays(cls, weight: np.ndarray, bias: np.ndarray | None = None) -> LinearMap:
        weight = np.asarray(weight, dtype=np.float32)
        linear = cls(weight.shape[0], weight.shape[1], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                linear.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
        return linear

    def config(self) -> dict[str, Any]:
        return super().config() | {"bias": self.has_bias}

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        y = new @ self.weight
        return y + self.bias if self.bias is not None else y


class ResidualMLP(nn.Module):
    """x + MLP(x), the last layer starting at zero: it starts as the identity and can only add to it."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class ResidualMap(QueryMap):
    """R x + MLP(R x): a rotation into the old space, then a residual MLP there (the query adapter)."""

    kind = "residual"

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, dropout: float = 0.0,
                 mlp: ResidualMLP | None = None):
        """`mlp`: an already trained one (a fit wraps its own without drawing fresh random weights,
        which would move the global RNG that the fit's own training is seeded on)."""
        super().__init__(in_dim, out_dim)
        self.hidden, self.dropout = int(hidden), float(dropout)
        self.rotation = LinearMap(in_dim, out_dim)
        self.mlp = mlp if mlp is not None else ResidualMLP(out_dim, hidden, dropout)

    def config(self) -> dict[str, Any]:
        return super().config() | {"hidden": self.hidden, "dropout": self.dropout}

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(self.rotation(new))


def slerp(a: torch.Tensor, b: torch.Tensor, weight: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Row-wise spherical interpolation between unit vectors a (weight 0) and b (weight 1), computed in
    `dtype` (float64 by default; the ONNX export computes in float32, which onnxruntime's arccos needs)."""
    a, b = F.normalize(a.to(dtype), dim=-1), F.normalize(b.to(dtype), dim=-1)
    cos = (a * b).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    near = sin < 1e-6  # (anti)parallel: the arc is undefined, fall back to the straight line
    safe = torch.where(near, torch.ones_like(sin), sin)
    wa = torch.where(near, torch.full_like(sin, 1 - weight), torch.sin((1 - weight) * theta) / safe)
    wb = torch.where(near, torch.full_like(sin, weight), torch.sin(weight * theta) / safe)
    return wa * a + wb * b


class SlerpMap(QueryMap):
    """slerp(old(x), R new(x), w): the old model's query and the rotated new one, interpolated on the
    sphere (w = 0: the old model alone; w = 1: Procrustes alone). An ensemble."""

    kind = "slerp"
    needs_old_query = True

    def __init__(self, in_dim: int, out_dim: int, weight: float = 0.5):
        super().__init__(in_dim, out_dim)
        if not 0 <= weight <= 1:
            raise InputError(f"slerp: the weight must lie in [0, 1], not {weight}")
        self.weight = float(weight)
        self.rotation = LinearMap(in_dim, out_dim)

    def config(self) -> dict[str, Any]:
        return super().config() | {"weight": self.weight}

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        if old is None or old.shape != (new.shape[0], self.out_dim):
            raise InputError(f"slerp needs the old model's {self.out_dim}-d vectors of the same {new.shape[0]} queries")
        return slerp(old, self.rotation(new), self.weight).to(new.dtype)


class Projection(QueryMap):
    """XBT's trained projection. `linear`: one affine map. `mlp`: the affine map plus a residual MLP
    whose last layer starts at zero, so it starts as the linear map and can only add to it."""

    kind = "projection"

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden: int = 1024, dropout: float = 0.0):
        super().__init__(in_dim, out_dim)
        if kind not in ("linear", "mlp"):
            raise ValueError(f"projection kind must be 'linear' or 'mlp', not {kind!r}")
        self.projection_kind, self.hidden, self.dropout = kind, hidden, dropout
        self.linear = nn.Linear(in_dim, out_dim)
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)

    def config(self) -> dict[str, Any]:
        return super().config() | {"projection_kind": self.projection_kind, "hidden": self.hidden, "dropout": self.dropout}

    @torch.no_grad()
    def init_least_squares(self, new: torch.Tensor, old: torch.Tensor, ridge: float = 1e-2) -> None:
        """Closed-form ridge fit of the linear part on paired (new, old) vectors, e.g. a text corpus."""
        x = torch.cat([new, torch.ones(new.shape[0], 1, dtype=new.dtype, device=new.device)], dim=1).double()
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        w = torch.linalg.solve(gram, x.T @ old.to(x.device).double())
        w = w.to(self.linear.weight.device)
        self.linear.weight.copy_(w[:-1].T.float())
        self.linear.bias.copy_(w[-1].float())

    @torch.no_grad()
    def init_linear(self, weight: torch.Tensor | np.ndarray, bias: torch.Tensor | np.ndarray | None = None) -> None:
        """Set the linear part to x W (+ b), W given as (in_dim, out_dim) like the closed-form fits produce
        (e.g. a Procrustes rotation, `xbt.compat.procrustes`); no bias: zero."""
        device = self.linear.weight.device
        weight = torch.as_tensor(np.asarray(weight, dtype=np.float32), device=device)
        if tuple(weight.shape) != (self.in_dim, self.out_dim):
            raise InputError(f"projection init: a ({self.in_dim}, {self.out_dim}) matrix is needed, not {tuple(weight.shape)}")
        self.linear.weight.copy_(weight.T)
        self.linear.bias.copy_(torch.as_tensor(np.asarray(bias, dtype=np.float32), device=device) if bias is not None
                               else torch.zeros(self.out_dim, device=device))

    def orthogonality_gap(self) -> torch.Tensor:
        """||G - I||_F^2 / k for the linear part's k x k Gram matrix over its smaller side (k = min(in, out)):
        zero exactly when the map is an isometry of the smaller space (a Procrustes rotation is), the
        relaxed-orthogonality penalty of lambda-orthogonality (arXiv 2509.16664)."""
        w = self.linear.weight  # (out, in)
        gram = w @ w.T if self.out_dim <= self.in_dim else w.T @ w
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return (gram - eye).pow(2).sum() / gram.shape[0]

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        y = self.linear(new)
        return y + self.mlp(new) if self.projection_kind == "mlp" else y


class OldQueryBlend(QueryMap):
    """normalize((1 - w) normalize(P(new)) + w old): a trained projection P's query blended with the old
    model's own query of the same item (w = 0: P alone; w = 1: the old model alone). An ensemble: the old
    model runs on every query, as SLERP's does (`xbt.compat.old_query`)."""

    kind = "old-query-blend"
    needs_old_query = True

    def __init__(self, in_dim: int, out_dim: int, weight: float = 0.0, projection: dict[str, Any] | QueryMap | None = None):
        super().__init__(in_dim, out_dim)
        if not 0 <= weight <= 1:
            raise InputError(f"old-query blend: the weight must lie in [0, 1], not {weight}")
        if projection is None:
            raise InputError("old-query blend: give the projection it blends (a query map or its config)")
        self.weight = float(weight)
        self.projection = projection if isinstance(projection, QueryMap) else build_map(projection)
        if self.projection.needs_old_query or (self.projection.in_dim, self.projection.out_dim) != (in_dim, out_dim):
            raise InputError(f"old-query blend: the projection must map {in_dim}->{out_dim} without the old query")

    def config(self) -> dict[str, Any]:
        return super().config() | {"weight": self.weight, "projection": self.projection.config()}

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        if old is None or old.shape != (new.shape[0], self.out_dim):
            raise InputError(f"the old-query blend needs the old model's {self.out_dim}-d vectors of the same {new.shape[0]} queries")
        mapped = F.normalize(self.projection(new).float(), dim=-1)
        return ((1 - self.weight) * mapped + self.weight * F.normalize(old.float(), dim=-1)).to(new.dtype)


MAP_KINDS: dict[str, type[QueryMap]] = {m.kind: m for m in (LinearMap, ResidualMap, SlerpMap, Projection, OldQueryBlend)}


def build_map(config: dict[str, Any]) -> QueryMap:
    """An empty map of the kind and shape `config` (a saved `QueryMap.config()`) describes; load its
    weights with `load_state_dict`."""
    options = dict(config)
    kind = options.pop("kind", None)
    if kind not in MAP_KINDS:
        raise InputError(f"unknown query map kind {kind!r}; this xbt knows {sorted(MAP_KINDS)}")
    if kind == "projection":
        options["kind"] = options.pop("projection_kind", "mlp")
    return MAP_KINDS[kind](**options)
