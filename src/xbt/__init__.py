"""xbt: backfill-free upgrades of image-text retrieval systems.

The one-line entry points::

    from xbt import load_model
    old = load_model("lit:/path/to/old")          # any VLP model: openclip:, hf:, lit:
    vectors = old.encode_text(["a red apple"])      # L2-normalised, stamped with old.space
"""

from xbt.errors import XbtError
from xbt.models import EmbeddingSpace, VLPModel
from xbt.specs import load_model

__all__ = ["EmbeddingSpace", "VLPModel", "XbtError", "load_model"]
__version__ = "0.1.0"
