"""Text corpora for the text-only fits: the cheap resource the text-only stage and text-fitted peers use."""

from __future__ import annotations

from pathlib import Path

from xbt.errors import InputError


def load_texts(source: str, split: str | None = None, image_root: str | None = None) -> list[str]:
    """A text corpus: `testbed:text_corpus`, a .txt file (one text per line), or the captions of any dataset."""
    from xbt.data.datasets import open_dataset

    if source == "testbed:text_corpus":
        from xbt.data.testbed import load_text_corpus

        return load_text_corpus()
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        if not path.is_file():
            raise InputError(f"text corpus not found: {path}")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise InputError(f"{path} holds no text")
        return texts
    return list(dict.fromkeys(p.caption for p in open_dataset(source, split, image_root)))
