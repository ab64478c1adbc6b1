"""Vision-language models behind one interface (`VLPModel`), and the embedding space that stamps their
vectors. Backends: open_clip (models/openclip.py), Hugging Face CLIP / SigLIP (models/hf.py), and xbt's
lit models (models/lit.py). Spec strings are resolved one layer up, by `xbt.specs.load_model`."""

from __future__ import annotations

from xbt.models.base import EmbeddingSpace, VLPModel, weights_fingerprint

__all__ = ["EmbeddingSpace", "VLPModel", "weights_fingerprint"]
