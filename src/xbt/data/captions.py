"""Cleaning openclipart titles into usable English captions (many are author tags, file names or not English)."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable

_JUNK = re.compile(
    r"(clip ?art|collection|part of|\bby\b|untitled|various|architetto|\bsvg\b|\bpng\b|\bicon set\b|openclipart"
    r"|\bremix\b|\bsimple\b$|\bhttps?\b|\bwww\b|@)",
    re.IGNORECASE,
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


DICTIONARY = "/usr/share/dict/american-english"  # Debian package wamerican


def english_vocabulary(*word_files: str) -> set[str]:
    """Lower-case English words of two letters or more (plus "a") from word lists: an uncased BERT
    WordPiece vocabulary (its '##' pieces and [special] tokens are skipped) and/or a dictionary."""
    vocabulary = {"a"}
    for word_file in word_files:
        with open(word_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                w = line.strip()
                if len(w) > 1 and w.isascii() and w.isalpha() and w.islower():
                    vocabulary.add(w)
    return vocabulary


def clean_title(title: str, vocabulary: set[str], max_words: int = 6) -> str | None:
    """A caption from a clip-art title, or None when the title is not a plain English description."""
    text = html.unescape(title).strip()
    text = re.sub(r"\s+", " ", text.replace("_", " ").replace("-", " "))
    if not text or _JUNK.search(text) or re.search(r"\d", text) or not text.isascii():
        return None
    words = _WORD.findall(text.lower())
    if not words or len(words) > max_words or len(" ".join(words)) < 3:
        return None
    if not all(w in vocabulary for w in words):
        return None
    if len(words) == 1 and len(words[0]) < 3:
        return None
    caption = " ".join(words)
    return caption[0].upper() + caption[1:]


def cap_copies(items: Iterable[tuple[str, str]], max_copies: int = 2) -> list[tuple[str, str]]:
    """Keep at most `max_copies` items per caption (in the given order): repeated titles are author tags."""
    counts: dict[str, int] = {}
    kept = []
    for key, caption in items:
        norm = caption.lower()
        if counts.get(norm, 0) < max_copies:
            counts[norm] = counts.get(norm, 0) + 1
            kept.append((key, caption))
    return kept
