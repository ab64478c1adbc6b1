"""Fitted peers reused by content: a second evaluation on the same data with the same settings reads each
peer back instead of fitting it again (the residual adapter trains for seconds; the rest is closed form).

    cache = PeerFitCache(cache_dir("peers"))
    key = cache.key(method, options, fit_data_digest(data))   # None: settings without a stable digest
    found = cache.load(key, new_model, old_model)             # (CompatibleModel, original fit seconds) | None
    cache.store(key, method.to_model(new_model), fit_seconds)  # None, or why it could not be stored

`xbt.eval.runner.run_evaluation(fit_cache=FOLDER)` uses it; its records say which fits were reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbt.compat.base import CompatMethod, FitData
from xbt.compat.model import CONFIG_NAME, CompatibleModel, read_config
from xbt.durable import code_digest, fsync_path
from xbt.errors import InputError
from xbt.embed import PairEmbeddings
from xbt.models.base import EmbeddingSpace, VLPModel, tensor_bytes

PEER_FIT_FORMAT = "xbt.peer-fit/1"
_STALE_S = 3600.0  # temporary folders of a killed run older than this are removed by the next store


class UnreadableFit(Exception):
    """A fit-cache entry that exists but cannot be read back (torn, edited, another format): refit it."""


class _Unkeyable(Exception):
    """A method's settings hold something without a stable digest: it is fitted, never cached."""


def _feed(digest: Any, value: Any) -> None:
    """A canonical, typed encoding of `value` into `digest`: equal settings or data give equal bytes."""
    if value is None or isinstance(value, (bool, int, str)):
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    elif isinstance(value, float):
        digest.update(f"float:{float(value).hex()};".encode())
    elif isinstance(value, np.generic):
        _feed(digest, value.item())
    elif isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise _Unkeyable("an object array")
        array = np.ascontiguousarray(value)
        digest.update(f"ndarray:{array.dtype.str}:{array.shape};".encode())
        digest.update(array.tobytes())
    elif isinstance(value, torch.Tensor):
        digest.update(f"tensor:{value.dtype}:{tuple(value.shape)};".encode())
        digest.update(tensor_bytes(value))
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}[{len(value)}];".encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, dict):
        digest.update(f"dict[{len(value)}];".encode())
        for k, v in sorted(value.items(), key=lambda kv: repr(kv[0])):
            _feed(digest, k)
            _feed(digest, v)
    elif isinstance(value, EmbeddingSpace):
        _feed(digest, value.to_dict())
    elif isinstance(value, PairEmbeddings):
        _feed(digest, [value.images, value.texts, np.asarray(value.caption_image_index, dtype=np.int64), value.space])
    elif isinstance(value, (CompatMethod, torch.nn.Module)):
        digest.update(f"{type(value).__module__}.{type(value).__qualname__};".encode())
        _feed(digest, value.state_dict() if isinstance(value, torch.nn.Module) else vars(value))
    else:
        raise _Unkeyable(type(value).__name__)


def fit_data_digest(data: FitData | None) -> str:
    """sha256 of what peers are fitted on: every array's dtype, shape and bytes, the support embeddings."""
    digest = hashlib.sha256()
    if data is not None:
        _feed(digest, [data.new_text, data.old_text, data.new_image, data.old_image, data.support])
    return digest.hexdigest()


def fit_code_digest() -> str:
    """sha256 of the code a peer's fit runs (the xbt.compat package, the retrieval its support scores use)
    and of the numeric libraries' versions: a changed fit is never served from an older one's entry."""
    return code_digest("xbt.compat", "xbt.metrics")


@contextlib.contextmanager
def _training_modes_kept(*models: torch.nn.Module | None) -> Iterator[None]:
    """Loading a saved model puts it (and the encoders it wraps, which the caller shares) in eval mode;
    a reused fit leaves the caller's models as a fresh fit does."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


class PeerFitCache:
    """Fitted peers by content, one folder per fit: the compatible model it became, in the artifact format
    (`save_pretrained`), with the key and the original fit time in its config under `peer_fit`.

    The key covers the method's registry name and class, its settings (every attribute of the unfitted
    method, which holds its constructor options and seed, and the run's method_options for it), the new
    and old spaces, a digest of the FitData (text and image pairs, support embeddings) and of the fitting
    code. An entry is written into a temporary folder and renamed into place, so a killed run never
    leaves a partial entry under a key; an entry that cannot be read back is refitted and replaced.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"the peer fit cache {self.root} cannot be created ({exc.strerror or exc}); give a"
                             " writable folder, or no fit cache") from exc

    def key(self, method: CompatMethod, options: Mapping[str, Any], data_digest: str) -> str | None:
        """The entry's folder name, or None when the method's settings have no stable digest."""
        state, opts = hashlib.sha256(), hashlib.sha256()
        try:
            _feed(state, method)
            _feed(opts, dict(options))
        except _Unkeyable:
            return None
        payload = {
            "format": PEER_FIT_FORMAT, "name": method.name,
            "class": f"{type(method).__module__}.{type(method).__qualname__}",
            "settings": state.hexdigest(), "options": opts.hexdigest(),
            "new_space": method.new_space.to_dict(), "old_space": method.old_space.to_dict(),
            "data": data_digest, "code": fit_code_digest(),
        }
        digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', method.name)}-{digest[:32]}"

    def load(self, key: str, new_model: VLPModel, old_model: VLPModel) -> tuple[CompatibleModel, float] | None:
        """(the fitted model, its original fit time), or None for a miss; UnreadableFit for a bad entry."""
        folder = self.root / key
        if not folder.exists():
            return None
        try:
            with _training_modes_kept(new_model, old_model):
                config = read_config(folder)
                record = config.get("peer_fit")
                if not isinstance(record, dict) or record.get("key") != key:
                    raise UnreadableFit(f"{CONFIG_NAME} does not record this key under peer_fit")
                fit_seconds = float(record["fit_seconds"])
                model = CompatibleModel.from_pretrained(folder, new_model=new_model, old_model=old_model)
        except UnreadableFit:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with an entry, the cure is to fit again
            raise UnreadableFit(f"{type(exc).__name__}: {exc}") from exc
        model.spec = ""  # as a fresh fit: not loadable by a name until it is saved (the cache may be cleared)
        return model, fit_seconds

    def store(self, key: str, model: CompatibleModel, fit_seconds: float) -> str | None:
        """Write the entry crash-safely; returns why it could not be stored, or None."""
        self._remove_stale()
        folder = self.root / key
        tmp = self.root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        spec = model.spec
        try:
            model.save_pretrained(tmp, extra={"peer_fit": {
                "format": PEER_FIT_FORMAT, "key": key, "fit_seconds": fit_seconds,
                "created": datetime.now(UTC).isoformat(timespec="seconds")}})
            for file in tmp.rglob("*"):
                fsync_path(file)
            fsync_path(tmp)
            if folder.exists():  # an unreadable entry: out of the way first (a rename onto it would fail)
                trash = self.root / f".trash-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(folder, trash)
                shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, folder)
            except OSError:
                if not folder.exists():
                    raise
                # another run stored the same fit in the meantime: keep its entry
            fsync_path(self.root)
        except (InputError, OSError, TypeError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            model.spec = spec
            shutil.rmtree(tmp, ignore_errors=True)
        return None

    def _remove_stale(self) -> None:
        now = time.time()
        for leftover in [*self.root.glob(".tmp-*"), *self.root.glob(".trash-*")]:
            try:
                if now - leftover.stat().st_mtime > _STALE_S:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass
