"""Fuzzing the file readers with malformed input (hypothesis): pairs files (CSV, JSON Lines), Karpathy JSON,
captioned image folders, webdataset shards and images. Whatever the bytes, a reader returns pairs (or an
image) or raises InputError with a message; any other exception is a bug. A bounded number of examples
runs in the fast suite; the slow suite runs many more (FUZZ_EXAMPLES overrides both)."""

from __future__ import annotations

import io
import json
import os
import string
import tarfile
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from xbt.data.datasets import load_image_folder, load_karpathy, load_pairs, load_webdataset, open_dataset
from xbt.data.images import load_image
from xbt.errors import InputError

FAST = int(os.environ.get("FUZZ_EXAMPLES", 40))
SLOW = int(os.environ.get("FUZZ_EXAMPLES", 600))


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _png(size: tuple[int, int] = (4, 4), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return buf.getvalue()


VALID_IMAGES = {"png": _png(), "jpeg": _png(fmt="JPEG"), "gif": _png(fmt="GIF"), "bmp": _png(fmt="BMP"),
                "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"><rect width="4" height="4"/></svg>'}

# ----- strategies ---------------------------------------------------------------------------------
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**12), st.floats(allow_nan=True),
                         st.text(max_size=12), st.sampled_from(["", " ", "a.png", "../x.jpg", "/abs/y.png", "\x00", "[1, 2]"]))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
field_names = st.sampled_from(["image", "caption", "image_id", "text", "file_name", "filepath", "image_path",
                               "captions", "sentences", "raw", "split", "filename", "cocoid", "imgid", "images"])
rows = st.dictionaries(st.one_of(field_names, st.text(max_size=6)), json_values, max_size=6)


def _mutate(data: bytes, cuts: list[int], flips: list[tuple[int, int]]) -> bytes:
    """Truncations and byte flips of a valid file."""
    out = bytearray(data)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value
    for cut in cuts:
        if out:
            out = out[: cut % (len(out) + 1)]
    return bytes(out)


mutations = st.tuples(st.lists(st.integers(0, 10**6), max_size=1),
                      st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6))
junk = st.one_of(st.binary(max_size=300), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))


@st.composite
def pairs_file_bytes(draw, suffix: str) -> bytes:
    """A pairs file: mostly well-formed rows with malformed ones mixed in, or junk, or a mutated good file."""
    kind = draw(st.sampled_from(["rows", "junk", "mutated"]))
    if kind == "junk":
        return draw(junk)
    if suffix == ".jsonl":
        lines = draw(st.lists(st.one_of(rows.map(json.dumps), json_values.map(json.dumps), st.text(max_size=30)), max_size=6))
        text = "\n".join(lines)
    else:
        header = draw(st.lists(st.one_of(field_names, st.text(alphabet=string.printable, max_size=6)), min_size=0, max_size=4))
        body = draw(st.lists(st.lists(st.text(alphabet=string.printable + "\x00\"',", max_size=10), max_size=5), max_size=5))
        text = "\n".join([",".join(header)] + [",".join(cells) for cells in body])
    data = text.encode("utf-8", "surrogatepass")
    return _mutate(data, *draw(mutations)) if kind == "mutated" else data


@st.composite
def karpathy_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["structured", "structured", "junk", "mutated"]))
    good = {"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": "a red square"}]}]}
    if kind == "junk":
        return draw(junk)
    if kind == "mutated":
        return _mutate(json.dumps(good).encode(), *draw(mutations))
    item = st.one_of(rows, st.fixed_dictionaries(
        {"filename": json_values, "sentences": st.one_of(json_values, st.lists(st.one_of(rows, json_values), max_size=3))},
        optional={"split": json_values, "filepath": json_values, "cocoid": json_values, "imgid": json_values}))
    top = draw(st.one_of(st.fixed_dictionaries({"images": st.one_of(json_values, st.lists(item, max_size=4))}), json_values))
    return json.dumps(top).encode()


@st.composite
def tar_bytes(draw) -> bytes:
    """A webdataset shard with odd members (names, extensions, contents, links, folders), or a broken one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for _ in range(draw(st.integers(0, 5))):
            stem = draw(st.one_of(st.sampled_from(["s0", "s1", "sub/s2", ".hidden", "a.b.c", "../up", "s0"]),
                                  st.text(alphabet=string.ascii_letters + "./_-", min_size=1, max_size=12)))
            ext = draw(st.sampled_from(["png", "jpg", "txt", "json", "caption", "text", "PNG", "tar", "", "svg"]))
            kind = draw(st.sampled_from(["file", "file", "file", "dir", "symlink"]))
            info = tarfile.TarInfo(f"{stem}.{ext}" if ext else stem)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, draw(st.sampled_from(["/etc/passwd", "s0.png", "../x"]))
                tar.addfile(info)
                continue
            if ext in ("png", "jpg", "PNG", "svg"):
                data = draw(st.one_of(st.sampled_from(list(VALID_IMAGES.values())), junk))
            elif ext == "json":
                text = draw(st.one_of(rows.map(json.dumps), json_values.map(json.dumps), st.text(max_size=20)))
                data = text.encode("utf-8", "surrogatepass")
            else:
                data = draw(junk)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    if draw(st.booleans()):
        data = _mutate(data, *draw(mutations))
    return data


@st.composite
def image_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["junk", "mutated", "mutated", "svg"]))
    if kind == "junk":
        return draw(junk)
    if kind == "svg":
        body = draw(st.text(alphabet=string.printable, max_size=80))
        head = draw(st.sampled_from(["<svg ", "<?xml version='1.0'?><svg ", "<svg xmlns='http://www.w3.org/2000/svg' "]))
        return (head + body).encode()
    return _mutate(draw(st.sampled_from(list(VALID_IMAGES.values()))), *draw(mutations))


# ----- the property: a result or an InputError, nothing else --------------------------------------
def _only_input_errors(call) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # readers may warn about what they leave out
        try:
            return call()
        except InputError as exc:
            assert str(exc), "an InputError without a message"
            return exc


@contextmanager
def _scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="xbt-fuzz-") as folder:
        yield Path(folder)


def _pairs_case(data: bytes, suffix: str) -> None:
    with _scratch() as folder:
        Image.new("RGB", (4, 4)).save(folder / "a.png")
        path = folder / f"pairs{suffix}"
        path.write_bytes(data)
        result = _only_input_errors(lambda: load_pairs(path))
        if isinstance(result, list):
            assert result and all(p.caption and p.image for p in result)
        _only_input_errors(lambda: open_dataset(path))


def _karpathy_case(data: bytes) -> None:
    with _scratch() as folder:
        Image.new("RGB", (4, 4)).save(folder / "a.png")
        path = folder / "dataset_fuzz.json"
        path.write_bytes(data)
        _only_input_errors(lambda: open_dataset(path))
        _only_input_errors(lambda: open_dataset(path, split="train,restval"))
        parsed = None
        try:
            parsed = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            pass
        _only_input_errors(lambda: load_karpathy(path, data=parsed, split=None))


def _folder_case(data: bytes, name: str) -> None:
    with _scratch() as folder:
        Image.new("RGB", (4, 4)).save(folder / "a.png")
        (folder / name).write_bytes(data)
        _only_input_errors(lambda: load_image_folder(folder))
        _only_input_errors(lambda: open_dataset(folder))


def _tar_case(data: bytes) -> None:
    with _scratch() as folder:
        (folder / "shard-000.tar").write_bytes(data)
        result = _only_input_errors(lambda: load_webdataset(folder / "shard-000.tar", cache_root=folder / "cache"))
        if isinstance(result, list):
            for pair in result:  # whatever a shard names its members, images land in the cache folder only
                assert Path(pair.image).resolve().is_relative_to((folder / "cache").resolve())


def _image_case(data: bytes) -> None:
    result = _only_input_errors(lambda: load_image(data))
    if isinstance(result, Image.Image):
        assert result.mode == "RGB"
    with _scratch() as folder:
        for suffix in (".png", ".svg"):
            (folder / f"x{suffix}").write_bytes(data)
            _only_input_errors(lambda path=folder / f"x{suffix}": load_image(path))


CASES = {
    "jsonl": (pairs_file_bytes(".jsonl"), lambda d: _pairs_case(d, ".jsonl")),
    "csv": (pairs_file_bytes(".csv"), lambda d: _pairs_case(d, ".csv")),
    "karpathy": (karpathy_bytes(), _karpathy_case),
    "folder-jsonl": (pairs_file_bytes(".jsonl"), lambda d: _folder_case(d, "metadata.jsonl")),
    "folder-csv": (pairs_file_bytes(".csv"), lambda d: _folder_case(d, "captions.csv")),
    "webdataset": (tar_bytes(), _tar_case),
    "image": (image_bytes(), _image_case),
}


def _run(name: str, examples: int) -> None:
    strategy, case = CASES[name]

    @fuzz(examples)
    @given(strategy)
    def check(data: bytes) -> None:
        case(data)

    check()


@pytest.mark.parametrize("name", sorted(CASES))
def test_readers_give_input_errors_on_malformed_files(name, monkeypatch, tmp_path):
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    _run(name, FAST)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_readers_give_input_errors_on_malformed_files_many_cases(name, monkeypatch, tmp_path):
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    _run(name, SLOW)
