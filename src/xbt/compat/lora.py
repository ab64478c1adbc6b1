"""LoRA adapters on a new model's towers (peft): where they go, their config, injecting, their weights.

XBT tunes the frozen new model through these; a compatible model saves them beside its query map.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from xbt.errors import AssetMissingError, InputError
from xbt.models.base import VLPModel


def text_lora_target(model: VLPModel) -> nn.Module:
    """The module of a backend that holds its text transformer (where text LoRA adapters go)."""
    for attr in ("text_transformer",):
        if hasattr(model, attr):
            return getattr(model, attr)
    if hasattr(model, "text_tower") and hasattr(model.text_tower, "transformer"):
        return model.text_tower.transformer
    raise AssetMissingError(f"{type(model).__name__} exposes no text transformer for LoRA")


def image_lora_target(model: VLPModel) -> nn.Module:
    if hasattr(model, "image_tower"):
        return model.image_tower
    if hasattr(model, "model") and hasattr(model.model, "visual"):
        return model.model.visual
    if hasattr(model, "model") and hasattr(model.model, "vision_model"):
        return model.model.vision_model
    raise AssetMissingError(f"{type(model).__name__} exposes no image tower for LoRA")


def default_lora_targets(module: nn.Module) -> list[str]:
    """Attention query/value projections where the backend has linear ones, else the MLP (open_clip)."""
    names = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    for candidates in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["c_fc", "c_proj"]):
        if set(candidates) <= names:
            return candidates
    raise ValueError(f"cannot guess LoRA target modules among {sorted(names)[:20]}; set lora.target_modules")


def lora_config(module: nn.Module, lora: dict[str, Any]) -> Any:
    """The peft LoraConfig of a config file's `lora` section, for adapters on `module`."""
    from peft import LoraConfig

    targets = lora.get("target_modules") or default_lora_targets(module)
    layers = lora.get("layers")
    return LoraConfig(
        r=int(lora.get("r", 8)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets),
        layers_to_transform=layers,
        layers_pattern=layer_list_name(module) if layers is not None else None,
        init_lora_weights=True,
    )


def layer_list_name(module: nn.Module) -> str | None:
    """The name of the list that holds a transformer's blocks (`resblocks` in open_clip, `layer` in BERT-style
    encoders, `layers` in Hugging Face CLIP), so that peft can find a block's index for `lora.layers`."""
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) > 0:
            return name.rsplit(".", 1)[-1]
    return None


def inject_lora(module: nn.Module, config: Any, tower: str) -> None:
    """Inject peft LoRA adapters into `module` in place. A module that already carries adapters is refused:
    a second set would stack on the first (a new model object reused for a second compatible model)."""
    from peft import inject_adapter_in_model

    if lora_parameters(module):
        raise InputError(
            f"the new model's {tower} tower already carries LoRA adapters (from another compatible model, or a"
            " training run); load a fresh new model for each compatible model")
    inject_adapter_in_model(config, module)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n]


def text_gradient_checkpointing(model: VLPModel, enabled: bool) -> str:
    """Turn gradient checkpointing of the new model's text transformer on or off (XBT stage 2's
    `gradient_checkpointing`: the activations of one block are kept instead of every block's, for one more
    forward of each block in the backward pass; the gradients are the same). Says what it did: the testbed's
    sentence-transformers tower (`checkpoint_blocks`), open_clip (`set_grad_checkpointing`), a Hugging Face
    model that supports it (`gradient_checkpointing_enable`), or that this backend has none (left off)."""
    tower = getattr(model, "text_tower", None)
    if hasattr(tower, "checkpoint_blocks"):
        tower.checkpoint_blocks = enabled
        return "on: the text tower's encoder blocks (torch.utils.checkpoint)" if enabled else "off"
    inner = getattr(model, "model", None)
    if hasattr(inner, "set_grad_checkpointing"):  # open_clip: both towers' transformers
        inner.set_grad_checkpointing(enabled)
        return "on: open_clip set_grad_checkpointing" if enabled else "off"
    if getattr(inner, "supports_gradient_checkpointing", False):
        if enabled:
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return "on: transformers gradient_checkpointing_enable"
        inner.gradient_checkpointing_disable()
        return "off"
    return f"not available for {type(model).__name__}: off" if enabled else "off"


def frozen_text_prefix(model: VLPModel) -> int | None:
    """How many of the text tower's lower blocks carry no LoRA adapter, when the new model's text forward can be
    split there (`LitModel` over a BERT-style sentence-transformers tower: `text_head(tower.forward_from(...))`),
    else None. Those blocks' output is then the same at every training step and can be computed once."""
    tower, head = getattr(model, "text_tower", None), getattr(model, "text_head", None)
    if head is None or not hasattr(tower, "encoder_layers") or tower.encoder_layers() is None:
        return None
    adapted = [name for name, _ in tower.transformer.named_parameters() if "lora_" in name]
    if not adapted:
        return None
    first = None
    for name in adapted:  # every adapter must sit in a block: encoder.layer.<i>.
        parts = name.split(".")
        if "encoder" not in parts or parts[parts.index("encoder") + 1:parts.index("encoder") + 2] != ["layer"]:
            return None
        index = int(parts[parts.index("encoder") + 2])
        first = index if first is None else min(first, index)
    return first or None


def text_from_prefix(model: VLPModel, tokens: Any, hidden: Any, n_layers: int) -> Any:
    """The new model's text embedding (not normalised) from the output of its first `n_layers` text blocks:
    exactly `model.forward_text(tokens)` (see `frozen_text_prefix`)."""
    return model.text_head(model.text_tower.forward_from(tokens, hidden, n_layers))


def text_prefix_states(model: VLPModel, tokens: Any, n_layers: int) -> Any:
    """The output of the new model's first `n_layers` text blocks (no gradient: they are frozen)."""
    import torch

    with torch.no_grad():
        return model.text_tower.hidden_after(tokens, n_layers)
