"""A loaded lit model builds a tower only when something needs it; its space is the one its weights hash to.

A warm rerun of the main job reads every vector from the cache: it must not load (or hash) the towers' weights,
and a compatible model's LoRA adapters wait for the tower they go into. These tests pin that the shortcut never
changes an answer: the recorded space is the hashed one, vectors and adapters are those of an eager load, and a
record that no longer describes the files is not trusted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CORPUS
from safetensors.torch import load_file, save_file
from test_xbt_v2 import build_tiny_lit

from xbt.compat.maps import LinearMap
from xbt.compat.model import CompatibleModel, SavedLora
from xbt.durable import file_sha256
from xbt.errors import InputError
from xbt.models.base import EmbeddingSpace, weights_fingerprint
from xbt.models.lit import LitModel, record_space
from xbt.specs import load_model


@pytest.fixture(scope="module")
def lit_folder(tmp_path_factory):
    return build_tiny_lit(tmp_path_factory.mktemp("lazy"), "bert").removeprefix("lit:")


def test_a_loaded_lit_model_builds_no_tower_until_one_is_used(lit_folder, image_files):
    model = LitModel.from_pretrained(lit_folder)
    assert not model.tower_built("image") and not model.tower_built("text")
    space = model.space  # from the config's record: nothing built for it
    assert not model.tower_built("image") and not model.tower_built("text")
    assert model.tower_cache_id("text").startswith("st-") and not model.tower_built("text")
    texts = CORPUS[:5]
    with torch.inference_mode():  # built inside an encode's inference mode, still ordinary (trainable) weights
        vectors = model.encode_text(texts)
    assert model.tower_built("text") and not model.tower_built("image")
    assert not any(p.is_inference() for p in model.text_tower.parameters())
    eager = LitModel.from_pretrained(lit_folder).build_towers()
    torch.testing.assert_close(vectors, eager.encode_text(texts))
    torch.testing.assert_close(model.encode_image(image_files[:3]), eager.encode_image(image_files[:3]))
    # The recorded space is the one the weights hash to, and the built towers are the eager model's.
    assert space.fingerprint == weights_fingerprint(eager) == weights_fingerprint(model)
    assert model.state_dict().keys() == eager.state_dict().keys()


def test_a_record_that_does_not_describe_the_files_is_not_trusted(lit_folder, tmp_path):
    import shutil

    folder = tmp_path / "lit"
    shutil.copytree(lit_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    # Heads edited after the save (same shapes, other values): the record no longer holds, the weights are hashed.
    state = load_file(str(folder / "model.safetensors"))
    state["text_head.proj.weight"] = state["text_head.proj.weight"] * 2
    save_file(state, str(folder / "model.safetensors"))
    edited = LitModel.from_pretrained(folder)
    assert edited.tower_built("text") and edited.tower_built("image")  # built whole, as before records existed
    assert edited.space.fingerprint != config["space"]["fingerprint"]
    assert edited.space.fingerprint == weights_fingerprint(edited)
    # A folder from before spaces were recorded loads eagerly; record_space writes the record once.
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "space"}))
    assert LitModel.from_pretrained(folder).tower_built("text")
    assert record_space(folder) and not record_space(folder)
    lazy = LitModel.from_pretrained(folder)
    assert not lazy.tower_built("text") and lazy.space == edited.space
    # A tower file that changed (another text model at the same path) is not the recorded one either.
    source = json.loads((folder / "config.json").read_text())["text_tower"]["source"]
    weights = sorted(Path(source).glob("*.safetensors"))[0]
    original = weights.read_bytes()
    try:
        tensors = load_file(str(weights))
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 1
        save_file(tensors, str(weights))
        changed = LitModel.from_pretrained(folder)
        assert changed.tower_built("text") and changed.space != lazy.space
    finally:
        weights.write_bytes(original)


def test_lora_adapters_wait_for_their_tower_and_change_nothing(lit_folder, tmp_path):
    texts = CORPUS[:6]
    new = load_model(f"lit:{lit_folder}")
    old_space = EmbeddingSpace("old-test", 8, "f" * 64)
    torch.manual_seed(3)
    trained = CompatibleModel(new, LinearMap(new.embed_dim, 8), old_space, method="xbt")
    trained.enable_lora("text", {"r": 4, "alpha": 8})
    with torch.no_grad():
        for name, p in trained.new_model.text_tower.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # adapters that change the output
    trained.save_pretrained(tmp_path / "xbt")
    expected = trained.encode_text(texts)

    fresh = load_model(f"lit:{lit_folder}")
    loaded = CompatibleModel.from_pretrained(tmp_path / "xbt", new_model=fresh)
    assert not fresh.tower_built("text") and isinstance(loaded.lora_configs["text"], SavedLora)
    before = loaded.encoder_id  # from the saved adapters
    assert not fresh.tower_built("text")
    with pytest.raises(InputError, match="already waits for LoRA adapters"):
        CompatibleModel.from_pretrained(tmp_path / "xbt", new_model=fresh)  # a second set would stack on the first
    loaded.save_pretrained(tmp_path / "again")  # saved while waiting: the same adapters, byte for byte
    assert not fresh.tower_built("text")
    for name in ("lora_text/adapter_model.safetensors", "lora_text/adapter_config.json"):
        assert file_sha256(tmp_path / "again" / name) == file_sha256(tmp_path / "xbt" / name)
    torch.testing.assert_close(loaded.encode_text(texts), expected)  # builds the tower, attaches the adapters
    assert fresh.tower_built("text") and not fresh.tower_built("image")
    assert loaded.encoder_id == before == trained.encoder_id

    # In a fresh process (peft and sentence-transformers are imported by other tests in this one): loading the
    # lit model and the compatible model, its id and a save import neither library and read no tower weights.
    script = (
        "import sys; from xbt.specs import load_compatible, load_model\n"
        f"m = load_compatible({str(tmp_path / 'xbt')!r}, new_model=load_model({'lit:' + lit_folder!r}))\n"
        f"m.encoder_id; m.save_pretrained({str(tmp_path / 'third')!r})\n"
        "print(sorted(k for k in ('peft', 'sentence_transformers', 'torchvision') if k in sys.modules),"
        " m.new_model.tower_built('text'), m.new_model.tower_built('image'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.split("\n")[-2] == "[] False False", out.stdout + out.stderr


def test_a_deep_copy_attaches_the_adapters_to_its_own_tower(lit_folder, tmp_path):
    import copy

    new = load_model(f"lit:{lit_folder}")
    trained = CompatibleModel(new, LinearMap(new.embed_dim, 8), EmbeddingSpace("old-test", 8, "e" * 64))
    trained.enable_lora("text", {"r": 2, "alpha": 4})
    trained.save_pretrained(tmp_path / "xbt")
    loaded = CompatibleModel.from_pretrained(tmp_path / "xbt", new_model=load_model(f"lit:{lit_folder}"))
    twin = copy.deepcopy(loaded)
    twin.encode_text(CORPUS[:2])
    assert twin.new_model.tower_built("text") and not loaded.new_model.tower_built("text")
    assert len(twin.lora_state("text")) == len(trained.lora_state("text"))


def test_released_towers_are_built_again_from_their_files(lit_folder):
    model = LitModel.from_pretrained(lit_folder)
    texts = CORPUS[:4]
    first = model.encode_text(texts)
    space = model.space
    model.release_towers()
    assert not model.tower_built("text") and model.space == space
    torch.testing.assert_close(model.encode_text(texts), first)
    compat = CompatibleModel(model, LinearMap(model.embed_dim, 8), EmbeddingSpace("old-test", 8, "d" * 64))
    compat.enable_lora("text", {"r": 2, "alpha": 4})
    with pytest.raises(InputError, match="trainable weights"):
        model.release_towers()  # adapters live in the built tower: it is not its files any more
    assert model.tower_built("text")
