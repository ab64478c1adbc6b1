"""The second evaluation domain (domain:emoji): which emoji it takes, their captions, the rendering, the
cache, the testbed captions it leaves out, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xbt.data import domains
from xbt.data.domains import (
    build_emoji_domain,
    caption_key,
    emoji_caption,
    parse_emoji_test,
    render_emoji,
)
from xbt.errors import AssetMissingError, InputError

needs_font = pytest.mark.skipif(not domains.EMOJI_FONT.is_file(), reason="needs Debian fonts-noto-color-emoji (./run.sh setup)")

EMOJI_TEST = """\
# emoji-test.txt
# Version: 15.0

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # \U0001F600 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # \u263a\ufe0f E0.6 smiling face
263A                                                   ; unqualified         # \u263a E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B 1F3FB                                            ; fully-qualified     # \U0001F44B\U0001F3FB E1.0 waving hand: light skin tone
1F9D1 200D 1F52C                                       ; fully-qualified     # \U0001F9D1\u200d\U0001F52C E12.1 scientist

# subgroup: animal-mammal
1F436                                                  ; fully-qualified     # \U0001F436 E0.6 dog face
0041                                                   ; fully-qualified     # A E0.0 latin capital letter a

# group: Component

# subgroup: skin-tone
1F3FB                                                  ; component           # \U0001F3FB E1.0 light skin tone
1F9B0                                                  ; fully-qualified     # \U0001F9B0 E11.0 red hair

# group: Travel & Places

# subgroup: transport-sign
1F6B9                                                  ; fully-qualified     # \U0001F6B9 E0.6 men\u2019s room
1F201                                                  ; fully-qualified     # \U0001F201 E0.6 Japanese \u201chere\u201d button
"""


@pytest.fixture()
def emoji_test(tmp_path) -> Path:
    path = tmp_path / "emoji-test.txt"
    path.write_text(EMOJI_TEST, encoding="utf-8")
    return path


def test_parse_keeps_single_fully_qualified_emoji_only():
    entries = parse_emoji_test(EMOJI_TEST)
    assert [(e.key, e.name) for e in entries] == [
        ("U+1F600", "grinning face"),
        ("U+263A", "smiling face"),  # the presentation selector belongs to a single emoji; "unqualified" is a duplicate
        ("U+1F436", "dog face"),
        ("U+0041", "latin capital letter a"),
        ("U+1F6B9", "men\u2019s room"),
        ("U+1F201", "Japanese \u201chere\u201d button"),
    ]  # no skin tones, no ZWJ sequences, nothing of the Component group
    assert entries[0].group == "Smileys & Emotion" and entries[2].subgroup == "animal-mammal"
    with pytest.raises(InputError, match="not an emoji-test.txt line"):
        parse_emoji_test("1F600 grinning face\n")


def test_captions_and_the_overlap_key():
    assert emoji_caption("grinning face with smiling eyes") == "Grinning face with smiling eyes"
    assert emoji_caption("men\u2019s room") == "Men's room"
    assert emoji_caption("Japanese \u201chere\u201d button") == 'Japanese "here" button'
    assert emoji_caption("ATM sign") == "ATM sign"
    assert caption_key("A brown potato.") == caption_key("brown potato") == "brown potato"
    assert caption_key("An eye") == caption_key("Eye") and caption_key("The T-Rex!") == "t rex"
    assert caption_key("Men's room") == caption_key("men\u2019s room")
    assert caption_key("A dog") != caption_key("Dog face")
    with pytest.raises(InputError):
        emoji_caption("   ")


@needs_font
def test_render_is_a_colour_glyph_centred_on_a_transparent_square():
    image = render_emoji(0x1F600)  # grinning face: a yellow disc
    assert image.mode == "RGBA" and image.width == image.height
    assert 140 <= image.width <= 160
    rgba = np.asarray(image)
    opaque = rgba[..., 3] > 200
    assert 0.4 < opaque.mean() < 0.9, "a disc with a margin: neither empty nor full"
    assert not opaque[0].any() and not opaque[:, 0].any(), "the margin is transparent"
    r, g, b = (rgba[..., i][opaque].astype(int) for i in range(3))
    assert np.median(r) > 200 and np.median(g) > 150 and np.median(b) < 120, "colour, not a grey outline"
    ys, xs = np.nonzero(opaque)
    assert abs(xs.mean() - image.width / 2) < 6 and abs(ys.mean() - image.height / 2) < 8
    small = np.asarray(render_emoji(0x25AA))  # black small square: same canvas, small glyph
    assert small.shape == rgba.shape and (small[..., 3] > 200).mean() < 0.15
    with pytest.raises(InputError, match="renders as nothing"):
        render_emoji(0x20)  # the font's space


@needs_font
def test_build_selects_renders_caches_and_leaves_out_training_captions(tmp_path, emoji_test, monkeypatch):
    from xbt.data.images import load_image

    pairs, manifest = build_emoji_domain(["A dog face.", "Something else"], emoji_test=emoji_test, root=tmp_path / "d")
    captions = [p.caption for p in pairs]
    assert captions == ["Grinning face", "Smiling face", "Men's room", 'Japanese "here" button']
    assert [p.image_id for p in pairs][:2] == ["emoji:U+1F600", "emoji:U+263A"] and {p.source for p in pairs} == {"emoji"}
    assert manifest["n_single_codepoint_emoji"] == 6 and manifest["n_not_in_font"] == 1  # "A" is not an emoji glyph
    assert manifest["n_overlap_dropped"] == 1 and manifest["overlap_dropped"] == ["Dog face"]
    assert manifest["n_pairs"] == 4 and manifest["sources"]["emoji_test"]["emoji_version"] == "15.0"
    for pair in pairs:
        image = load_image(pair.image)
        assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)  # flattened on white
    on_disk = {p.image: Path(p.image).stat().st_mtime_ns for p in pairs}

    def no_render(*args, **kwargs):
        raise AssertionError("a cached domain must not render again")

    monkeypatch.setattr(domains, "render_emoji", no_render)
    again, manifest_again = build_emoji_domain(["something else", "dog face"], emoji_test=emoji_test, root=tmp_path / "d")
    assert again == pairs and manifest_again == json.loads(json.dumps(manifest))
    assert {p.image: Path(p.image).stat().st_mtime_ns for p in again} == on_disk
    # Other captions to leave out make another pair list, over the same rendered images: only the
    # emoji not rendered before is drawn.
    monkeypatch.undo()
    more, _ = build_emoji_domain(["grinning face"], emoji_test=emoji_test, root=tmp_path / "d")
    assert [p.caption for p in more] == ["Smiling face", "Dog face", "Men's room", 'Japanese "here" button']
    assert {p.image for p in more} - set(on_disk) == {str(Path(pairs[0].image).with_name("U+1F436.png"))}
    assert all(Path(p.image).stat().st_mtime_ns == on_disk[p.image] for p in more if p.image in on_disk)


@needs_font
def test_open_dataset_reads_domain_emoji_against_the_testbed_captions(xbt_home, emoji_test, monkeypatch):
    from xbt.data.datasets import open_dataset
    from xbt.data.pairs import Pair, write_pairs

    monkeypatch.setattr(domains, "EMOJI_TEST", emoji_test)
    with pytest.raises(AssetMissingError, match="testbed build"):
        open_dataset("domain:emoji")
    splits = xbt_home / "testbed" / "splits"
    splits.mkdir(parents=True)
    (splits / "text_corpus.txt").write_text("A smiling face.\nA red apple.\n")
    write_pairs(splits / "eval.jsonl", [Pair("/nowhere.png", "Men's room", "x")])  # evaluation captions too
    pairs = open_dataset("domain:emoji")
    assert [p.caption for p in pairs] == ["Grinning face", "Dog face", 'Japanese "here" button']
    assert all(Path(p.image).is_relative_to(xbt_home / "domains" / "emoji") for p in pairs)
    assert domains.domain_manifest("emoji")["overlap_dropped"] == ["Smiling face", "Men's room"]
    with pytest.raises(InputError, match="domain:emoji"):
        open_dataset("domain:icons")


def test_missing_packages_say_what_to_install(tmp_path, emoji_test, monkeypatch):
    with pytest.raises(AssetMissingError, match="apt-get install fonts-noto-color-emoji"):
        build_emoji_domain([], font=tmp_path / "NoSuchFont.ttf", emoji_test=emoji_test, root=tmp_path)
    monkeypatch.setattr(domains, "EMOJI_TEST", tmp_path / "missing-emoji-test.txt")
    with pytest.raises(AssetMissingError, match="apt-get install unicode-data"):
        build_emoji_domain([], font=emoji_test, root=tmp_path)  # any existing file passes the font check first


@pytest.mark.slow
@needs_font
@pytest.mark.skipif(not domains.EMOJI_TEST.is_file(), reason="needs Debian unicode-data (./run.sh setup)")
def test_the_real_domain_shares_no_caption_with_the_testbed():
    """On the installed packages and the built testbed: over a thousand distinct emoji, none captioned
    like anything the testbed trains or chooses on, every image readable."""
    from xbt.data.datasets import open_dataset
    from xbt.data.images import load_image
    from xbt.train.testbed import build_testbed

    build_testbed(("old", "new"), show_progress=False)
    pairs = open_dataset("domain:emoji")
    assert len(pairs) >= 1000
    keys = [caption_key(p.caption) for p in pairs]
    assert len(set(keys)) == len(keys) and len({p.image for p in pairs}) == len(pairs)
    assert not set(keys) & {caption_key(c) for c in domains.testbed_captions()}
    assert not any(0x1F3FB <= int(p.image_id.removeprefix("emoji:U+"), 16) <= 0x1F3FF for p in pairs)  # skin tones
    assert not any(0x1F1E6 <= int(p.image_id.removeprefix("emoji:U+"), 16) <= 0x1F1FF for p in pairs)  # flag letters
    manifest = domains.domain_manifest("emoji")
    assert manifest["n_pairs"] == len(pairs) and manifest["n_overlap_dropped"] == len(manifest["overlap_dropped"])
    for pair in pairs[:: max(1, len(pairs) // 50)]:
        assert load_image(pair.image).size == load_image(pairs[0].image).size  # one canvas for all
