"""Vision-language models behind one interface, and the model spec strings that name them.

Spec forms::

    openclip:ViT-B-32@openai          open_clip name + pretrained tag (or @/path/to/checkpoint.pt)
    openclip:local-dir:/path          an open_clip folder
    hf:openai/clip-vit-base-patch32   a Hugging Face CLIPModel / SiglipModel (hub id or local folder)
    lit:/path/to/folder               locked towers + trained heads (xbt's own format)
    compat:/path/to/folder            a compatible model (new model + projection [+ LoRA]) emitting old-space vectors
    testbed:old | testbed:new         the offline testbed's models, under XBT_HOME
"""

from __future__ import annotations

from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace, VLPModel, weights_fingerprint

__all__ = ["EmbeddingSpace", "VLPModel", "load_model", "weights_fingerprint"]


def load_model(spec: str) -> VLPModel:
    """Resolve a model spec string a user can type to a ready (eval-mode) model."""
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise InputError(f"model spec {spec!r} has no backend; write e.g. openclip:ViT-B-32@openai, hf:PATH, lit:PATH")
    if kind == "openclip":
        from xbt.models.openclip import OpenCLIPModel

        if rest.startswith(("local-dir:", "hf-hub:")):
            return OpenCLIPModel(rest)
        name, _, pretrained = rest.partition("@")
        return OpenCLIPModel(name, pretrained or None)
    if kind == "hf":
        from xbt.models.hf import HFModel

        return HFModel(rest)
    if kind == "lit":
        from xbt.models.lit import LitModel

        return LitModel.from_pretrained(rest)
    if kind == "compat":
        from xbt.compat.xbt import CompatibleModel

        return CompatibleModel.from_pretrained(rest)
    if kind == "testbed":
        from xbt.data.testbed import testbed_model_dir
        from xbt.models.lit import LitModel

        model = LitModel.from_pretrained(testbed_model_dir(rest))
        model.spec = spec
        return model
    raise InputError(f"unknown model backend {kind!r} in {spec!r}; use openclip, hf, lit, compat or testbed")
