"""Locked pretrained single-modality towers for lit models: EfficientNet-Lite images, sentence-transformers text."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from xbt.assets import efficientnet_lite_weights, resolve_text_tower
from xbt.errors import AssetMissingError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EFFICIENTNET_LITE_SIZES = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}


class PadToSquare:
    """Pad on white to a square so the whole object survives the centre crop."""

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w == h:
            return img
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        return canvas


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Identity of a weights file: size plus hashes of its head and tail (fast on big files)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(chunk))
        f.seek(max(0, size - chunk))
        digest.update(f.read(chunk))
    return digest.hexdigest()


class LockedTower(nn.Module):
    """A pretrained tower that stays in inference mode: `train()` does not switch its BatchNorm to batch
    statistics or turn on its dropout / drop-connect, so a feature never depends on the batch it was in."""

    def train(self, mode: bool = True) -> LockedTower:
        return super().train(False)


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An EfficientNet(-Lite) in inference form: every BatchNorm folded into the convolution before it (the
    conv's weight scaled, a bias added) and replaced by an identity. `net` is changed in place and returned;
    pass a copy. Equal to the original in eval mode up to float rounding."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        pairs += [(block, conv, bn) for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"),
                                                     ("_project_conv", "_bn2")) if hasattr(block, conv)]
    for owner, conv, bn in pairs:
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv).eval(), getattr(owner, bn).eval()))
        setattr(owner, bn, nn.Identity())
    left = [name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise RuntimeError(f"fold_batchnorm: BatchNorm layers left unfolded: {left[:3]} (an unexpected architecture)")
    return net


class EfficientNetLiteTower(LockedTower):
    """EfficientNet-Lite (ImageNet weights) -> globally average-pooled last conv stage (1280-d).

    With autograd on, `forward` runs the network as published (differentiable). With autograd off (encoding,
    feature extraction) it runs an inference form of the same network, 4-5x faster on a CPU: every BatchNorm
    folded into its convolution, channels-last memory. The two agree to float rounding (within 1e-4;
    tests/test_testbed.py checks it); `cache_id` names the inference form, so vectors of another form are
    cached apart. The folded copy lives outside the module's parameters: the tower's weights, state_dict and
    fingerprint are the published network's, and the copy is rebuilt when those weights change."""

    #: The inference form; part of `cache_id` (change it whenever the inference numerics change).
    INFERENCE_FORM = "bnfold-cl"

    def __init__(self, variant: str = "lite0", weights: str | Path | None = None):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        path = _efficientnet_weights(variant, weights)
        self.variant = variant
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on every load
            self.net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path))
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        self.out_dim = int(self.net._conv_head.out_channels)
        self.eval()
        self.image_size = EFFICIENTNET_LITE_SIZES[variant]
        self.cache_id = _efficientnet_cache_id(variant, path)
        self._inference: tuple[Any, nn.Module | None] | None = None  # (key, folded net); not a submodule
        from torchvision import transforms  # here, not at import: torchvision's import pulls in torch._dynamo

        self.transform = transforms.Compose(
            [
                PadToSquare(),
                transforms.Resize(self.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def config(self) -> dict[str, Any]:
        return {"kind": "efficientnet-lite", "variant": self.variant}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.net if torch.is_grad_enabled() else self._inference_net(pixels.device)
        if net is not self.net:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return net.extract_features(pixels).mean(dim=(2, 3))

    def _inference_net(self, device: torch.device) -> nn.Module:
        """The folded, channels-last copy of `net` for `device`, rebuilt when a weight or buffer of `net`
        changed in place (its version counter moved); `net` itself when it cannot be folded (an adapter
        inside, an unknown layout): such a tower runs as published."""
        tensors = list(self.net.parameters()) + list(self.net.buffers())
        key = (device, len(tensors), sum(t._version for t in tensors))
        if self._inference is None or self._inference[0] != key:
            try:
                with torch.no_grad():
                    folded = fold_batchnorm(copy.deepcopy(self.net).eval()).to(device, memory_format=torch.channels_last)
            except (AttributeError, RuntimeError, TypeError):
                folded = None
            self._inference = (key, folded)
        folded = self._inference[1]
        return self.net if folded is None else folded


class SentenceTransformerTower(LockedTower):
    """Any sentence-transformers folder (local path or `asset:NAME`) -> its sentence embedding."""

    def __init__(self, source: str):
        super().__init__()
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar is noise in every command

        self.source = source
        path = resolve_text_tower(source)
        self.st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        dim = getattr(self.st, "get_embedding_dimension", None) or self.st.get_sentence_embedding_dimension
        self.out_dim = int(dim())
        self.cache_id = _sentence_transformer_cache_id(path)
        # Gradient checkpointing of the encoder blocks (XBT stage 2's `gradient_checkpointing`): activation
        # memory of one block instead of all, for one more forward of each block in the backward pass.
        self.checkpoint_blocks = False
        self.eval()

    def config(self) -> dict[str, Any]:
        return {"kind": "sentence-transformers", "source": self.source}

    @property
    def transformer(self) -> nn.Module:
        """The underlying Hugging Face transformer (where LoRA adapters go)."""
        return self.st[0].auto_model

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        # sentence-transformers >= 6 calls it `preprocess`; older releases `tokenize`.
        prepare = getattr(self.st, "preprocess", None) or self.st.tokenize
        return prepare(list(texts))

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.checkpoint_blocks and torch.is_grad_enabled() and self.encoder_layers() is not None:
            with self._running_layers(slice(None)):
                return self.st(dict(tokens))["sentence_embedding"]
        return self.st(dict(tokens))["sentence_embedding"]

    # ----- the forward split at a layer (XBT's stage 2 caches the frozen lower layers' output) ---------
    def encoder_layers(self) -> nn.ModuleList | None:
        """The transformer's block list when the backend is a BERT-style encoder (`embeddings`, then
        `encoder.layer`: BERT, MPNet, RoBERTa, ...), else None: no split forward for it."""
        hf = self.transformer
        layers = getattr(getattr(hf, "encoder", None), "layer", None)
        return layers if isinstance(getattr(hf, "embeddings", None), nn.Module) and isinstance(layers, nn.ModuleList) else None

    @contextlib.contextmanager
    def _running_layers(self, part: slice, embedded: torch.Tensor | None = None):
        """Within the block: the transformer runs only the blocks `part` of its block list, and, when
        `embedded` is given, those blocks start from it instead of the embedding layer's output. Everything
        else (attention mask, MPNet's relative position bias, pooling, normalisation) is the model's own code.
        With `checkpoint_blocks` set and gradients on, each running block is recomputed in the backward pass
        instead of keeping its activations (`torch.utils.checkpoint`)."""
        layers = self.encoder_layers()
        if layers is None:
            raise AssetMissingError(f"{self.source}: its transformer is not a BERT-style encoder; no split forward")
        encoder, hf = self.transformer.encoder, self.transformer
        hook = hf.embeddings.register_forward_hook(lambda _m, _a, _out: embedded) if embedded is not None else None
        running = list(layers)[part]
        if self.checkpoint_blocks and torch.is_grad_enabled():
            running = [_Checkpointed(layer) for layer in running]
        encoder.layer = nn.ModuleList(running)
        try:
            yield
        finally:
            encoder.layer = layers
            if hook is not None:
                hook.remove()

    def hidden_after(self, tokens: dict[str, torch.Tensor], n_layers: int) -> torch.Tensor:
        """Token states (batch, length, width) after the first `n_layers` blocks: the input of block `n_layers`."""
        with self._running_layers(slice(0, n_layers)):
            return self.st[0](dict(tokens))["token_embeddings"]

    def forward_from(self, tokens: dict[str, torch.Tensor], hidden: torch.Tensor, n_layers: int) -> torch.Tensor:
        """The sentence embedding from `hidden_after(tokens, n_layers)`: the remaining blocks, pooling and
        normalisation. forward_from(t, hidden_after(t, n), n) == forward(t), to float precision."""
        with self._running_layers(slice(n_layers, None), hidden):
            return self.st(dict(tokens))["sentence_embedding"]


class _Checkpointed(nn.Module):
    """One encoder block whose activations are recomputed in the backward pass (non-reentrant
    `torch.utils.checkpoint`, the RNG state replayed, so dropout draws the same masks: the same gradients)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


# ----- a tower from its config, and its identity without building it ---------------------------------------
def _efficientnet_weights(variant: str, weights: str | Path | None) -> Path:
    if variant not in EFFICIENTNET_LITE_SIZES:
        raise AssetMissingError(f"unknown EfficientNet-Lite variant {variant!r}; use {sorted(EFFICIENTNET_LITE_SIZES)}")
    return Path(weights) if weights else efficientnet_lite_weights(variant)


def _efficientnet_cache_id(variant: str, path: Path) -> str:
    return f"efficientnet-{variant}-{_file_digest(path)[:12]}-eval-{EfficientNetLiteTower.INFERENCE_FORM}"


def _sentence_transformer_cache_id(path: Path) -> str:
    weights = next(iter(sorted(path.glob("*.safetensors"))), None) or next(iter(sorted(path.glob("*.bin"))), None)
    ident = _file_digest(weights) if weights else hashlib.sha256(str(path).encode()).hexdigest()
    return f"st-{path.name}-{ident[:12]}"


def _kind(config: dict[str, Any]) -> str:
    kind = config.get("kind")
    if kind not in ("efficientnet-lite", "sentence-transformers"):
        raise AssetMissingError(f"unknown tower kind {kind!r} in model config; use efficientnet-lite or sentence-transformers")
    return str(kind)


def build_tower(config: dict[str, Any]) -> nn.Module:
    if _kind(config) == "efficientnet-lite":
        return EfficientNetLiteTower(config.get("variant", "lite0"), config.get("weights"))
    return SentenceTransformerTower(config["source"])


def tower_cache_id(config: dict[str, Any]) -> str:
    """The `cache_id` the tower of `config` has once built, from its weight files alone (their size, head and
    tail: milliseconds, nothing loaded). A lit model checks its recorded space against these."""
    if _kind(config) == "efficientnet-lite":
        variant = config.get("variant", "lite0")
        return _efficientnet_cache_id(variant, _efficientnet_weights(variant, config.get("weights")))
    return _sentence_transformer_cache_id(resolve_text_tower(config["source"]))
