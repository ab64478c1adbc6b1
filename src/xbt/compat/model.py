"""A compatible model: the new model (+ optional LoRA adapters) + a query map per tower into the old space.

Every upgrade method ends as one: XBT (a trained projection + LoRA), and each fitted peer (Procrustes,
the affine map, the residual adapter, no adaptation, and SLERP, which also runs the old model on every
query). Its `encode_text` / `encode_image` return vectors in the OLD space and it declares the old
space as its own, so a gallery stamped with the old space accepts its queries.

Each query tower has its own map (`query_map_for("text")`, `query_map_for("image")`), and the two may be
one and the same map object (every method up to format 2). They differ for the gallery-modality methods:
text queries search the old IMAGE gallery, so the text tower's map is the one fitted on images (new image
-> old image), and the image tower's map the one fitted on texts (xbt.compat.gallery_modality). One
artifact format (version 3; versions 2 and 1 are still read and give the same vectors):

    compat_config.json        what to load, the spaces, each tower's map config and file, sha256 of every weight file
    map.safetensors           the query map's weights, when both towers share one map
    map_text.safetensors, map_image.safetensors   each tower's map, when they differ
    lora_text/, lora_image/   peft adapters (adapter_config.json + adapter_model.safetensors), if trained

Loading needs the new model (and, for an ensemble, the old model, named in the config), never anything
else; the weight files are checked against their recorded digests, so a folder changed in place after
it was saved (or after a chain recorded it) is refused rather than silently served.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from xbt.compat.lora import (
    image_lora_target,
    inject_lora,
    lora_config,
    lora_parameters,
    text_lora_target,
)
from xbt.compat.maps import Projection, QueryMap, build_map
from xbt.durable import file_sha256
from xbt.errors import AssetMissingError, InputError, SpaceMismatchError
from xbt.models.base import EmbeddingSpace, VLPModel, tensors_fingerprint, weights_fingerprint, write_json
from xbt.models.device import model_device

CONFIG_NAME = "compat_config.json"
MAP_NAME = "map.safetensors"
FORMAT = "xbt.compat/3"
_FORMAT_2 = "xbt.compat/2"  # one map for both towers: config["map"], map.safetensors
_FORMAT_1 = "xbt.compat/1"  # XBT-only artifacts of the first version: projection.safetensors, no digests
READABLE_FORMATS = (FORMAT, _FORMAT_2, _FORMAT_1)
TOWERS = ("text", "image")
TOWER_MAP_NAMES = {tower: f"map_{tower}.safetensors" for tower in TOWERS}
#: What each query tower's map serves: text queries search old images, image queries old captions.
TOWER_DIRECTION = {"text": "t2i", "image": "i2t"}

QueryMaps = Mapping[str, QueryMap]  # {"text": map, "image": map}; the two may be one object


def _check_tower(tower: str) -> str:
    if tower not in TOWERS:
        raise InputError(f"a query tower is 'text' or 'image', not {tower!r}")
    return tower


def map_file_names(maps: QueryMaps) -> dict[str, str]:
    """Each tower's weight file in the artifact: one shared file when both towers use one map."""
    if maps["text"] is maps["image"]:
        return {"text": MAP_NAME, "image": MAP_NAME}
    return dict(TOWER_MAP_NAMES)


def artifact_digest(path: str | Path) -> str:
    """One digest of a saved compatible model: its config (which holds its weight files' digests)."""
    return file_sha256(Path(path) / CONFIG_NAME)


class CompatibleModel(VLPModel):
    def __init__(
        self,
        new_model: VLPModel,
        query_map: QueryMap | QueryMaps,
        old_space: EmbeddingSpace,
        new_spec: str | None = None,
        old_model: VLPModel | None = None,
        method: str = "xbt",
    ):
        """`query_map`: one map for both query towers, or {"text": map, "image": map} (one per tower)."""
        super().__init__()
        maps = _as_tower_maps(query_map)
        for tower, m in maps.items():
            if m.in_dim != new_model.embed_dim or m.out_dim != old_space.dim:
                raise SpaceMismatchError(
                    f"the {tower} tower's query map maps {m.in_dim}->{m.out_dim}, but the new model is"
                    f" {new_model.embed_dim}-d and the old space {old_space.dim}-d"
                )
        needs_old = any(m.needs_old_query for m in maps.values())
        if needs_old:
            if old_model is None:
                raise InputError(f"{method} is an ensemble: it needs the old model too (pass old_model=)")
            old_space.check(old_model.space, f"the old model given to {method}")
        self.new_model = new_model
        device = model_device(new_model)  # the maps run where the new model runs
        self.text_query_map = maps["text"].to(device)
        self.image_query_map = maps["image"].to(device)  # the same module when the towers share a map
        self.old_model = old_model if needs_old else None
        self.old_space = old_space
        self.method = method
        self.new_spec = new_spec or new_model.spec
        self.new_space_at_training = new_model.space
        self.lora_configs: dict[str, Any] = {}
        self.provenance: dict[str, Any] = {}  # written into compat_config.json (e.g. what a chain was made of)
        self.spec = ""  # a spec is what load_model resolves: set when saved or loaded (compat:PATH)
        for p in new_model.parameters():
            p.requires_grad_(False)
        if "_placement" in vars(new_model):  # wrapping a configured model: encode at its precision and workers
            object.__setattr__(self, "_placement", new_model.placement)
        if self.old_model is not None:
            for p in self.old_model.parameters():
                p.requires_grad_(False)

    # ----- identity: the old space, declared ---------------------------------------------------
    @property
    def space(self) -> EmbeddingSpace:
        return self.old_space

    @property
    def embed_dim(self) -> int:
        return self.old_space.dim

    @property
    def display_name(self) -> str:
        return self.spec or f"{self.method} ({self.new_spec} -> {self.old_space.id})"

    @property
    def needs_old_model_at_query_time(self) -> bool:
        return any(m.needs_old_query for m in self.query_maps().values())

    def query_maps(self) -> dict[str, QueryMap]:
        """{"text": the text tower's map, "image": the image tower's map}; one object when they share it."""
        return {"text": self.text_query_map, "image": self.image_query_map}

    def query_map_for(self, tower: str) -> QueryMap:
        """The map applied to the queries of `tower` ("text" or "image"): text queries search the old image
        gallery (T2I), image queries the old caption gallery (I2T)."""
        return self.text_query_map if _check_tower(tower) == "text" else self.image_query_map

    @property
    def shares_query_map(self) -> bool:
        """True when both towers use one map (every method up to format 2; XBT's projection)."""
        return self.text_query_map is self.image_query_map

    @property
    def query_map(self) -> QueryMap:
        """The one map both towers share. A model with a map per tower (a gallery-modality method) has no
        single map: this raises, and `query_map_for(tower)` is the accessor to use."""
        if not self.shares_query_map:
            raise InputError(f"{self.method} has a query map per tower (text queries: {self.text_query_map.kind},"
                             f" image queries: {self.image_query_map.kind}); use query_map_for('text' | 'image')")
        return self.text_query_map

    @property
    def projection(self) -> QueryMap:
        """The shared query map (XBT's training code calls it the projection)."""
        return self.query_map

    def describe_query_maps(self) -> dict[str, Any]:
        """Which map each query tower uses, for `gallery info --model`, /info and the report."""
        fitted = self.provenance.get("maps_fitted_on", {})
        out: dict[str, Any] = {"shared": self.shares_query_map}
        for tower in TOWERS:
            m = self.query_map_for(tower)
            out[tower] = {"kind": m.kind, "searches": "old images" if tower == "text" else "old captions",
                          "fitted_on": fitted.get(tower, self.provenance.get("fits_on", "trained (see the model's config)"))}
        return out

    def runs_unadapted(self, tower: str, new_space: EmbeddingSpace) -> bool:
        """True when this model's `tower` ("image" or "text") is the plain new model of `new_space` (no
        LoRA adapters on it, not a chain): that model's cached features of the tower can simply be mapped."""
        return (tower not in self.lora_configs and not isinstance(self.new_model, CompatibleModel)
                and self.new_space_at_training == new_space)

    @property
    def encoder_id(self) -> str:
        """Its own weights (map, adapters) and the new model's: never the old model's cache entries."""
        ensemble = f"-{self.old_space.fingerprint[:12]}" if self.old_model is not None else ""
        if self.shares_query_map:  # as in format 2: the same id, so cached vectors stay valid
            maps = weights_fingerprint(self.text_query_map)
        else:
            maps = hashlib.sha256("|".join(f"{t}:{weights_fingerprint(self.query_map_for(t))}" for t in TOWERS)
                                  .encode()).hexdigest()
        return f"compat-{maps[:12]}-{self._new_encoder_fingerprint()[:12]}{ensemble}-{self.embed_dim}"

    def _new_encoder_fingerprint(self) -> str:
        """What the (adapted) new model computes: its space's fingerprint (a hash of its weights), then, for
        each tower with LoRA adapters, a hash of the adapters' weights; for a chain, the inner model's id.
        Read without building a tower whose adapters are still waiting for it (they are the saved ones)."""
        if isinstance(self.new_model, CompatibleModel):
            base = hashlib.sha256(self.new_model.encoder_id.encode()).hexdigest()
        else:
            base = self.new_model.space.fingerprint
        if not self.lora_configs:
            return base  # every peer: the plain new model, whose cached features the evaluation maps
        adapters = {f"{tower}.{k}": v for tower in self.lora_configs for k, v in self.lora_state(tower).items()}
        return tensors_fingerprint(adapters, extra=base)

    def map_features(self, new_vectors: Any, old_vectors: Any | None = None, tower: str | None = None) -> np.ndarray:
        """Old-space queries of `tower` ("text" or "image") from vectors the unadapted new model (and, for an
        ensemble, the old model) already computed: the evaluation's fast path. Valid for a tower without
        LoRA adapters. `tower` may be left out only when both towers share one map. NumPy in and out; a map
        on a GPU (the model was configured there) computes there."""
        query_map = self.query_map if tower is None else self.query_map_for(tower)
        return query_map.apply(new_vectors, old_vectors)  # on the map's device, as the map itself knows

    @property
    def image_transform(self):
        return self.new_model.image_transform

    def tokenize(self, texts: Sequence[str]) -> Any:
        return self.new_model.tokenize(texts)

    # ----- forward: new model -> unit vector -> map ---------------------------------------------
    def new_text(self, tokens: Any) -> torch.Tensor:
        """The (LoRA-adapted) new model's own normalised text embedding, before the map."""
        return F.normalize(self.new_model.forward_text(tokens), dim=-1)

    def new_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.new_model.forward_image(pixels), dim=-1)

    def _refuse_ensemble_forward(self) -> None:
        if self.old_model is not None:
            raise InputError(f"{self.method} is an ensemble: use encode_text / encode_image, which run both models")

    def forward_text(self, tokens: Any) -> torch.Tensor:
        self._refuse_ensemble_forward()
        return self.text_query_map(self.new_text(tokens))

    def forward_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self._refuse_ensemble_forward()
        return self.image_query_map(self.new_image(pixels))

    def encode_text(self, texts: Sequence[str], batch_size: int | None = None, show_progress: bool = False) -> torch.Tensor:
        if self.old_model is None:
            return super().encode_text(texts, batch_size, show_progress)
        new = self.new_model.encode_text(texts, batch_size, show_progress)
        old = self.old_model.encode_text(texts, batch_size, show_progress)
        return torch.from_numpy(self.map_features(new.numpy(), old.numpy(), tower="text"))

    def encode_image(self, images, batch_size: int | None = None, show_progress: bool = False,
                     num_workers: int | None = None) -> torch.Tensor:
        if self.old_model is not None and isinstance(images, torch.Tensor):
            raise InputError(f"{self.method} runs two models with their own preprocessing: pass images, not pixels")
        return super().encode_image(images, batch_size, show_progress, num_workers)

    def encode_image_items(self, images, batch_size: int | None = None, show_progress: bool = False,
                           num_workers: int | None = None, *, stop_on_failure: bool = False,
                           ) -> tuple[torch.Tensor, dict[int, str]]:
        """An ensemble runs both models (each on its own device and precision, set by `configure`); an
        image either decodes for both or is reported once, by position."""
        if self.old_model is None:
            return super().encode_image_items(images, batch_size, show_progress, num_workers, stop_on_failure=stop_on_failure)
        images = list(images)
        new, failed = self.new_model.encode_image_items(images, batch_size, show_progress, num_workers,
                                                        stop_on_failure=stop_on_failure)
        if failed and stop_on_failure:
            return new, failed
        kept = [i for i in range(len(images)) if i not in failed]
        old, old_failed = self.old_model.encode_image_items([images[i] for i in kept], batch_size, show_progress,
                                                            num_workers, stop_on_failure=stop_on_failure)
        if old_failed:  # decodable for the new model's preprocessing, not for the old one's: drop it from both
            failed.update({kept[j]: why for j, why in old_failed.items()})
            if stop_on_failure:
                return new, failed
            new = new[[j for j in range(len(kept)) if j not in old_failed]]
        return torch.from_numpy(self.map_features(new.numpy(), old.numpy(), tower="image")), failed

    def build_towers(self) -> CompatibleModel:
        self.new_model.build_towers()  # adapters waiting for a tower are injected as it is built
        if self.old_model is not None:
            self.old_model.build_towers()
        return self

    # ----- LoRA -----------------------------------------------------------------------------------
    def _lora_module(self, tower: str):
        return text_lora_target(self.new_model) if tower == "text" else image_lora_target(self.new_model)

    def enable_lora(self, tower: str, lora: dict[str, Any]) -> list[torch.nn.Parameter]:
        """Add LoRA adapters to the new model's text (or image) tower; returns the trainable parameters."""
        module = self._lora_module(tower)
        self.lora_configs[tower] = lora_config(module, lora)
        inject_lora(module, self.lora_configs[tower], tower)
        params = lora_parameters(module)
        for p in params:
            p.requires_grad_(True)
        return params

    def lora_state(self, tower: str) -> dict[str, torch.Tensor]:
        """The tower's adapter weights: read from the tower, or, while it waits to be built (a lit model's
        towers are built on first use), the saved weights that will be loaded into it."""
        saved = self.lora_configs.get(tower)
        if isinstance(saved, SavedLora) and not self.new_model.tower_built(tower):
            return {k: v.detach().contiguous().clone() for k, v in saved.state.items()}
        from peft import get_peft_model_state_dict

        return {k: v.detach().contiguous().clone() for k, v in get_peft_model_state_dict(self._lora_module(tower)).items()}

    def load_lora_state(self, tower: str, state: dict[str, torch.Tensor]) -> None:
        _load_lora_state(self._lora_module(tower), state)

    # ----- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write the artifact (safetensors + JSON, no pickle); the config is written last, so a folder
        with a config is complete, and it records the sha256 of every weight file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_NAME).unlink(missing_ok=True)
        files = map_file_names(self.query_maps())
        for stale in {MAP_NAME, *TOWER_MAP_NAMES.values()} - set(files.values()):
            (path / stale).unlink(missing_ok=True)  # a map file of an earlier save with the other layout
        for tower in TOWERS:  # a shared map is written once, to its one file
            if tower == "image" and self.shares_query_map:
                continue
            m = self.query_map_for(tower)
            save_file({k: v.detach().contiguous() for k, v in m.state_dict().items()}, str(path / files[tower]))
        weights = sorted(set(files.values()))
        for tower, config in self.lora_configs.items():
            folder = path / f"lora_{tower}"
            folder.mkdir(exist_ok=True)
            if isinstance(config, SavedLora):  # loaded from a folder: its config file as it was
                (folder / "adapter_config.json").write_text(config.config_json)
            else:
                config.save_pretrained(str(folder))
            save_file(self.lora_state(tower), str(folder / "adapter_model.safetensors"))
            weights += [f"lora_{tower}/adapter_model.safetensors", f"lora_{tower}/adapter_config.json"]
        config = {
            "format": FORMAT,
            "method": self.method,
            "new_model": self.new_spec,
            "new_space": self.new_space_at_training.to_dict(),
            "old_space": self.old_space.to_dict(),
            "maps": {tower: {"config": self.query_map_for(tower).config(), "file": files[tower]} for tower in TOWERS},
            "needs_old_model_at_query_time": self.needs_old_model_at_query_time,
            "lora": sorted(self.lora_configs),
            "weights_sha256": {name: file_sha256(path / name) for name in weights},
            **self.provenance,
            **(extra or {}),
        }
        if self.old_model is not None:
            if not self.old_model.spec:
                raise InputError(f"{self.method} needs its old model at query time, and that model has no spec to record;"
                                 " load the old model with xbt.load_model(SPEC)")
            config["old_model"] = self.old_model.spec
        write_json(path / CONFIG_NAME, config)
        self.spec = f"compat:{path.resolve()}"  # loadable by this name from now on
        return path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, new_model: VLPModel | None = None, old_model: VLPModel | None = None,
        load: Any = None,
    ) -> CompatibleModel:
        """Load a saved compatible model. `new_model` / `old_model`: already loaded models to use (they
        must be in the recorded spaces); otherwise they are loaded by their specs with `load` (the spec
        loader, xbt.specs.load_model, passed in by it)."""
        path = Path(path).expanduser()
        config = read_config(path)
        if new_model is None or (config.get("needs_old_model_at_query_time") and old_model is None):
            if load is None:
                raise InputError("from_pretrained needs the models, or a spec loader: use xbt.load_model('compat:PATH')")
        verify_weights(path, config)
        new_model = new_model or load(config["new_model"])
        expected = EmbeddingSpace.from_dict(config["new_space"])
        expected.check(new_model.space, f"the new model {config['new_model']!r} loaded for {path}")
        verify_chain(config, new_model)
        old_space = EmbeddingSpace.from_dict(config["old_space"])
        maps = load_query_maps(path, config)
        if any(m.needs_old_query for m in maps.values()):
            old_model = old_model or load(config["old_model"])
        model = cls(new_model, maps, old_space, config["new_model"], old_model, config.get("method", "xbt"))
        model.new_space_at_training = expected
        model.provenance = {k: config[k] for k in PROVENANCE_KEYS if k in config}
        for tower in config.get("lora", []):
            folder = path / f"lora_{tower}"
            saved = SavedLora((folder / "adapter_config.json").read_text(), load_file(str(folder / "adapter_model.safetensors")))
            model.lora_configs[tower] = saved
            # Injected into the tower when it is built: now for most backends; for a lit model on first use.
            new_model.when_built(tower, functools.partial(_attach_lora, tower=tower, saved=saved), key="LoRA adapters")
        model.spec = f"compat:{path.resolve()}"  # resolvable from anywhere: a chain can name it as its new model
        model.eval()
        return model


#: What a saved config carries back into `provenance` (and save_pretrained writes out again).
PROVENANCE_KEYS = ("chain", "fits_on", "details", "maps_fitted_on")


def _as_tower_maps(query_map: QueryMap | QueryMaps) -> dict[str, QueryMap]:
    if isinstance(query_map, QueryMap):
        return {"text": query_map, "image": query_map}
    if not isinstance(query_map, Mapping) or set(query_map) != set(TOWERS):
        raise InputError("a compatible model takes one query map, or one per tower: {'text': map, 'image': map}")
    for tower, m in query_map.items():
        if not isinstance(m, QueryMap):
            raise InputError(f"the {tower} tower's query map is a {type(m).__name__}, not a QueryMap")
    return {tower: query_map[tower] for tower in TOWERS}


def load_query_maps(path: Path, config: dict[str, Any]) -> dict[str, QueryMap]:
    """Each tower's map from a saved artifact, in any readable format (1 and 2: one map for both towers;
    3: a map per tower, one object when both name the same file)."""
    if config["format"] == _FORMAT_1:
        p = config["projection"]
        shared: QueryMap = Projection(p["in_dim"], p["out_dim"], p["kind"], p.get("hidden", 1024), p.get("dropout", 0.0))
        shared.load_state_dict(load_file(str(path / "projection.safetensors")))
        return {"text": shared, "image": shared}
    if config["format"] == _FORMAT_2:
        shared = build_map(config["map"])
        shared.load_state_dict(load_file(str(path / MAP_NAME)))
        return {"text": shared, "image": shared}
    entries = config.get("maps")
    if not isinstance(entries, dict) or set(entries) != set(TOWERS):
        raise AssetMissingError(f"{path / CONFIG_NAME} names no query map per tower (maps.text, maps.image); save the model again")
    by_file: dict[str, QueryMap] = {}
    for tower in TOWERS:
        file = entries[tower]["file"]
        if file not in by_file:
            m = build_map(entries[tower]["config"])
            m.load_state_dict(load_file(str(path / file)))
            by_file[file] = m
    return {tower: by_file[entries[tower]["file"]] for tower in TOWERS}


def _load_lora_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise SpaceMismatchError(f"LoRA weights do not fit the new model ({len(unexpected)} unexpected keys)")


@dataclass(frozen=True)
class SavedLora:
    """A tower's adapters as read from a saved model (peft's adapter_config.json text and the weights), kept
    until they are injected: peft (and transformers with it) is imported only when a tower is built."""

    config_json: str
    state: dict[str, torch.Tensor]

    def peft_config(self) -> Any:
        import tempfile

        from peft import LoraConfig

        with tempfile.TemporaryDirectory() as folder:  # peft's own reader, exactly as for a folder
            (Path(folder) / "adapter_config.json").write_text(self.config_json)
            return LoraConfig.from_pretrained(folder)


def _attach_lora(new_model: VLPModel, tower: str, saved: SavedLora) -> None:
    """Saved adapters into the new model's built tower (a function of the model alone, so a deep copy of a
    compatible model attaches them to its own copy of the new model)."""
    module = text_lora_target(new_model) if tower == "text" else image_lora_target(new_model)
    inject_lora(module, saved.peft_config(), tower)
    _load_lora_state(module, saved.state)


def read_config(path: Path) -> dict[str, Any]:
    if not (path / CONFIG_NAME).exists():
        raise AssetMissingError(
            f"{path} is not an xbt compatible model (no {CONFIG_NAME}); make one with `xbt train` or `xbt fit`")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise AssetMissingError(f"{path / CONFIG_NAME} cannot be read ({exc}); save the model again") from exc
    if config.get("format") not in READABLE_FORMATS:
        raise AssetMissingError(f"{path} has format {config.get('format')!r}; this xbt reads {', '.join(READABLE_FORMATS)}")
    return config


def verify_weights(path: Path, config: dict[str, Any]) -> None:
    """Every weight file must still be the one the config recorded (format 2 records them)."""
    for name, recorded in config.get("weights_sha256", {}).items():
        file = path / name
        if not file.exists():
            raise AssetMissingError(f"{path} is incomplete: {name} is missing; save or train the model again")
        if file_sha256(file) != recorded:
            raise SpaceMismatchError(
                f"{file} changed after {path / CONFIG_NAME} was written (its sha256 no longer matches): the model's"
                " declared spaces can no longer be trusted. Save the model again (xbt train / xbt fit) instead of"
                " editing its files in place.")


def verify_chain(config: dict[str, Any], new_model: VLPModel) -> None:
    """A chained model records the digest of its newer half; refuse a newer half changed since."""
    halves = config.get("chain")
    if not halves or not isinstance(halves[0], dict):
        return
    newer = halves[0]
    folder = Path(newer["spec"].removeprefix("compat:"))
    if artifact_digest(folder) != newer["digest"]:
        raise SpaceMismatchError(
            f"the chain's newer half {folder} was changed (retrained or edited) after the chain was made: its"
            " vectors may no longer live in the space the chain's second map expects. Rebuild the chain with"
            " `xbt chain`.")


def chain(newer: CompatibleModel, older: CompatibleModel) -> CompatibleModel:
    """Chained upgrade without retraining: `newer` maps v3 into v2's space, `older` maps v2 into v1's.
    The result runs v3 (with newer's adapters), then newer's map, then older's map, and declares v1's
    space, so it serves a v1 gallery. (older's LoRA adapters adapt v2, which the chain no longer runs;
    only its map is used.) Both halves' digests are recorded and the newer half's is checked on load."""
    if newer.needs_old_model_at_query_time or older.needs_old_model_at_query_time:
        raise InputError("a chain cannot contain an ensemble (SLERP needs its old model at query time, which a chain"
                         " does not run); chain map-only models (XBT, procrustes, affine, adapter)")
    older.new_space_at_training.check(newer.space, "the newer compatible model's vectors")
    folder = Path(newer.spec.removeprefix("compat:"))
    if not newer.spec.startswith("compat:") or not (folder / CONFIG_NAME).exists():
        raise InputError("chain() needs the newer compatible model loaded from disk (load_model('compat:PATH'))"
                         " so that the chained model can be saved and loaded again")
    # the absolute path: a saved chain names its newer half, and must load from any working directory
    # each tower runs through older's map of that tower (one object when older shares one map)
    chained = CompatibleModel(newer, older.query_maps(), older.old_space, f"compat:{folder.resolve()}", method="chain")
    halves = [{"spec": chained.new_spec, "digest": artifact_digest(folder)}, {"spec": older.spec}]
    older_folder = Path(older.spec.removeprefix("compat:"))
    if older.spec.startswith("compat:") and (older_folder / CONFIG_NAME).exists():
        halves[1]["digest"] = artifact_digest(older_folder)
    chained.provenance["chain"] = halves
    return chained
