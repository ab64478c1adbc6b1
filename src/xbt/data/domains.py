"""Evaluation domains off the testbed's training domain, built from data that installs offline.

The testbed trains and tunes everything on Tux Paint stamps and openclipart drawings. A method that
fits those few hundred pairs too closely looks good there and fails on other images: a second domain
that nothing ever trains or tunes on shows it. Sources (`open_dataset("domain:NAME")`)::

    domain:emoji   every single-code-point emoji of Unicode's emoji-test.txt (Debian `unicode-data`),
                   rendered from Noto Color Emoji (Debian `fonts-noto-color-emoji`, a CBDT bitmap
                   font drawn at its one strike, 109 px) by Pillow, on a transparent square; the
                   caption is the emoji's CLDR short name ("grinning face with smiling eyes" ->
                   "Grinning face with smiling eyes"), so every caption is distinct. Left out: emoji
                   sequences (skin tones, ZWJ families and professions, keycaps, country flags), the
                   Component group (skin-tone and hair swatches), code points the font lacks, and
                   every emoji whose caption equals a caption of the testbed (any split, the text
                   corpus included; compared lower-cased, punctuation and a leading article dropped),
                   so no caption is shared with anything that trains or chooses.

The rendered images, the pair list and a manifest (sources with their sha256, counts, the captions
dropped for overlap) are cached under XBT_HOME/domains/emoji, keyed by the font, the emoji list, the
rendering version and the testbed's captions. Neither the font nor the emoji list is ever committed:
the setup installs both (`./run.sh`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from xbt.assets import SETUP_HINT
from xbt.data.pairs import Pair, read_pairs, write_pairs
from xbt.errors import AssetMissingError, InputError
from xbt.paths import cache_dir

DOMAINS = ("emoji",)
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
EMOJI_STRIKE = 109  # the one bitmap size Noto Color Emoji carries; FreeType refuses others
EMOJI_MARGIN = 8  # transparent pixels around the glyph's square
EMOJI_VERSION = "2"  # bump when the selection, the captions or the rendering change
SKIPPED_GROUPS = ("Component",)
_VARIATION_SELECTOR = 0xFE0F
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*([a-z-]+)\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")
_ASCII = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


@dataclass(frozen=True)
class EmojiEntry:
    codepoint: int
    name: str  # CLDR short name, as emoji-test.txt spells it
    group: str
    subgroup: str

    @property
    def caption(self) -> str:
        return emoji_caption(self.name)

    @property
    def key(self) -> str:
        return f"U+{self.codepoint:04X}"


def emoji_caption(name: str) -> str:
    """The caption of an emoji: its CLDR short name in ASCII quotes, the first letter upper-cased
    (the openclipart titles' form; no guessed article, which plurals and proper nouns would get wrong)."""
    text = " ".join(name.translate(_ASCII).split())
    if not text:
        raise InputError("an emoji needs a non-empty name")
    return text[0].upper() + text[1:]


def caption_key(caption: str) -> str:
    """What two captions must share to count as the same: lower-case words, punctuation and a
    leading article dropped ("A brown potato." == "brown potato")."""
    words = re.sub(r"[^a-z0-9]+", " ", caption.lower().translate(_ASCII).replace("'", "")).split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def parse_emoji_test(text: str) -> list[EmojiEntry]:
    """The fully-qualified single-code-point emoji of an emoji-test.txt (a trailing U+FE0F, the emoji
    presentation selector, is part of a single emoji); sequences and the Component group are left out."""
    group = subgroup = ""
    entries = []
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.partition(":")[2].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.partition(":")[2].strip()
        elif line.strip() and not line.startswith("#"):
            match = _LINE.match(line.strip())
            if not match:
                raise InputError(f"not an emoji-test.txt line: {line!r}")
            codes, status, name = match.groups()
            points = [int(c, 16) for c in codes.split() if int(c, 16) != _VARIATION_SELECTOR]
            if status == "fully-qualified" and len(points) == 1 and group not in SKIPPED_GROUPS:
                entries.append(EmojiEntry(points[0], name.strip(), group, subgroup))
    return entries


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _require(path: Path, package: str) -> Path:
    if not path.is_file():
        raise AssetMissingError(f"{path} not found: `apt-get install {package}` (as root), or {SETUP_HINT}")
    return path


def _font_codepoints(font: Path) -> set[int]:
    try:
        from fontTools.ttLib import TTFont  # installed with matplotlib
    except ImportError as exc:
        raise AssetMissingError(f"fontTools is needed to read {font.name}'s character map: pip install fonttools") from exc
    with TTFont(str(font), lazy=True) as tt:
        return set(tt.getBestCmap())


@lru_cache(maxsize=4)
def _face(font: str, size: int):
    from PIL import ImageFont

    try:
        return ImageFont.truetype(font, size, layout_engine=ImageFont.Layout.BASIC)
    except OSError as exc:  # FreeType: a bitmap font has no strike of this size
        raise InputError(f"cannot load {font} at {size} px ({exc}); Noto Color Emoji draws at {EMOJI_STRIKE} px only") from exc


def render_emoji(codepoint: int, font: Path | None = None, size: int = EMOJI_STRIKE, margin: int = EMOJI_MARGIN):
    """One emoji as an RGBA image: the colour glyph, at the font's size, centred on a transparent square
    of the glyph cell plus `margin` (152 px for Noto Color Emoji)."""
    from PIL import Image, ImageDraw

    font = _require(Path(font or EMOJI_FONT), "fonts-noto-color-emoji")
    face = _face(str(font), size)
    char = chr(codepoint)
    canvas = Image.new("RGBA", (2 * size, 2 * size), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((size // 4, size // 4), char, font=face, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise InputError(f"U+{codepoint:04X} renders as nothing in {font.name}")
    glyph = canvas.crop(box)
    # One square for every emoji (the glyph cell plus the margin): a small symbol stays small.
    cell = ImageDraw.Draw(canvas).textbbox((0, 0), char, font=face)
    side = max(cell[2] - cell[0], cell[3] - cell[1], *glyph.size) + 2 * margin
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return square


def testbed_captions() -> list[str]:
    """Every caption of the built testbed (each split and the text corpus): what the domain leaves out."""
    from xbt.data.testbed import testbed_dir

    folder = testbed_dir() / "splits"
    corpus = folder / "text_corpus.txt"
    if not corpus.exists():
        raise AssetMissingError(
            "domain:emoji leaves out every caption the testbed trains or chooses on, and the testbed is not"
            " built yet: run `./run.sh xbt testbed build` first"
        )
    captions = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    for split in sorted(folder.glob("*.jsonl")):
        captions.extend(p.caption for p in read_pairs(split))
    return captions


def build_emoji_domain(
    exclude: Iterable[str],
    font: Path | None = None,
    emoji_test: Path | None = None,
    root: Path | None = None,
) -> tuple[list[Pair], dict[str, Any]]:
    """The emoji domain's pairs and manifest, leaving out every emoji whose caption matches one of
    `exclude` (see caption_key). Rendered once and cached under `root` (XBT_HOME/domains/emoji)."""
    font = _require(Path(font or EMOJI_FONT), "fonts-noto-color-emoji")
    emoji_test = _require(Path(emoji_test or EMOJI_TEST), "unicode-data")
    excluded = sorted({caption_key(c) for c in exclude} - {""})
    font_sha, test_sha = _sha256(font), _sha256(emoji_test)
    key = hashlib.sha256(
        json.dumps([EMOJI_VERSION, EMOJI_STRIKE, EMOJI_MARGIN, font_sha, test_sha, excluded]).encode()
    ).hexdigest()[:16]
    base = Path(root) if root else cache_dir("domains", "emoji")
    out = base / f"emoji-{key}"
    pairs_file, manifest_file = out / "pairs.jsonl", out / "manifest.json"
    if pairs_file.exists() and manifest_file.exists():
        pairs = read_pairs(pairs_file)
        if all(Path(p.image).is_file() for p in pairs):
            return pairs, json.loads(manifest_file.read_text())

    text = emoji_test.read_text(encoding="utf-8")
    entries = parse_emoji_test(text)
    if not entries:
        raise InputError(f"{emoji_test} lists no single-code-point emoji: is it Unicode's emoji-test.txt?")
    in_font = _font_codepoints(font)
    missing = [e for e in entries if e.codepoint not in in_font]
    entries = [e for e in entries if e.codepoint in in_font]
    excluded_set = set(excluded)
    overlap = [e for e in entries if caption_key(e.caption) in excluded_set]
    kept, seen = [], set()
    for e in entries:
        k = caption_key(e.caption)
        if k in excluded_set or k in seen:  # CLDR names are unique; the second of a clash is dropped
            continue
        seen.add(k)
        kept.append(e)

    images = base / f"render-v{EMOJI_VERSION}-{font_sha[:16]}-{EMOJI_STRIKE}-{EMOJI_MARGIN}"
    images.mkdir(parents=True, exist_ok=True)
    pairs = []
    for e in kept:
        target = images / f"{e.key}.png"
        if not target.exists():
            tmp = target.with_name(target.name + ".tmp.png")
            render_emoji(e.codepoint, font).save(tmp)
            tmp.replace(target)
        pairs.append(Pair(str(target), e.caption, f"emoji:{e.key}", source="emoji"))
    version = next((line.partition(":")[2].strip() for line in text.splitlines()[:20] if line.startswith("# Version:")), "")
    manifest = {
        "domain": "emoji",
        "version": EMOJI_VERSION,
        "sources": {
            "font": {"path": str(font), "sha256": font_sha, "debian_package": "fonts-noto-color-emoji", "strike_px": EMOJI_STRIKE},
            "emoji_test": {"path": str(emoji_test), "sha256": test_sha, "debian_package": "unicode-data", "emoji_version": version},
        },
        "n_single_codepoint_emoji": len(entries) + len(missing),
        "n_not_in_font": len(missing),
        "n_overlap_dropped": len(overlap),
        "n_excluded_captions": len(excluded),
        "n_pairs": len(pairs),
        "groups": dict(Counter(e.group for e in kept).most_common()),
        "overlap_dropped": [e.caption for e in overlap],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_pairs(pairs_file, pairs)
    tmp = manifest_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    tmp.replace(manifest_file)
    return pairs, manifest


def load_domain(name: str) -> list[Pair]:
    """The pairs of a second evaluation domain by name (`domain:emoji`); never for training."""
    if name != "emoji":
        raise InputError(f"there is no evaluation domain {name!r}; domains: {', '.join(DOMAINS)} (e.g. domain:emoji)")
    pairs, _ = build_emoji_domain(testbed_captions(), EMOJI_FONT, EMOJI_TEST)
    return pairs


def domain_manifest(name: str) -> dict[str, Any]:
    """The manifest of a built domain (sources, counts, captions dropped for overlap)."""
    if name != "emoji":
        raise InputError(f"there is no evaluation domain {name!r}; domains: {', '.join(DOMAINS)}")
    return build_emoji_domain(testbed_captions(), EMOJI_FONT, EMOJI_TEST)[1]
