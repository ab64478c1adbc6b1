"""Hugging Face transformers backend: CLIPModel and SiglipModel from a hub id or a local folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from xbt.errors import AssetMissingError
from xbt.models.base import VLPModel

# Two sentences that share no word: a real tokenizer gives them different ids, a broken one (all unknown) does not.
_PROBE = ("a photograph of a red apple", "the dog sleeps under wooden tables")


def check_tokenizer(tokenizer: Any, source: str) -> None:
    """Refuse a tokenizer that maps every word to the unknown token (a known offline trap of transformers 5)."""
    ids = [tokenizer(t)["input_ids"] for t in _PROBE]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    words = [[i for i in seq if i not in special] for seq in ids]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not all(words) or set(words[0]) == set(words[1]) or all(i == unk for seq in words for i in seq):
        raise AssetMissingError(
            f"the tokenizer loaded from {source} is degenerate (every word maps to the same ids); its files are"
            " missing or incomplete. Point xbt at a folder with the tokenizer files (tokenizer.json or vocab/merges)."
        )


class HFModel(VLPModel):
    """`hf:openai/clip-vit-base-patch32`, `hf:google/siglip-base-patch16-224`, or `hf:/local/folder`."""

    def __init__(self, source: str):
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

        local = Path(source).expanduser()
        where = str(local) if local.exists() else source
        try:
            config = AutoConfig.from_pretrained(where)
            self.model = AutoModel.from_pretrained(where, config=config)
            self.tokenizer = AutoTokenizer.from_pretrained(where)
            self.processor = AutoImageProcessor.from_pretrained(where)
        except OSError as exc:
            raise AssetMissingError(
                f"cannot load Hugging Face model {source!r}: {exc}. Offline, give a local folder that holds the"
                " config, weights, tokenizer and preprocessor files."
            ) from exc
        if config.model_type not in ("clip", "siglip", "siglip2"):
            raise AssetMissingError(f"{source} is a {config.model_type!r} model; xbt's hf backend takes CLIP or SigLIP")
        check_tokenizer(self.tokenizer, source)
        self.model.eval()
        self.model_type = config.model_type
        self._embed_dim = int(getattr(config, "projection_dim", None) or config.text_config.hidden_size)
        self.spec = f"hf:{source}"

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def image_transform(self):
        def transform(img: Image.Image) -> torch.Tensor:
            return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

        return transform

    @property
    def text_transformer(self) -> torch.nn.Module:
        """Where LoRA adapters go on the text side (`q_proj`, `v_proj` of `text_model`)."""
        return self.model.text_model

    def tokenize(self, texts: Sequence[str]) -> Any:
        # SigLIP was trained with max-length padding; CLIP pads to the longest text in the batch.
        padding = "max_length" if self.model_type.startswith("siglip") else True
        return dict(self.tokenizer(list(texts), padding=padding, truncation=True, return_tensors="pt"))

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def forward_text(self, tokens: Any) -> torch.Tensor:
        return _features(self.model.get_text_features(**tokens))


def _features(out: Any) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from get_*_features."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "text_embeds", "image_embeds"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"unexpected output type from transformers: {type(out).__name__}")
