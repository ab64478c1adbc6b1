"""Dataset readers on tiny files: pairs files, image folders, Karpathy JSON, webdataset shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from xbt.data.datasets import describe_pairs, load_pairs, open_dataset
from xbt.errors import InputError


def png(path: Path, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path)
    return path


def png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_csv_and_jsonl_pairs_resolve_paths_against_the_file_or_image_root(tmp_path):
    png(tmp_path / "img" / "a.png")
    (tmp_path / "pairs.csv").write_text("image,caption,image_id\nimg/a.png,a red square,a\nimg/a.png,red,a\n")
    pairs = open_dataset(tmp_path / "pairs.csv")
    assert [p.caption for p in pairs] == ["a red square", "red"]
    assert pairs[0].image == str(tmp_path / "img" / "a.png") and describe_pairs(pairs)["n_images"] == 1
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    pairs = open_dataset(tmp_path / "meta" / "pairs.jsonl", image_root=tmp_path / "img")
    assert pairs[0].image == str(tmp_path / "img" / "a.png")


def test_malformed_pairs_files_say_where(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "caption": "ok"}\n{not json\n')
    with pytest.raises(InputError, match="bad.jsonl:2"):
        load_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "empty_caption.csv").write_text("image,caption\na.png,\n")
    with pytest.raises(InputError, match="empty_caption.csv:2.*caption"):
        load_pairs(tmp_path / "empty_caption.csv")
    (tmp_path / "missing.csv").write_text("image,caption\nnowhere.png,a caption\n")
    with pytest.raises(InputError, match="1 image files not found.*image-root"):
        open_dataset(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="not found"):
        open_dataset(tmp_path / "absent.csv")


def test_image_folder_with_hugging_face_metadata(tmp_path):
    png(tmp_path / "train" / "cat.png")
    png(tmp_path / "train" / "sub" / "dog.png", (0, 0, 200))
    rows = [{"file_name": "cat.png", "text": "a cat"}, {"file_name": "sub/dog.png", "captions": ["a dog", "a puppy"]}]
    (tmp_path / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = open_dataset(tmp_path, split="train")
    assert [p.caption for p in pairs] == ["a cat", "a dog", "a puppy"]
    assert pairs[1].image_id == pairs[2].image_id == "sub/dog.png"
    with pytest.raises(InputError, match="captions file"):
        open_dataset(tmp_path / "train" / "sub")


def test_image_folder_with_captions_csv(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "captions.csv").write_text('image,caption\na.png,"one, with a comma"\n')
    assert open_dataset(tmp_path)[0].caption == "one, with a comma"


def karpathy(tmp_path: Path) -> Path:
    for name in ("val2014/1.jpg", "val2014/2.jpg", "train2014/3.jpg"):
        png(tmp_path / "coco" / name)
    doc = {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "1.jpg", "split": "test", "cocoid": 1,
         "sentences": [{"raw": "A man rides a horse.", "tokens": []}, {"raw": "Horse riding."}]},
        {"filepath": "val2014", "filename": "2.jpg", "split": "val", "cocoid": 2, "sentences": [{"raw": "A dog."}]},
        {"filepath": "train2014", "filename": "3.jpg", "split": "restval", "cocoid": 3, "sentences": [{"raw": "A cat."}]},
    ]}
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    return path


def test_karpathy_json_splits_filepaths_and_image_root(tmp_path):
    path = karpathy(tmp_path)
    test = open_dataset(path, image_root=tmp_path / "coco")  # default split: test
    assert [p.caption for p in test] == ["A man rides a horse.", "Horse riding."]
    assert {p.image_id for p in test} == {"1"} and test[0].image == str(tmp_path / "coco" / "val2014" / "1.jpg")
    assert [p.image_id for p in open_dataset(path, split="val,restval", image_root=tmp_path / "coco")] == ["2", "3"]
    with pytest.raises(InputError, match="restval \\(1 images\\).*test \\(1 images\\)"):
        open_dataset(path, split="train", image_root=tmp_path / "coco")
    with pytest.raises(InputError, match="image-root"):
        open_dataset(path)  # images are not beside the JSON


def test_malformed_karpathy_json(tmp_path):
    (tmp_path / "k.json").write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(InputError, match="images\\[0\\].*sentences"):
        open_dataset(tmp_path / "k.json")
    (tmp_path / "k2.json").write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test", "sentences": [{"raw": " "}]}]}))
    with pytest.raises(InputError, match="no 'raw' text"):
        open_dataset(tmp_path / "k2.json")


def test_what_the_reader_fuzz_found_gives_input_errors(tmp_path):
    """Each of these raised a bare UnicodeDecodeError, csv.Error, TypeError or ValueError before."""
    png(tmp_path / "a.png")
    cases = {
        "latin1.csv": ("image,caption\na.png,caf\xe9".encode("latin-1"), "not UTF-8"),
        "latin1.jsonl": ('{"image": "a.png", "caption": "caf\xe9"}'.encode("latin-1"), "not UTF-8"),
        "nul.csv": (b"image,caption\na.png,a\x00dog\n", "not a readable CSV|NUL"),
        "extra.csv": (b"image,caption\na.png,a dog,surplus\n", "more cells"),
        "listed.jsonl": (b'{"image": ["a.png"], "caption": "a dog"}\n', "must be text"),
        "deep.jsonl": (b"[" * 100_000 + b"]" * 100_000 + b"\n", "not valid JSON"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InputError, match=message):
            open_dataset(tmp_path / name)
    (tmp_path / "trailing.csv").write_bytes(b"image,caption\na.png,a dog,,\n")  # empty surplus cells: dropped
    assert [p.caption for p in open_dataset(tmp_path / "trailing.csv")] == ["a dog"]
    karpathy = {
        "k1.json": ({"images": [{"filename": None, "sentences": [{"raw": "x"}]}]}, "non-empty file name"),
        "k2.json": ({"images": [{"filename": "a.png", "filepath": 3, "sentences": ["x"]}]}, "non-empty file name"),
        "k3.json": ({"images": [{"filename": "a.png", "split": "test", "sentences": [{"raw": 7}]}]}, "must be text"),
    }
    for name, (data, message) in karpathy.items():
        (tmp_path / name).write_text(json.dumps(data))
        with pytest.raises(InputError, match=message):
            open_dataset(tmp_path / name)
    (tmp_path / "k4.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(InputError, match="not UTF-8"):
        open_dataset(tmp_path / "k4.json")


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards(tmp_path, monkeypatch):
    monkeypatch.setenv("XBT_HOME", str(tmp_path / "home"))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "part-000.tar", [
        ("sample000", {"jpg": png_bytes((255, 0, 0)), "txt": b"a red square"}),
        ("sub/sample001", {"png": png_bytes((0, 255, 0)), "json": json.dumps({"caption": "a green square"}).encode()}),
    ])
    write_shard(shards / "part-001.tar", [
        ("sample002", {"png": png_bytes((0, 0, 255)), "txt": b"a blue square"}),
        ("no-caption", {"png": png_bytes((9, 9, 9))}),
    ])
    with pytest.warns(UserWarning, match="1 webdataset samples"):
        pairs = open_dataset(str(shards / "part-{000..001}.tar"))
    assert [p.caption for p in pairs] == ["a red square", "a green square", "a blue square"]
    assert Image.open(pairs[2].image).getpixel((0, 0)) == (0, 0, 255)
    assert str(tmp_path / "home") in pairs[0].image  # extracted under XBT_HOME, once
    with pytest.warns(UserWarning):
        assert [p.image for p in open_dataset(shards)] == [p.image for p in pairs]  # a folder of shards
    with pytest.raises(InputError, match="not found"):
        open_dataset(str(shards / "part-{002..003}.tar"))
    (shards / "broken.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(InputError, match="not a readable tar"):
        open_dataset(shards / "broken.tar")


def test_testbed_sources_are_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("XBT_HOME", str(tmp_path))
    with pytest.raises(InputError, match="no split 'nope'"):
        open_dataset("testbed:nope")
    from xbt.errors import AssetMissingError

    with pytest.raises(AssetMissingError, match="testbed build"):
        open_dataset("testbed", split="val")
