"""Gallery extras: items added to every gallery an evaluation searches, never made into queries.

A labelled evaluation set is small (the testbed's folds: 141 items); a real gallery is far larger, and a
method's ranking can change with its size (more near neighbours to lose a rank to, more hubs). Extras
(`xbt evaluate --gallery-extra SOURCE`, repeatable) are unlabeled images and/or texts that join the
galleries of every system: the old model's galleries (old->old and every compatible method) and the new
model's (the new->new ceiling) alike.

Sources (`load_gallery_extra`):
    testbed:distractors   the testbed's distractor set (below), built on first use, cached under XBT_HOME
    FILE.txt              texts, one per line
    FOLDER                the images in a folder (recursively: png, jpg, jpeg, webp, bmp, gif, svg)
    any pair set          (a .jsonl / .csv / .tsv / dataset folder, `testbed:SPLIT`, `domain:emoji`, ...)
                          its distinct images and its distinct captions

The testbed's distractor set (`testbed:distractors`), from Debian packages the set-up installs:
    images   openclipart SVGs (`openclipart-svg`) that the testbed's title filter rejects (never a pair of
             any split: not in vlp_old, vlp_new or any fold), then Papirus icons (`papirus-icon-theme`,
             one file per icon name, the largest size), rendered as the testbed renders (`render_svgs`)
    texts    WordNet noun glosses (`wordnet-base`): the definition before the first ';', 3 to 16 words
Both are seeded samples of DISTRACTOR_IMAGES / DISTRACTOR_TEXTS items. Excluded when built: any image whose
source or rendered file has the bytes of a testbed item (Tux Paint or openclipart, any split), and any text
equal, once normalised (lower case, letters and digits only), to a Tux Paint caption or an openclipart caption
(the text corpora every fit uses). Tux Paint and emoji (domain:emoji, an evaluation domain) are never used.
The manifest records the sources, the counts and what each check removed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xbt.errors import AssetMissingError, InputError

DISTRACTORS_VERSION = "1"
DISTRACTOR_SEED = 0
DISTRACTOR_IMAGES = 10_600
DISTRACTOR_TEXTS = 10_600
PAPIRUS_ROOT = Path("/usr/share/icons/Papirus")
WORDNET_ROOT = Path("/usr/share/wordnet")
#: Papirus sizes, largest first: an icon name is taken from the largest size that has it as a file.
PAPIRUS_SIZES = ("128x128", "64x64", "48x48", "32x32", "24x24", "22x22", "16x16")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".svg")
TESTBED_DISTRACTORS = "testbed:distractors"


@dataclass
class GalleryExtra:
    """Unlabeled gallery items: image files and texts (either may be empty), and where they came from."""

    images: list[str]
    texts: list[str]
    source: str
    info: dict[str, Any] = field(default_factory=dict)


def merge_extras(extras: Sequence[GalleryExtra]) -> GalleryExtra:
    """Several sources as one: images and texts in order, each distinct item once."""
    images = list(dict.fromkeys(i for e in extras for i in e.images))
    texts = list(dict.fromkeys(t for e in extras for t in e.texts))
    return GalleryExtra(images, texts, " + ".join(e.source for e in extras),
                        {e.source: e.info | {"n_images": len(e.images), "n_texts": len(e.texts)} for e in extras})


def load_gallery_extra(source: str) -> GalleryExtra:
    """The images and texts of one `--gallery-extra` source (see the module's docstring)."""
    if source == TESTBED_DISTRACTORS:
        return testbed_distractors()
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"gallery extra: text file not found: {path}")
        texts = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()))
        if not texts:
            raise InputError(f"gallery extra: {path} holds no text")
        return GalleryExtra([], texts, source)
    if path.is_dir() and not _looks_like_dataset(path):
        images = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise InputError(f"gallery extra: no image files ({', '.join(IMAGE_SUFFIXES)}) under {path}")
        return GalleryExtra(images, [], source)
    from xbt.data.datasets import open_dataset
    from xbt.data.pairs import unique_images

    pairs = list(open_dataset(source))
    if not pairs:
        raise InputError(f"gallery extra: {source} holds no items")
    return GalleryExtra([p.image for p in unique_images(pairs)], list(dict.fromkeys(p.caption for p in pairs)), source)


def _looks_like_dataset(path: Path) -> bool:
    """A folder that a dataset reader opens (a pairs file or an annotations file inside), not a plain image folder."""
    return any((path / name).exists() for name in ("pairs.jsonl", "captions.jsonl", "metadata.jsonl", "annotations",
                                                    "dataset_info.json", "captions.txt"))


# ----- the testbed's distractor set -------------------------------------------------------------------
def normalise_text(text: str) -> str:
    """Lower case, letters and digits only, single spaces: what 'the same caption' means here."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def papirus_icons(root: Path = PAPIRUS_ROOT) -> list[Path]:
    """One SVG file per Papirus icon name (symbolic links skipped), from the largest size that has it;
    files of identical bytes once."""
    chosen: dict[str, Path] = {}
    for size in PAPIRUS_SIZES:
        for path in sorted((root / size).rglob("*.svg")) if (root / size).is_dir() else []:
            if path.is_symlink() or not path.is_file():
                continue
            chosen.setdefault(path.name, path)
    seen: set[str] = set()
    out = []
    for path in chosen.values():
        digest = sha256_file(path)
        if digest not in seen:
            seen.add(digest)
            out.append(path)
    return out


def openclipart_rejected(root: Path, kept: Iterable[Path]) -> list[Path]:
    """The openclipart SVGs that are no testbed item: the title filter (or the cap on copies) left them out."""
    keep = {Path(p).resolve() for p in kept}
    return [p for p in sorted(root.rglob("*.svg")) if p.resolve() not in keep]


_GLOSS = re.compile(r"\|\s*(.*)$")


def wordnet_glosses(root: Path = WORDNET_ROOT, min_words: int = 3, max_words: int = 16) -> list[str]:
    """WordNet noun glosses as caption-like English: each synset's definition (before the first ';'), ASCII,
    3 to 16 words, without quotes or brackets, first letter capitalised; each normalised text once."""
    data = root / "data.noun"
    if not data.is_file():
        raise AssetMissingError(f"WordNet not found at {data}: `apt-get install wordnet-base` (as root), or run ./run.sh setup")
    out, seen = [], set()
    with data.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("  "):  # the licence header
                continue
            match = _GLOSS.search(line)
            if not match:
                continue
            text = match.group(1).split(";")[0].strip()
            if not text.isascii() or any(c in text for c in "\"()[]`") or re.search(r"\d", text):
                continue
            words = text.split()
            if not min_words <= len(words) <= max_words:
                continue
            text = text[0].upper() + text[1:]
            key = normalise_text(text)
            if key and key not in seen:
                seen.add(key)
                out.append(text)
    return out


def distractors_dir() -> Path:
    from xbt.data.testbed import testbed_dir

    return testbed_dir() / "distractors" / f"v{DISTRACTORS_VERSION}"


def testbed_distractors(show_progress: bool = False) -> GalleryExtra:
    """The testbed's distractor set, built once (cached under XBT_HOME/testbed/distractors)."""
    root = distractors_dir()
    manifest = root / "manifest.json"
    if not manifest.exists():
        build_distractors(show_progress=show_progress)
    info = json.loads(manifest.read_text())
    images = [line for line in (root / "images.txt").read_text().splitlines() if line]
    texts = [line for line in (root / "texts.txt").read_text().splitlines() if line]
    missing = [p for p in images[:50] if not Path(p).exists()]
    if missing:  # renders removed from the cache: build again (renders are content-addressed)
        build_distractors(show_progress=show_progress)
        return testbed_distractors(show_progress)
    return GalleryExtra(images, texts, TESTBED_DISTRACTORS, info)


def build_distractors(n_images: int = DISTRACTOR_IMAGES, n_texts: int = DISTRACTOR_TEXTS, seed: int = DISTRACTOR_SEED,
                      show_progress: bool = False) -> dict[str, Any]:
    """Collect, exclude, sample and render the distractor set; writes images.txt, texts.txt and
    manifest.json under `distractors_dir()`. Returns the manifest."""
    from xbt.assets import openclipart_root, tuxpaint_root
    from xbt.data.testbed import RENDER_FAILURES, openclipart_items, render_svgs, testbed_items, tuxpaint_items
    from xbt.durable import atomic_write_text

    if not PAPIRUS_ROOT.is_dir():
        raise AssetMissingError(f"Papirus icons not found at {PAPIRUS_ROOT}: `apt-get install papirus-icon-theme` (as root),"
                                " or run ./run.sh setup")
    # What the testbed uses, in every split and fold: its items' files (sources and renders) and captions.
    groups, clip_pairs = testbed_items(show_progress)
    tux = tuxpaint_items(tuxpaint_root())
    kept_clip = openclipart_items(openclipart_root())
    used_files = {sha256_file(p) for p, _ in tux + kept_clip}
    used_files |= {sha256_file(p.image) for pairs in groups.values() for p in pairs}
    used_files |= {sha256_file(p.image) for p in clip_pairs}
    used_texts = {normalise_text(c) for _, c in tux + kept_clip} | {normalise_text(p.caption) for p in clip_pairs}

    rng = random.Random(seed)
    # Images: every rejected openclipart SVG first (the testbed's own domain: the harder distractors), then icons.
    rejected = openclipart_rejected(openclipart_root(), [p for p, _ in kept_clip])
    icons = papirus_icons()
    removed = {"same_file_as_a_testbed_item": 0, "same_text_as_a_testbed_caption": 0, "not_rendered": 0}
    candidates: list[tuple[str, Path]] = []
    seen_sources: set[str] = set()
    for origin, paths in (("openclipart-rejected", rejected), ("papirus", icons)):
        for p in paths:
            digest = sha256_file(p)
            if digest in used_files:
                removed["same_file_as_a_testbed_item"] += 1
            elif digest not in seen_sources:
                seen_sources.add(digest)
                candidates.append((origin, p))
    n_rejected = sum(1 for o, _ in candidates if o == "openclipart-rejected")
    # Every rejected openclipart SVG first, then a seeded order of the icons, rendered in rounds until there are
    # n_images distinct renders (an SVG may fail to render, two SVGs may render to the same picture).
    clip_part = [c for c in candidates if c[0] == "openclipart-rejected"]
    icon_part = [c for c in candidates if c[0] == "papirus"]
    rng.shuffle(icon_part)
    pool = clip_part + icon_part
    images: list[tuple[str, str]] = []
    seen_renders: set[str] = set()
    tried: list[Path] = []
    while len(images) < n_images and len(tried) < len(pool):
        batch = pool[len(tried) : len(tried) + (n_images - len(images)) * 21 // 20 + 20]
        tried += [p for _, p in batch]
        rendered = render_svgs([p for _, p in batch], show_progress)
        for origin, p in batch:
            out = rendered.get(p)
            if out is None:
                removed["not_rendered"] += 1
                continue
            digest = sha256_file(out)
            if digest in used_files:
                removed["same_file_as_a_testbed_item"] += 1
            elif digest in seen_renders:
                removed["same_render_as_another_extra"] = removed.get("same_render_as_another_extra", 0) + 1
            else:
                seen_renders.add(digest)
                images.append((origin, str(out)))
    images = images[:n_images]
    glosses = wordnet_glosses()
    fresh = [g for g in glosses if normalise_text(g) not in used_texts]
    removed["same_text_as_a_testbed_caption"] = len(glosses) - len(fresh)
    rng.shuffle(fresh)
    texts = fresh[:n_texts]
    if len(images) < n_images or len(texts) < n_texts:
        raise AssetMissingError(f"the distractor set needs {n_images} images and {n_texts} texts; found {len(images)} and"
                                f" {len(texts)} (are openclipart-svg, papirus-icon-theme and wordnet-base installed?)")
    manifest = {
        "version": DISTRACTORS_VERSION, "seed": seed, "n_images": len(images), "n_texts": len(texts),
        "images_by_source": {o: sum(1 for x, _ in images if x == o) for o in ("openclipart-rejected", "papirus")},
        "candidates": {"openclipart_rejected": n_rejected, "papirus_icons": len(icon_part), "wordnet_noun_glosses": len(glosses)},
        "sources": {"openclipart-rejected": "Debian openclipart-svg: SVGs the testbed's title filter (or its cap of two"
                                            " copies per title) leaves out, so in no split or fold",
                    "papirus": "Debian papirus-icon-theme: one SVG per icon name (largest size), seeded sample",
                    "texts": "Debian wordnet-base: noun glosses (definition before the first ';', 3-16 words), seeded sample"},
        "removed": removed,
        "render_failures": {str(p): RENDER_FAILURES[str(p)] for p in tried if str(p) in RENDER_FAILURES},
        "disjointness": "no image shares its source or rendered bytes with a testbed item (Tux Paint or openclipart, any split);"
                        " no text equals a Tux Paint or openclipart caption once normalised (lower case, letters and digits);"
                        " no Tux Paint or emoji item is used",
    }
    root = distractors_dir()
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "images.txt", "\n".join(p for _, p in images) + "\n")
    atomic_write_text(root / "texts.txt", "\n".join(texts) + "\n")
    atomic_write_text(root / "manifest.json", json.dumps(manifest, indent=1))
    return manifest


__all__ = ["GalleryExtra", "TESTBED_DISTRACTORS", "build_distractors", "load_gallery_extra", "merge_extras",
           "normalise_text", "papirus_icons", "testbed_distractors", "wordnet_glosses"]
