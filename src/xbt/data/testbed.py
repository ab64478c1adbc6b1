"""The offline testbed: real image-caption data from Debian packages and two real generations of lit models.

Data
  Tux Paint stamps (English caption = first line of each .txt) and openclipart SVGs (cleaned titles).
  Tux Paint items are grouped by caption (case-insensitive) and the groups are shuffled with a fixed
  seed, so no caption is ever on both sides of a split:
    eval        EVAL_GROUPS groups, one image per unique caption. Nothing ever trains or tunes on it.
    val         VAL_GROUPS groups, one image each: model selection (e.g. SLERP's weight), early stopping.
    tux_train   every image of the remaining groups.
  Derived splits:
    vlp_old     openclipart pairs                      -> the OLD model's pretraining pairs
    vlp_new     openclipart + tux_train                -> the NEW model's pretraining pairs
    xbt_train   tux_train                              -> image-text pairs for compatibility training
    text_corpus unique captions of vlp_new (never eval or val captions) -> the text-only stage

Models (same recipe, LiT heads on locked towers)
    old  EfficientNet-Lite0 + all-MiniLM-L6-v2, 256-d, trained on vlp_old
    new  EfficientNet-Lite2 + all-mpnet-base-v2, 512-d, trained on vlp_new
    third (optional, chained upgrades) EfficientNet-Lite1 + all-mpnet-base-v2, 384-d, trained on vlp_new
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xbt.assets import minilm_path, openclipart_root, tuxpaint_root
from xbt.data.captions import DICTIONARY, cap_copies, clean_title, english_vocabulary
from xbt.data.features import cached_image_features, cached_text_features, device_cache_tag
from xbt.data.images import load_image
from xbt.data.pairs import Pair, read_pairs, write_pairs
from xbt.errors import AssetMissingError
from xbt.paths import cache_dir, xbt_home

SPLIT_SEED = 0
EVAL_GROUPS = 300
VAL_GROUPS = 80
RENDER_SIZE = 320
SPLITS = ("eval", "val", "tux_train", "vlp_old", "vlp_new", "xbt_train")
TESTBED_VERSION = "2"

#: Wall seconds of this process's last run of each costly step (SVG rendering, each tower's features), by
#: step name: the main job prints them under its testbed phase. Steps served whole by a cache are not listed.
STEP_TIMINGS: dict[str, float] = {}
IMAGE_BATCH = 32  # images per tower forward in feature extraction
TEXT_BATCH = 64  # texts per tower forward


@dataclass(frozen=True)
class TestbedModel:
    name: str
    image_tower: dict[str, Any]
    text_tower: dict[str, Any]
    embed_dim: int
    split: str


TESTBED_MODELS = {
    "old": TestbedModel("old", {"kind": "efficientnet-lite", "variant": "lite0"},
                        {"kind": "sentence-transformers", "source": "asset:all-MiniLM-L6-v2"}, 256, "vlp_old"),
    "new": TestbedModel("new", {"kind": "efficientnet-lite", "variant": "lite2"},
                        {"kind": "sentence-transformers", "source": "asset:all-mpnet-base-v2"}, 512, "vlp_new"),
    "third": TestbedModel("third", {"kind": "efficientnet-lite", "variant": "lite1"},
                          {"kind": "sentence-transformers", "source": "asset:all-mpnet-base-v2"}, 384, "vlp_new"),
}


def testbed_dir() -> Path:
    return xbt_home() / "testbed"


def testbed_model_dir(name: str) -> Path:
    if name not in TESTBED_MODELS:
        raise AssetMissingError(f"the testbed has no model {name!r}; it has {sorted(TESTBED_MODELS)}")
    path = testbed_dir() / "models" / name
    if not (path / "config.json").exists():
        raise AssetMissingError(f"the testbed model {name!r} is not built yet; run `./run.sh xbt testbed build`")
    return path


def load_split(name: str) -> list[Pair]:
    path = testbed_dir() / "splits" / f"{name}.jsonl"
    if not path.exists():
        raise AssetMissingError(f"testbed split {name!r} not found at {path}; run `./run.sh xbt testbed build`")
    return read_pairs(path)


def load_text_corpus() -> list[str]:
    path = testbed_dir() / "splits" / "text_corpus.txt"
    if not path.exists():
        raise AssetMissingError(f"testbed text corpus not found at {path}; run `./run.sh xbt testbed build`")
    return [line for line in path.read_text().splitlines() if line.strip()]


# ----- data collection ------------------------------------------------------------------------
def tuxpaint_items(root: Path) -> list[tuple[Path, str]]:
    """(image, English caption) for every stamp that has a description; letters and mirror copies skipped."""
    items = []
    for image in sorted(root.rglob("*")):
        if image.suffix.lower() not in (".png", ".svg") or "alphabets" in image.parts or image.stem.endswith("_mirror"):
            continue
        txt = image.with_suffix(".txt")
        if not txt.exists():
            continue
        first = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        caption = first[0].strip() if first else ""
        if caption and "=" not in caption:
            items.append((image, caption))
    return items


_TITLE = re.compile(r"<dc:title>\s*([^<]*?)\s*</dc:title>", re.S)


def openclipart_items(root: Path) -> list[tuple[Path, str]]:
    # The MiniLM WordPiece vocabulary plus an English dictionary (wamerican) when installed: titles in
    # other languages (many openclipart titles are Italian) fail both.
    lists = [str(minilm_path() / "vocab.txt")] + ([DICTIONARY] if Path(DICTIONARY).exists() else [])
    vocabulary = english_vocabulary(*lists)
    found = []
    for svg in sorted(root.rglob("*.svg")):
        head = svg.read_text(encoding="utf-8", errors="replace")[:20000]
        match = _TITLE.search(head)
        caption = clean_title(match.group(1), vocabulary) if match else None
        if caption:
            found.append((str(svg), caption))
    return [(Path(p), c) for p, c in cap_copies(found, max_copies=2)]


def _render_one(args: tuple[str, str]) -> tuple[str | None, str]:
    """(the PNG written, "") or (None, why the SVG could not be rendered)."""
    src, dst = args
    try:
        load_image(src).save(dst + ".tmp.png")
        Path(dst + ".tmp.png").replace(dst)
        return dst, ""
    except Exception as exc:  # noqa: BLE001 - cairosvg and Pillow raise many kinds for a bad SVG: each is counted
        return None, f"{type(exc).__name__}: {exc}"[:200]


#: SVGs that failed to render in this process (path -> why): counted in the splits' manifest and warned about.
RENDER_FAILURES: dict[str, str] = {}


def render_svgs(paths: Sequence[Path], show_progress: bool = True) -> dict[Path, Path]:
    """Render SVGs to PNG once (cached by content); SVGs that fail to render are left out."""
    from xbt.progress import progress_bar

    out_dir = cache_dir("testbed", "render")
    jobs, done = [], {}
    for p in paths:
        dst = out_dir / (hashlib.sha256(p.read_bytes()).hexdigest()[:24] + f"-{RENDER_SIZE}.png")
        if dst.exists():
            done[p] = dst
        else:
            jobs.append((p, dst))
    t0 = time.perf_counter()
    with progress_bar(len(paths), "rendering SVGs", show_progress) as advance:
        advance(len(done))
        if jobs:
            with ProcessPoolExecutor(max_workers=2) as pool:
                for (src, dst), (result, why) in zip(jobs, pool.map(_render_one, [(str(s), str(d)) for s, d in jobs],
                                                                    chunksize=16)):
                    if result:
                        done[src] = dst
                    else:
                        RENDER_FAILURES[str(src)] = why
                    advance()
    if jobs:
        STEP_TIMINGS[f"render {len(jobs)} SVGs"] = time.perf_counter() - t0
    failed = [str(s) for s, _ in jobs if str(s) in RENDER_FAILURES]
    if failed:
        warnings.warn(f"{len(failed)} of {len(paths)} SVGs could not be rendered and are left out (e.g. {failed[0]}:"
                      f" {RENDER_FAILURES[failed[0]]}); the testbed's manifest counts them", stacklevel=2)
    return done


def testbed_items(show_progress: bool = True) -> tuple[dict[str, list[Pair]], list[Pair]]:
    """Every rendered item: the Tux Paint pairs grouped by caption (lower-cased; a group's pairs in file
    order) and the openclipart pairs. SVGs that fail to render are left out."""
    tux = tuxpaint_items(tuxpaint_root())
    clip = openclipart_items(openclipart_root())
    svgs = [p for p, _ in tux + clip if p.suffix.lower() == ".svg"]
    rendered = render_svgs(svgs, show_progress)

    def pair(p: Path, caption: str, source: str) -> Pair | None:
        image = rendered.get(p) if p.suffix.lower() == ".svg" else p
        return Pair(str(image), caption, image_id=f"{source}:{p}", source=source) if image else None

    groups: dict[str, list[Pair]] = {}
    for p, caption in tux:
        item = pair(p, caption, "tuxpaint")
        groups.setdefault(caption.lower(), [])
        if item:
            groups[caption.lower()].append(item)
    return groups, [x for p, c in clip if (x := pair(p, c, "openclipart"))]


def one_per_group(groups: dict[str, list[Pair]], keys: Sequence[str]) -> list[Pair]:
    """The first rendered image of each group (groups with none are skipped): an evaluation or val split,
    one image per unique caption."""
    return [groups[k][0] for k in keys if groups[k]]


def derived_splits(held_out: Sequence[Pair], tux_train: list[Pair], clip_pairs: list[Pair]) -> dict[str, list[Pair]]:
    """vlp_old, vlp_new and xbt_train from the Tux Paint training pairs and the openclipart pairs. An
    openclipart caption equal to a held-out (eval or val) caption would leak it into training: those
    pairs are dropped."""
    held = {p.caption.lower() for p in held_out}
    clip_pairs = [p for p in clip_pairs if p.caption.lower() not in held]
    return {"vlp_old": clip_pairs, "vlp_new": clip_pairs + tux_train, "xbt_train": list(tux_train)}


def build_splits(seed: int = SPLIT_SEED, show_progress: bool = True) -> dict[str, int]:
    """Collect, clean, render and split the data; writes XBT_HOME/testbed/splits. Returns split sizes."""
    groups, clip_pairs = testbed_items(show_progress)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    if len(keys) < EVAL_GROUPS + VAL_GROUPS + 50:
        raise AssetMissingError(f"only {len(keys)} distinct Tux Paint captions found; is tuxpaint-stamps-default complete?")
    eval_keys, val_keys, train_keys = keys[:EVAL_GROUPS], keys[EVAL_GROUPS : EVAL_GROUPS + VAL_GROUPS], keys[EVAL_GROUPS + VAL_GROUPS :]
    splits: dict[str, list[Pair]] = {
        "eval": one_per_group(groups, eval_keys),
        "val": one_per_group(groups, val_keys),
        "tux_train": [x for k in train_keys for x in groups[k]],
    }
    splits |= derived_splits(splits["eval"] + splits["val"], splits["tux_train"], clip_pairs)
    out = cache_dir("testbed", "splits")
    for name, pairs in splits.items():
        write_pairs(out / f"{name}.jsonl", pairs)
    corpus = sorted({p.caption for p in splits["vlp_new"]})
    (out / "text_corpus.txt").write_text("\n".join(corpus) + "\n")
    sizes = {name: len(pairs) for name, pairs in splits.items()} | {"text_corpus": len(corpus)}
    left_out = {"svgs_not_rendered": len(RENDER_FAILURES), "examples": dict(list(RENDER_FAILURES.items())[:5])}
    (out / "manifest.json").write_text(json.dumps({"seed": seed, "version": TESTBED_VERSION, "sizes": sizes,
                                                   "left_out": left_out}, indent=2))
    return sizes


# ----- tower features and models --------------------------------------------------------------
def tower_outputs(tower, inputs: torch.Tensor | dict[str, Any]) -> torch.Tensor:
    """tower(inputs) on the tower's device (pixels, or a tokenizer's dict, moved there), float32, no grad;
    the result stays on that device."""
    device = next(iter(tower.parameters())).device
    moved = inputs.to(device) if isinstance(inputs, torch.Tensor) else {
        k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        return tower(moved).float()


def tower_device_tag(tower) -> str:
    """The feature-cache suffix of the device the tower runs on ("" on the CPU: the keys of earlier runs)."""
    return device_cache_tag(next(iter(tower.parameters())).device)


def tower_image_features(tower, images: Sequence[str], show_progress: bool = True) -> np.ndarray:
    """The tower's features of `images`, cached. Decoding and preprocessing of the next batch (PIL, which
    releases the GIL) run in a thread while the tower encodes the current one; the values are those of
    the plain loop (same transform, same batches)."""
    def pixels(chunk: list[str]) -> torch.Tensor:
        return torch.stack([tower.transform(load_image(p)) for p in chunk])

    def encode(paths: list[str]) -> np.ndarray:
        chunks = [paths[start : start + IMAGE_BATCH] for start in range(0, len(paths), IMAGE_BATCH)]
        out = []
        with ThreadPoolExecutor(max_workers=1) as decoder, torch.inference_mode():
            ahead = decoder.submit(pixels, chunks[0])
            for i in range(len(chunks)):
                batch = ahead.result()
                if i + 1 < len(chunks):
                    ahead = decoder.submit(pixels, chunks[i + 1])
                out.append(tower_outputs(tower, batch).cpu().numpy())
        return np.concatenate(out)

    cache_id = tower.cache_id + tower_device_tag(tower)
    return _timed(f"{tower.cache_id} images", len(images),
                  lambda: cached_image_features(cache_id, encode, images, label=f"{tower.cache_id} images",
                                                show_progress=show_progress))


#: How tower_text_features batches, part of its cache key: texts of similar length together (less padding).
TEXT_BATCHING = "lensorted"


def tower_text_features(tower, texts: Sequence[str], show_progress: bool = True) -> np.ndarray:
    """The tower's features of `texts`, cached. Batches of 64 texts of similar length (sorted by length
    within each chunk the cache asks for), so that short captions are not padded to a long one's length:
    1.4x faster on the testbed's captions, equal to corpus-order batches within 1e-6 (padding is masked),
    cached apart from them (TEXT_BATCHING in the cache id)."""
    def encode(batch_texts: list[str]) -> np.ndarray:
        order = sorted(range(len(batch_texts)), key=lambda i: (len(batch_texts[i]), i))
        out = np.zeros((len(batch_texts), tower.out_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(order), TEXT_BATCH):
                rows = order[start : start + TEXT_BATCH]
                out[rows] = tower_outputs(tower, tower.tokenize([batch_texts[i] for i in rows])).cpu().numpy()
        return out

    cache_id = f"{tower.cache_id}-{TEXT_BATCHING}" + tower_device_tag(tower)
    return _timed(f"{cache_id} texts", len(texts),
                  lambda: cached_text_features(cache_id, encode, texts, label=f"{tower.cache_id} texts",
                                               show_progress=show_progress))


def _timed(step: str, n: int, compute):
    """compute(), its wall time kept in STEP_TIMINGS as "STEP (N)"."""
    t0 = time.perf_counter()
    result = compute()
    STEP_TIMINGS[f"{step} ({n})"] = time.perf_counter() - t0
    return result
