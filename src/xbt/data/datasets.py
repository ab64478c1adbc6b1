"""Reading pair sets a user already has. Every reader returns a list of Pair; `open_dataset` picks one.

Sources (`open_dataset(source, split=..., image_root=...)`)::

    testbed:eval                  a split of the offline testbed (or source "testbed" with split=...)
    domain:emoji                  a second evaluation domain, off the testbed's (xbt.data.domains); never trained on
    pairs.csv | pairs.jsonl       rows with image, caption[, image_id]
    dataset_flickr30k.json        Karpathy-split JSON (Flickr30K / COCO): images[].filename, [filepath],
                                  split, sentences[].raw; split defaults to "test"; images under image_root
    FOLDER/                       an image folder with a captions file: metadata.jsonl / metadata.csv
                                  (Hugging Face imagefolder: file_name + text/caption[s]) or captions.jsonl / .csv
    shards-{000..009}.tar | *.tar | FOLDER of .tar
                                  webdataset shards: <key>.jpg|png|... beside <key>.txt (or .json with caption)

Unlabeled images (`open_images`, for --fit-images): a plain folder of images, a .txt list of image paths,
or any source above (captions ignored).

Relative image paths resolve against image_root when given, else the file's own folder. Several
captions of one image share its image_id, which the retrieval protocol uses to group them.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import re
import tarfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from xbt.data.pairs import Pair
from xbt.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".svg")
FOLDER_METADATA = ("metadata.jsonl", "metadata.csv", "captions.jsonl", "captions.csv")
KARPATHY_DEFAULT_SPLIT = "test"


# ----- CSV / JSONL pairs files ------------------------------------------------------------------
def _resolve(image: str, base: Path) -> Path:
    path = Path(image)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~name/..." of a user this machine does not know: a relative path then
        pass
    return path if path.is_absolute() else base / path


def _text_field(row: dict, keys: tuple[str, ...], what: str, where: str) -> str:
    """The first non-empty of `keys` as a stripped string ("" if none); a non-text value is refused."""
    for key in keys:
        value = row.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise InputError(f"{where}: {key!r} must be text (the {what}), not {type(value).__name__}")
        text = str(value).strip()
        if "\x00" in text:
            raise InputError(f"{where}: {key!r} contains a NUL character")
        if text:
            return text
    return ""


def _pair(row: dict, base: Path, where: str) -> Pair:
    image = _text_field(row, ("image", "image_path", "filepath", "file_name"), "image path", where)
    caption = _text_field(row, ("caption", "text"), "caption", where)
    if not image or not caption:
        raise InputError(f"{where}: each row needs an image path and a non-empty caption (columns image, caption)")
    path = _resolve(image, base)
    return Pair(str(path), caption, _text_field(row, ("image_id",), "image id", where) or str(path), source=str(base))


def _read_rows(path: Path) -> list[tuple[dict, str]]:
    """(row, "file:line") for a JSONL or CSV file; malformed lines are reported with their place."""
    rows: list[tuple[dict, str]] = []
    if path.suffix not in (".jsonl", ".json", ".csv"):
        raise InputError(f"unknown pairs format {path.suffix!r}: use .jsonl or .csv (image, caption[, image_id])")
    n = 0
    try:
        if path.suffix in (".jsonl", ".json"):
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except (ValueError, RecursionError) as exc:
                            raise InputError(f"{path}:{n} is not valid JSON: {exc}") from exc
                        if not isinstance(row, dict):
                            raise InputError(f"{path}:{n} must be a JSON object with image and caption fields")
                        rows.append((row, f"{path}:{n}"))
        else:
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                for row in reader:
                    # Cells beyond the header land under the key None: empty ones (trailing commas) are
                    # dropped; text there is most often a caption with an unquoted comma, cut in two.
                    extra = row.pop(None, None)
                    if extra and any(str(cell).strip() for cell in extra):
                        raise InputError(f"{path}:{reader.line_num} has more cells than the header has columns;"
                                         ' put a caption that contains a comma in double quotes')
                    rows.append((row, f"{path}:{reader.line_num}"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text (near line {n + 1 if n else 1}): {exc.reason}") from exc
    except csv.Error as exc:
        raise InputError(f"{path} is not a readable CSV file: {exc}") from exc
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    return rows


def load_pairs(path: str | Path, image_root: str | Path | None = None) -> list[Pair]:
    """Pairs from a .jsonl or .csv file with columns image, caption[, image_id]; relative paths are
    resolved against `image_root`, by default the file's folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"pairs file not found: {path}")
    base = Path(image_root).expanduser() if image_root else path.parent
    pairs = [_pair(row, base, where) for row, where in _read_rows(path)]
    if not pairs:
        raise InputError(f"{path} holds no pairs")
    return pairs


# ----- an image folder with a captions file ------------------------------------------------------
def _captions_of(row: dict) -> list[str]:
    for key in ("captions", "caption", "text", "sentences"):
        value = row.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, str) and value.lstrip().startswith("["):  # a list serialised into a CSV cell
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        values = value if isinstance(value, list) else [value]
        return [str(v.get("raw", "") if isinstance(v, dict) else v).strip() for v in values]
    return []


def load_image_folder(folder: str | Path, image_root: str | Path | None = None) -> list[Pair]:
    """An image folder described by metadata.jsonl/.csv (Hugging Face imagefolder: file_name plus a
    text, caption or captions column, where a list gives several captions) or captions.jsonl/.csv."""
    folder = Path(folder).expanduser()
    meta = next((folder / name for name in FOLDER_METADATA if (folder / name).exists()), None)
    if meta is None:
        raise InputError(
            f"{folder} has no captions file; add one of {', '.join(FOLDER_METADATA)} with columns"
            " file_name (or image) and text (or caption / captions)"
        )
    base = Path(image_root).expanduser() if image_root else folder
    pairs = []
    for row, where in _read_rows(meta):
        image = str(row.get("file_name") or row.get("image") or row.get("image_path") or "").strip()
        captions = _captions_of(row)
        if not image or not captions or not all(captions):
            raise InputError(f"{where}: each row needs file_name (or image) and a non-empty text, caption or captions")
        path = _resolve(image, base)
        image_id = str(row.get("image_id") or image)
        pairs.extend(Pair(str(path), caption, image_id, source=str(folder)) for caption in captions)
    if not pairs:
        raise InputError(f"{meta} holds no pairs")
    return pairs


# ----- Karpathy-split JSON (Flickr30K, COCO) -----------------------------------------------------
def load_karpathy(
    path: str | Path,
    split: str | None = KARPATHY_DEFAULT_SPLIT,
    image_root: str | Path | None = None,
    data: Any = None,
) -> list[Pair]:
    """The Karpathy split files (dataset_flickr30k.json, dataset_coco.json): each image has a filename,
    an optional filepath (COCO's train2014/val2014), a split and its sentences. `split` may name
    several, e.g. "train,restval" (COCO's usual training set); None takes every image. `data` is the
    already parsed file, if the caller has it."""
    path = Path(path).expanduser()
    if data is None:
        data = _parse_json(path)
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise InputError(f"{path} is not Karpathy-split JSON: expected an object with an 'images' list")
    wanted = None if split is None else {s.strip() for s in re.split(r"[,+]", split) if s.strip()}
    base = Path(image_root).expanduser() if image_root else path.parent
    pairs, found = [], {}
    for n, item in enumerate(images):
        if not isinstance(item, dict) or "filename" not in item or not isinstance(item.get("sentences"), list):
            raise InputError(f"{path}: images[{n}] needs 'filename' and a 'sentences' list")
        filename, filepath = item["filename"], item.get("filepath", "")
        named = isinstance(filename, str) and filename.strip() and isinstance(filepath, str)
        if not named or "\x00" in filename + filepath:
            raise InputError(f"{path}: images[{n}] needs 'filename' (and any 'filepath') as a non-empty file name")
        item_split = str(item.get("split", ""))
        found[item_split] = found.get(item_split, 0) + 1
        if wanted is not None and item_split not in wanted:
            continue
        relative = Path(filepath) / filename
        image_id = str(item.get("cocoid", item.get("imgid", relative)))
        for m, sentence in enumerate(item["sentences"]):
            raw = sentence.get("raw", "") if isinstance(sentence, dict) else sentence
            if not isinstance(raw, str):
                raise InputError(f"{path}: images[{n}].sentences[{m}] must be text or an object with 'raw' text")
            caption = raw.strip()
            if not caption:
                raise InputError(f"{path}: images[{n}].sentences[{m}] has no 'raw' text")
            pairs.append(Pair(str(base / relative), caption, image_id, source=f"{path.name}:{item_split}"))
    if not pairs:
        available = ", ".join(f"{s} ({c} images)" for s, c in sorted(found.items())) or "none"
        raise InputError(f"{path} has no images in split {split!r}; its splits: {available}")
    return pairs


def _parse_json(path: Path) -> Any:
    """The whole file as one JSON document, or None if it is not one (e.g. JSON Lines named .json)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path} is not UTF-8 text: {exc.reason}") from exc
    except (ValueError, RecursionError):
        return None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


# ----- webdataset shards -----------------------------------------------------------------------
def _expand_braces(pattern: str) -> list[str]:
    """shard-{000..003}.tar -> shard-000.tar ... shard-003.tar (also {a,b}), as webdataset writes them."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    options = (
        [str(i).zfill(len(rng.group(1))) for i in range(int(rng.group(1)), int(rng.group(2)) + 1)] if rng else body.split(",")
    )
    return [x for option in options for x in _expand_braces(head + option + tail)]


def webdataset_shards(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
    else:
        shards = [Path(p) for pattern in _expand_braces(str(path)) for p in (sorted(glob.glob(pattern)) or [pattern])]
    missing = [str(s) for s in shards if not s.is_file()]
    if not shards or missing:
        raise InputError(f"webdataset shards not found: {', '.join(missing) or source}")
    return shards


def _samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) per sample; the webdataset convention: the key is the member path up to
    the first dot of its file name, the rest is the (lower-cased) extension. Members of a sample are
    consecutive in the tar."""
    key, sample = None, {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not dot or name.startswith("."):
                    continue
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if key is not None:
                        yield key, sample
                    key, sample = member_key, {}
                sample[ext.lower()] = tar.extractfile(member).read()
    except tarfile.TarError as exc:
        raise InputError(f"{shard} is not a readable tar shard: {exc}") from exc
    if key is not None:
        yield key, sample


def _caption_from_sample(sample: dict[str, bytes]) -> list[str]:
    for ext in ("txt", "caption", "text"):
        if ext in sample:
            return [sample[ext].decode("utf-8", errors="replace").strip()]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except (ValueError, RecursionError):  # not JSON, or bytes of no Unicode encoding
            return []
        return _captions_of(meta) if isinstance(meta, dict) else []
    return []


def load_webdataset(source: str | Path, cache_root: Path | None = None) -> list[Pair]:
    """Pairs from webdataset shards. The images are extracted once into XBT_HOME/datasets/webdataset
    (one folder per shard file: path, size and mtime), since every encoder reads images from files."""
    from xbt.paths import cache_dir

    pairs: list[Pair] = []
    skipped = 0
    for shard in webdataset_shards(str(source)):
        stat = shard.stat()
        digest = hashlib.sha256(f"{shard.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:20]
        out = (cache_root or cache_dir("datasets", "webdataset")) / f"{shard.stem}-{digest}"
        out.mkdir(parents=True, exist_ok=True)
        for key, sample in _samples(shard):
            image_ext = next((e for e in sample if "." + e.rsplit(".", 1)[-1] in IMAGE_SUFFIXES), None)
            captions = [c for c in _caption_from_sample(sample) if c]
            if image_ext is None or not captions:
                skipped += 1
                continue
            target = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + "." + image_ext.rsplit(".", 1)[-1])
            if not target.exists():
                tmp = target.with_suffix(target.suffix + ".tmp")
                tmp.write_bytes(sample[image_ext])
                tmp.replace(target)
            pairs.extend(Pair(str(target), c, f"{shard.name}:{key}", source=str(shard)) for c in captions)
    if skipped:
        warnings.warn(f"{skipped} webdataset samples had no image or no caption and were left out", stacklevel=2)
    if not pairs:
        raise InputError(f"no image-caption samples in {source}: each needs <key>.jpg (or png, ...) and <key>.txt")
    return pairs


# ----- one entry point ---------------------------------------------------------------------------
def open_dataset(source: str | Path, split: str | None = None, image_root: str | Path | None = None) -> list[Pair]:
    """Pairs from any supported source (see the module docstring), with every image file checked."""
    text = str(source)
    if text == "testbed" or text.startswith("testbed:"):
        from xbt.data.testbed import SPLITS, load_split

        name = text.partition(":")[2] or split or "eval"
        if name not in SPLITS:
            raise InputError(f"the testbed has no split {name!r}; it has {', '.join(SPLITS)}")
        return load_split(name)
    if text.startswith("domain:"):
        from xbt.data.domains import load_domain

        return load_domain(text.partition(":")[2])
    path = Path(text).expanduser()
    if path.is_dir():
        if split and (path / split).is_dir():
            path = path / split
        if any((path / name).exists() for name in FOLDER_METADATA):
            pairs = load_image_folder(path, image_root)
        elif any(path.glob("*.tar")):
            pairs = load_webdataset(path)
        else:
            raise InputError(
                f"{path} is a folder without a captions file ({', '.join(FOLDER_METADATA)}) or .tar shards"
            )
    elif ".tar" in path.name or "{" in text or "*" in text:
        pairs = load_webdataset(text)
    elif not path.exists():
        raise InputError(f"dataset not found: {path} (give a .csv/.jsonl pairs file, a Karpathy .json, a folder or shards)")
    elif path.suffix == ".json" and isinstance(data := _parse_json(path), dict) and "images" in data:
        pairs = load_karpathy(path, split or KARPATHY_DEFAULT_SPLIT, image_root, data=data)
    else:
        pairs = load_pairs(path, image_root)
    check_images_exist(pairs, hint="pass --image-root (image_root=...) if the images live elsewhere")
    return pairs


def open_images(source: str | Path, image_root: str | Path | None = None) -> list[Pair]:
    """Unlabeled images (`--fit-images`): a folder of image files (any depth; no captions file needed), a
    .txt list of image paths (one a line, relative to image_root or the list's folder), or any dataset
    source `open_dataset` reads, whose captions are then ignored. Returned as pairs with empty captions."""
    text = str(source)
    path = Path(text).expanduser()
    plain_folder = path.is_dir() and not any((path / name).exists() for name in FOLDER_METADATA) and not any(path.glob("*.tar"))
    if plain_folder:
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    elif path.suffix == ".txt" and path.is_file():
        base = Path(image_root).expanduser() if image_root else path.parent
        files = [_resolve(line.strip(), base) for line in path.read_text().splitlines() if line.strip()]
        if not files:
            raise InputError(f"{path} lists no image paths (one a line)")
    else:
        return [Pair(p.image, "", p.image_id, p.source) for p in open_dataset(source, None, image_root)]
    pairs = [Pair(str(f), "", str(f)) for f in files]
    check_images_exist(pairs, hint="pass --image-root if the listed images live elsewhere")
    return pairs


def check_images_exist(pairs: Iterable[Pair], hint: str = "") -> None:
    seen: set[str] = set()
    missing: dict[str, None] = {}  # ordered, for a stable message
    for pair in pairs:
        if pair.image not in seen:
            seen.add(pair.image)
            if not Path(pair.image).is_file():
                missing[pair.image] = None
    if missing:
        first = list(missing)[:3]
        raise InputError(f"{len(missing)} image files not found, e.g. {', '.join(first)}" + (f"; {hint}" if hint else ""))


def describe_pairs(pairs: list[Pair]) -> dict[str, Any]:
    """Sizes a report states: pairs, distinct images and captions per image."""
    n_images = len({p.image_id for p in pairs})
    return {"n_pairs": len(pairs), "n_images": n_images, "captions_per_image": round(len(pairs) / max(1, n_images), 2)}
