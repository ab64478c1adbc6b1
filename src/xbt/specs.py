"""Model spec strings -> ready models: the one loader for every backend, compatible models included.

Spec forms::

    openclip:ViT-B-32@openai          open_clip name + pretrained tag (or @/path/to/checkpoint.pt)
    openclip:local-dir:/path          an open_clip folder
    hf:openai/clip-vit-base-patch32   a Hugging Face CLIPModel / SiglipModel (hub id or local folder)
    lit:/path/to/folder               locked towers + trained heads (xbt's own format)
    testbed:old | testbed:new         the offline testbed's lit models, under XBT_HOME
    compat:/path/to/folder            a compatible model (new model + query map [+ LoRA]) emitting old-space vectors

It sits above both the model backends and the upgrade methods (as peft's AutoPeftModel sits above
PeftModel): a compatible model names the models it wraps by their specs, and this resolves them.
"""

from __future__ import annotations

from pathlib import Path

from xbt.compat.model import CompatibleModel
from xbt.errors import InputError
from xbt.models.base import VLPModel

BACKENDS = ("openclip", "hf", "lit", "testbed", "compat")


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
    if kind == "testbed":
        from xbt.data.testbed import testbed_model_dir
        from xbt.models.lit import LitModel

        model = LitModel.from_pretrained(testbed_model_dir(rest))
        model.spec = spec
        return model
    if kind == "compat":
        return load_compatible(rest)
    raise InputError(f"unknown model backend {kind!r} in {spec!r}; use {', '.join(BACKENDS)}")


def load_compatible(
    path: str | Path, new_model: VLPModel | None = None, old_model: VLPModel | None = None
) -> CompatibleModel:
    """A saved compatible model; the models it wraps are loaded by their recorded specs unless given."""
    return CompatibleModel.from_pretrained(path, new_model=new_model, old_model=old_model, load=load_model)
