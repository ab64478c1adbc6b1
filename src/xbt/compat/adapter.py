"""A Drift-Adapter-style query adapter: Procrustes, then a small residual MLP trained on paired embeddings.

    adapted(x) = R x + MLP(R x)

The MLP's last layer starts at zero, so training starts from the Procrustes solution and can only
add what the rotation misses. It is trained with a cosine loss on (new, old) embeddings of the same
items (text corpus and/or training images), with a fixed seed: the same data gives the same adapter.
With a support split, the epoch whose adapter retrieves best on it is kept (epoch 0 = Procrustes), so
a small training set cannot make the adapter worse than the rotation it starts from, on that split.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from xbt.compat.base import CompatMethod, FitData
from xbt.compat.maps import LinearMap, ResidualMap, ResidualMLP
from xbt.compat.procrustes import FITS_ON_LABEL, FitOn, orthogonal_procrustes, paired_rows
from xbt.compat.support import order_support, rounded, support_score
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One torch (and, where threadpoolctl is installed, BLAS) thread for the duration. Tiny models train
    fastest so, and per-query costs are measured so: on a busy machine more threads can be 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        threadpool_limits = None
    try:
        with threadpool_limits(1) if threadpool_limits else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(before)


class ResidualAdapter(CompatMethod):
    name = "adapter"

    def __init__(
        self,
        new_space: EmbeddingSpace,
        old_space: EmbeddingSpace,
        fit_on: FitOn = "both",
        hidden: int = 512,
        epochs: int = 60,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        dropout: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(new_space, old_space)
        if fit_on not in FITS_ON_LABEL:
            raise InputError(f"adapter: fit_on must be one of {sorted(FITS_ON_LABEL)}, not {fit_on!r}")
        if hidden < 1 or epochs < 0 or batch_size < 1 or lr <= 0:
            raise InputError("adapter: hidden and batch_size must be >= 1, epochs >= 0 and lr > 0")
        self.fit_on, self.fits_on = fit_on, FITS_ON_LABEL[fit_on]
        self.hidden, self.epochs, self.batch_size = hidden, epochs, batch_size
        self.lr, self.weight_decay, self.dropout, self.seed = lr, weight_decay, dropout, seed
        self.rotation: np.ndarray | None = None
        self.mlp: ResidualMLP | None = None
        self.history: list[float] = []
        self.support_scores: dict[int, float] = {}
        self.best_epoch: int | None = None

    def fit(self, data: FitData) -> ResidualAdapter:
        x, y = paired_rows(data, self.fit_on, self.name)
        self.fits_on = FITS_ON_LABEL[self.fit_on]
        self.rotation = orthogonal_procrustes(x, y)[: self.new_space.dim, : self.old_space.dim].astype(np.float32)
        base = torch.from_numpy(x.astype(np.float32) @ self.rotation)
        target = torch.from_numpy(y.astype(np.float32))
        support = order_support(data.support, self.new_space, self.old_space) if data.support is not None else None
        with torch.random.fork_rng(devices=[]), single_thread():  # fixed seed; the caller's global RNG untouched
            torch.manual_seed(self.seed)
            mlp = ResidualMLP(self.old_space.dim, self.hidden, self.dropout)
            generator = torch.Generator().manual_seed(self.seed)
            optimiser = torch.optim.AdamW(mlp.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            self.history, self.support_scores = [], {}
            best_state, self.best_epoch = None, self.epochs

            def score_on_support(epoch: int) -> None:
                """Keep the first epoch with the best support recall (a tie: closer to the rotation)."""
                nonlocal best_state
                self.mlp = mlp.eval()
                self.support_scores[epoch] = support_score(lambda x, o: self.transform(x), *support,
                                                              directions=self.support_directions)
                if best_state is None or self.support_scores[epoch] > self.support_scores[self.best_epoch] + 1e-12:
                    best_state, self.best_epoch = {k: v.clone() for k, v in mlp.state_dict().items()}, epoch

            if support is not None:
                score_on_support(0)
            for epoch in range(1, self.epochs + 1):
                mlp.train()
                order = torch.randperm(len(base), generator=generator)
                total = 0.0
                for start in range(0, len(base), self.batch_size):
                    idx = order[start : start + self.batch_size]
                    loss = 1 - nn.functional.cosine_similarity(mlp(base[idx]), target[idx], dim=-1).mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    total += float(loss.detach()) * len(idx)
                self.history.append(total / len(base))
                if support is not None:
                    score_on_support(epoch)
            if best_state is not None:
                mlp.load_state_dict(best_state)
                self.fits_on = FITS_ON_LABEL[self.fit_on] + "; epochs on the support split"
        self.mlp = mlp.eval()
        return self

    def to_map(self) -> ResidualMap:
        self._require_fitted(self.mlp, self.rotation)
        # A copy: the map is moved to the new model's device in place (CompatibleModel, configure), and the
        # fitted adapter must stay where it was fitted (the CPU), for its own transform and for the next map.
        query_map = ResidualMap(self.new_space.dim, self.old_space.dim, self.hidden, self.dropout, mlp=copy.deepcopy(self.mlp))
        query_map.rotation = LinearMap.from_arrays(self.rotation)
        return query_map.eval()

    def details(self) -> dict[str, object]:
        details = {"fit_on": self.fit_on, "hidden": self.hidden, "epochs": self.epochs, "best_epoch": self.best_epoch,
                   "support_scores": rounded(self.support_scores)}
        if self.history:
            details["final_loss"] = float(self.history[-1])
        return details
