"""Caption cleaning, pair files, the feature cache."""

from __future__ import annotations

import numpy as np
import pytest

from xbt.data.captions import cap_copies, clean_title
from xbt.data.datasets import load_pairs
from xbt.data.features import FeatureCache, text_key
from xbt.errors import InputError

VOCAB = {"a", "red", "apple", "flower", "dog", "blue", "car", "house"}


@pytest.mark.parametrize(
    "title, expected",
    [
        ("red apple", "Red apple"),
        ("  Blue_car ", "Blue car"),
        ("Clipart by Nicu Buculei - arrow08_4", None),
        ("Part of the Flat Icon Collection", None),
        ("flower 3", None),
        ("barattolo di pillole", None),
        ("a", None),
        ("red apple red apple red apple dog", None),
    ],
)
def test_clean_title(title, expected):
    assert clean_title(title, VOCAB) == expected


def test_cap_copies_keeps_at_most_two():
    items = [("1", "Dog"), ("2", "dog"), ("3", "Dog"), ("4", "Car")]
    assert cap_copies(items) == [("1", "Dog"), ("2", "dog"), ("4", "Car")]


def test_load_pairs_jsonl_and_csv(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"image": "a.png", "caption": "a dog"}\n{"image": "/x/b.png", "caption": "a car", "image_id": "b"}\n')
    pairs = load_pairs(tmp_path / "p.jsonl")
    assert pairs[0].image == str(tmp_path / "a.png") and pairs[1].image_id == "b"
    (tmp_path / "p.csv").write_text("image,caption\na.png,a dog\n")
    assert load_pairs(tmp_path / "p.csv")[0].caption == "a dog"
    (tmp_path / "bad.csv").write_text("image,caption\na.png,\n")
    with pytest.raises(InputError, match="non-empty caption"):
        load_pairs(tmp_path / "bad.csv")


def test_feature_cache_computes_once_and_survives_reopen(xbt_home):
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return np.array([[float(i), 1.0] for i in idx])

    keys = [text_key(t) for t in ["a", "b", "a", "c"]]
    out = FeatureCache("enc").get_or_compute(keys, compute, chunk_size=2)
    assert out.shape == (4, 2) and np.array_equal(out[0], out[2])
    assert sum(len(c) for c in calls) == 3  # "a" once
    calls.clear()
    again = FeatureCache("enc").get_or_compute(keys, compute)
    assert calls == [] and np.array_equal(out, again)


def test_svgs_that_fail_to_render_are_counted_not_dropped_in_silence(tmp_path, xbt_home):
    """Before the fix, a broken SVG simply vanished from the testbed (`except Exception: return None`)."""
    import warnings

    from xbt.data import testbed

    good = tmp_path / "good.svg"
    good.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"'
                    ' fill="red"/></svg>')
    bad = tmp_path / "bad.svg"
    bad.write_text("<svg this is not xml")
    testbed.RENDER_FAILURES.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = testbed.render_svgs([good, bad], show_progress=False)
    assert set(done) == {good}
    assert list(testbed.RENDER_FAILURES) == [str(bad)] and testbed.RENDER_FAILURES[str(bad)]
    assert any("1 of 2 SVGs could not be rendered" in str(w.message) for w in caught)
