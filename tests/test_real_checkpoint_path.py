"""The path a team with real checkpoints follows (README: "Upgrading your own CLIP checkpoints"), walked end
to end with tiny randomly initialised checkpoints saved to local files, as downloaded ones would be: an
open_clip folder (open_clip_config.json + weights) as the old model, a Hugging Face CLIP folder as the new
one. xbt upgrade -> OUT/models/<method> (+ recommended) -> xbt gallery add of new items in the old space
-> xbt serve -> a search result over HTTP. Every step is the real `xbt` command line in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from conftest import CORPUS, build_tiny_hf
from gallery_support import make_images, save_tiny_openclip
from serve_support import serving

from xbt.paths import resolve_config

WORDS = sorted({w for line in CORPUS for w in line.split()})


def test_the_shipped_clip_config_loads_and_names_both_backends_lora_targets():
    from xbt.train.config import XBTConfig

    path = resolve_config("xbt-clip")
    cfg = XBTConfig.from_file(path)
    assert cfg.stage2.lora.enabled and cfg.stage2.lora.target_modules is None  # by backend
    text = path.read_text()
    for needle in ("c_fc, c_proj", "q_proj, v_proj", "ESTIMATES", "not measured"):
        assert needle in text


def test_an_open_clip_checkpoint_file_loads_with_the_weights_it_holds(tiny_openclip_names, tmp_path):
    """`openclip:NAME@/path/ckpt.pt`: a user's downloaded state dict, loaded into the named architecture."""
    import open_clip

    from xbt.specs import load_model

    torch.manual_seed(7)
    saved = open_clip.create_model("xbt-tiny-a")
    torch.save(saved.state_dict(), tmp_path / "old.pt")
    model = load_model(f"openclip:xbt-tiny-a@{tmp_path / 'old.pt'}")
    tokens = model.tokenize(["a red apple"])
    with torch.inference_mode():
        assert torch.allclose(model.forward_text(tokens), saved.encode_text(tokens))


def _pairs_file(path: Path, images: list[Path], seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    with path.open("w") as f:
        for i, image in enumerate(images):
            words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (4,), generator=g)]
            f.write(json.dumps({"image": str(image), "caption": f"a {' '.join(words)} {i}", "image_id": f"{path.stem}/{image.stem}"}) + "\n")
    return path


def _xbt(*args: object, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "xbt.cli", *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"xbt {args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_local_checkpoints_to_a_search_result_over_http(tmp_path, xbt_home):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "XBT_HOME": str(xbt_home), "COLUMNS": "250"}
    old_spec = save_tiny_openclip(tmp_path / "ckpt" / "old-openclip", seed=0)  # openclip:local-dir:PATH
    new_spec = f"hf:{build_tiny_hf(tmp_path / 'ckpt' / 'new-hf', 'clip')}"
    data = tmp_path / "data"
    fit_pairs = _pairs_file(data / "train.jsonl", make_images(data / "train", 24, seed=1), seed=1)
    eval_pairs = _pairs_file(data / "eval.jsonl", make_images(data / "eval", 12, seed=2), seed=2)
    support = _pairs_file(data / "val.jsonl", make_images(data / "val", 8, seed=3), seed=3)
    (data / "captions.txt").write_text("\n".join(CORPUS * 2) + "\n")
    new_items = _pairs_file(data / "new_items.jsonl", make_images(data / "new_items", 3, seed=4), seed=4)
    config = yaml.safe_load(resolve_config("xbt-clip").read_text())  # the shipped settings, shrunk to seconds
    config["stage1"] |= {"epochs": 2, "batch_size": 16}
    config["stage2"] |= {"epochs": 1, "batch_size": 8}
    config["projection"] |= {"hidden": 32}
    (tmp_path / "tiny-clip.yaml").write_text(yaml.safe_dump(config))

    out = tmp_path / "upgrade"
    run = _xbt("upgrade", "--old", old_spec, "--new", new_spec, "--fit-pairs", fit_pairs, "--fit-texts",
               data / "captions.txt", "--support", support, "--data", eval_pairs, "--config", tmp_path / "tiny-clip.yaml",
               "--device", "cpu", "--precision", "fp32", "--out", out, "--examples", 1, env=env)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runtime"] == {"device": "cpu", "precision": "fp32", "num_workers": 0}
    results = json.loads(Path(summary["results"]).read_text())
    assert results["protocol"]["device"] == "cpu" and results["protocol"]["precision"] == "fp32"
    assert "encoders: fp32 on cpu" in Path(summary["report"]["markdown"]).read_text()
    record = json.loads((out / "models" / "recommended.json").read_text())
    assert {"XBT", "procrustes-both", "slerp"} <= set(record["models"])
    if record["method"]:  # random weights: a method may or may not pass the criterion in every cell
        model_dir = out / "models" / "recommended"
        assert "xbt serve --gallery" in run.stderr
    else:
        model_dir = out / "models" / "xbt"
        assert "nothing is recommended" in run.stderr
    assert (model_dir / "compat_config.json").exists()
    spec = f"compat:{model_dir.resolve()}"

    gallery = summary["galleries"]["old_images"]
    before = json.loads(_xbt("gallery", "info", "--gallery", gallery, env=env).stdout)["size"]
    _xbt("gallery", "add", "--gallery", gallery, "--model", spec, "--data", new_items, "--device", "cpu", env=env)
    info = json.loads(_xbt("gallery", "info", "--gallery", gallery, "--model", spec, env=env).stdout)
    assert info["size"] == before + 3 and info["space_id"] == info["model"]["space_id"]  # the old space, no backfill

    new_caption = json.loads(new_items.read_text().splitlines()[0])["caption"]
    with serving(["--gallery", gallery, "--model", spec, "--device", "cpu"], env=env, log=tmp_path / "serve.log") as url:
        response = httpx.post(f"{url}/search/text", json={"text": new_caption, "k": 20}, timeout=60)
    assert response.status_code == 200, response.text
    ids = [hit["id"] for hit in response.json()["results"]]
    assert len(ids) == min(20, before + 3) and {"new_items/img000", "new_items/img001", "new_items/img002"} & set(ids)
