"""`xbt export`: each exported form reproduces the compatible model's encode_text / encode_image.

The ONNX graphs are run in onnxruntime (CPU), the plain arrays through the numpy reference printed in
docs/deploy.md (executed from the page itself), on tiny open_clip and Hugging Face CLIP models with
random weights; maps get random (non-zero) weights so that every part of them counts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CORPUS
from gallery_support import save_tiny_openclip

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _random_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def save_compat(folder: Path, new_spec: str, old_spec: str, query_map, lora: bool = False) -> str:
    """A compatible model of `query_map` (weights drawn at random) between two specs, saved; its spec."""
    from xbt.compat.model import CompatibleModel
    from xbt.specs import load_model

    new, old = load_model(new_spec), load_model(old_spec)
    _random_(query_map, 3)
    model = CompatibleModel(new, query_map, old.space, new_spec, old_model=old, method=query_map.kind)
    if lora:
        params = model.enable_lora("text", {"r": 2, "alpha": 4, "dropout": 0.0})
        _random_(torch.nn.ParameterList(params), 4)
    model.save_pretrained(folder)
    return f"compat:{folder}"


def ort_run(file: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    return session.run(["query"], feeds)[0]


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= TOL
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cosine.min() >= 0.99999


def numpy_reference():
    """The numpy reference of docs/deploy.md, executed from the page (so the page cannot drift)."""
    page = (REPO / "docs" / "deploy.md").read_text()
    code = re.search(r"<!-- numpy-reference -->\s*```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/deploy.md", "exec"), namespace)
    return namespace["apply_xbt_map"]


@pytest.fixture(scope="module")
def specs(tmp_path_factory) -> tuple[str, str]:
    """A tiny old (32-d) and new (48-d) open_clip model saved to disk (so that every load is the same space)."""
    root = tmp_path_factory.mktemp("export_models")
    return save_tiny_openclip(root / "old", seed=0), save_tiny_openclip(root / "new", seed=1, embed_dim=48, width=48)


@pytest.fixture()
def openclip_linear(specs, tmp_path, xbt_home):
    from xbt.compat.maps import LinearMap

    return save_compat(tmp_path / "linear", specs[1], specs[0], LinearMap(48, 32, bias=True))


def test_onnx_map_and_encoders_reproduce_open_clip(openclip_linear, image_files, tmp_path):
    import onnx

    from xbt.compat.export import export_model
    from xbt.compat.model import artifact_digest
    from xbt.specs import load_model

    model = load_model(openclip_linear)
    manifest = export_model(model, tmp_path / "out", "onnx")
    out = tmp_path / "out"
    assert json.loads((out / "export.json").read_text()) == manifest
    want_text = model.encode_text(CORPUS).numpy()
    want_image = model.encode_image(image_files).numpy()
    new = model.new_model
    for tower, want, new_vectors in (("text", want_text, new.encode_text(CORPUS)),
                                     ("image", want_image, new.encode_image(image_files))):
        # the map alone, behind the new model's own embedding (given unnormalised: the graph normalises)
        assert_close(ort_run(out / f"{tower}_map.onnx", {"new": 3.0 * new_vectors.numpy()}), want)
        assert manifest["towers"][tower]["encoder"]["exported"], manifest["towers"][tower]["encoder"]
    # the whole query encoder: token ids / pixels in
    assert_close(ort_run(out / "text_encoder.onnx", {"tokens": model.tokenize(CORPUS).numpy()}), want_text)
    assert_close(ort_run(out / "image_encoder.onnx", {"pixels": new.preprocess(image_files).numpy()}), want_image)

    proto = onnx.load(str(out / "text_map.onnx"))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert proto.opset_import[0].version == 17
    assert meta["xbt.artifact_digest"] == artifact_digest(openclip_linear.removeprefix("compat:"))
    assert meta["xbt.old_space"] == model.old_space.id and meta["xbt.new_space"] == new.space.id
    assert meta["xbt.inputs"] == "new" and meta["xbt.ensemble"] == "no" and "L2" in meta["xbt.normalisation"]
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch"  # dynamic batch


def test_slerp_ensemble_exports_with_both_inputs(specs, tmp_path, xbt_home):
    from xbt.compat.export import export_model
    from xbt.compat.maps import SlerpMap
    from xbt.specs import load_model

    spec = save_compat(tmp_path / "slerp", specs[1], specs[0], SlerpMap(48, 32, weight=0.4))
    model = load_model(spec)
    out = tmp_path / "out"
    manifest = export_model(model, out, "onnx")
    want = model.encode_text(CORPUS).numpy()
    feeds = {"new": model.new_model.encode_text(CORPUS).numpy(), "old": model.old_model.encode_text(CORPUS).numpy()}
    assert_close(ort_run(out / "text_map.onnx", feeds), want)
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out / "image_map.onnx")).metadata_props}
    assert meta["xbt.inputs"] == "new,old" and meta["xbt.ensemble"].startswith("slerp")
    encoder = manifest["towers"]["text"]["encoder"]
    assert not encoder["exported"] and "ensemble" in encoder["why"]
    assert not (out / "text_encoder.onnx").exists()

    export_model(model, tmp_path / "arrays", "npz")
    description = json.loads((tmp_path / "arrays" / "text_map.json").read_text())
    assert description["inputs"] == ["new", "old"] and description["ensemble"]["kind"] == "slerp"
    arrays = dict(np.load(tmp_path / "arrays" / "text_map.npz"))
    assert_close(numpy_reference()(arrays, description, feeds["new"], feeds["old"]), want)


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_plain_arrays_of_every_map_kind_through_the_documented_numpy(specs, tmp_path, xbt_home, fmt):
    """Linear, residual adapter (a non-linear MLP), XBT's projection (mlp), an old-query blend: the arrays
    and the ten-line numpy of docs/deploy.md give the compatible model's own vectors; the residual map's
    ONNX graph too."""
    from xbt.compat.export import export_model
    from xbt.compat.maps import LinearMap, OldQueryBlend, Projection, ResidualMap
    from xbt.specs import load_model

    apply_xbt_map = numpy_reference()
    maps = {"residual": ResidualMap(48, 32, hidden=16), "projection": Projection(48, 32, "mlp", hidden=16),
            "blend": OldQueryBlend(48, 32, 0.3, Projection(48, 32, "linear")), "procrustes": LinearMap(48, 32)}
    for name, query_map in maps.items():
        model = load_model(save_compat(tmp_path / name, specs[1], specs[0], query_map))
        out = tmp_path / f"{name}-out"
        manifest = export_model(model, out, fmt)
        assert sorted(manifest["towers"]) == ["image", "text"]
        description = json.loads((out / "text_map.json").read_text())
        assert description["normalise_before"] and description["normalise_after"] and description["tower"] == "text"
        if fmt == "npz":
            arrays = dict(np.load(out / "text_map.npz"))
        else:
            from safetensors import safe_open
            from safetensors.numpy import load_file

            arrays = load_file(str(out / "text_map.safetensors"))
            with safe_open(str(out / "text_map.safetensors"), "np") as f:
                assert json.loads(f.metadata()["xbt.description"]) == description
        new = model.new_model.encode_text(CORPUS).numpy()
        old = model.old_model.encode_text(CORPUS).numpy() if model.old_model is not None else None
        assert_close(apply_xbt_map(arrays, description, new, old), model.encode_text(CORPUS).numpy())
        if name == "residual" and fmt == "npz":
            export_model(model, out, "onnx", encoders=False)
            assert_close(ort_run(out / "image_map.onnx", {"new": new}), model.map_features(new))


def test_hf_clip_encoders_and_map(tiny_hf_clip, specs, image_files, tmp_path, xbt_home):
    from xbt.compat.export import export_model
    from xbt.compat.maps import ResidualMap
    from xbt.specs import load_model

    model = load_model(save_compat(tmp_path / "hf", f"hf:{tiny_hf_clip}", specs[0], ResidualMap(24, 32, 16)))
    out = tmp_path / "out"
    manifest = export_model(model, out, "onnx")
    assert manifest["towers"]["image"]["encoder"]["exported"], manifest["towers"]["image"]["encoder"]
    assert_close(ort_run(out / "image_encoder.onnx", {"pixels": model.new_model.preprocess(image_files).numpy()}),
                 model.encode_image(image_files).numpy())
    assert manifest["towers"]["text"]["encoder"]["exported"], manifest["towers"]["text"]["encoder"]
    want = model.encode_text(CORPUS).numpy()
    assert_close(ort_run(out / "text_map.onnx", {"new": model.new_model.encode_text(CORPUS).numpy()}), want)
    tokens = model.tokenize(CORPUS)  # padded to the longest text: a dynamic sequence axis
    names = manifest["towers"]["text"]["encoder"]["inputs"]
    assert_close(ort_run(out / "text_encoder.onnx", {n: tokens[n].numpy() for n in names}), want)


def test_lora_adapted_tower_is_marked_and_its_encoder_carries_the_adapters(specs, tmp_path, xbt_home):
    from xbt.compat.export import export_model
    from xbt.compat.maps import Projection
    from xbt.specs import load_model

    model = load_model(save_compat(tmp_path / "xbt", specs[1], specs[0],
                                   Projection(48, 32, "linear"), lora=True))
    out = tmp_path / "out"
    manifest = export_model(model, out, "onnx", towers=["text"])
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(out / "text_map.onnx")).metadata_props}
    assert meta["xbt.lora_adapted"] == "true" and "text_encoder.onnx" in meta["xbt.input_new"]
    assert manifest["towers"]["text"]["encoder"]["exported"]
    assert_close(ort_run(out / "text_encoder.onnx", {"tokens": model.tokenize(CORPUS).numpy()}),
                 model.encode_text(CORPUS).numpy())


def test_an_encoder_that_does_not_trace_is_recorded_with_the_reason(openclip_linear, tmp_path, monkeypatch):
    import xbt.compat.export as export
    from xbt.specs import load_model

    real = torch.onnx.export

    def refuse_encoders(graph, *args, **kwargs):
        if isinstance(graph, export.EncoderGraph):
            raise RuntimeError("this backend cannot be traced")
        return real(graph, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", refuse_encoders)
    manifest = export.export_model(load_model(openclip_linear), tmp_path / "o", "onnx")
    encoder = manifest["towers"]["text"]["encoder"]
    assert not encoder["exported"] and "this backend cannot be traced" in encoder["why"] and "text_map.onnx" in encoder["why"]
    assert (tmp_path / "o" / "text_map.onnx").exists() and not (tmp_path / "o" / "text_encoder.onnx").exists()


def test_export_refuses_what_it_cannot_export(openclip_linear, tmp_path):
    from xbt.compat.export import export_model
    from xbt.compat.model import CompatibleModel
    from xbt.errors import InputError
    from xbt.specs import load_model

    model = load_model(openclip_linear)
    assert model.query_map_for("text") is model.query_map_for("image") is model.query_map  # one map until issue 24
    with pytest.raises(InputError, match="tower"):
        model.query_map_for("audio")
    with pytest.raises(InputError, match="--format"):
        export_model(model, tmp_path / "x", "tflite")
    unsaved = CompatibleModel(model.new_model, model.query_map, model.old_space)
    with pytest.raises(InputError, match="save_pretrained"):
        export_model(unsaved, tmp_path / "x", "npz")
    with pytest.raises(InputError, match="not a compatible model"):
        export_model(model.new_model, tmp_path / "x", "npz")


def test_xbt_export_command(openclip_linear, tmp_path):
    from typer.testing import CliRunner

    from xbt.cli import app

    result = CliRunner().invoke(app, ["export", openclip_linear, "--format", "safetensors", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "o").iterdir()} == {
        "export.json", "text_map.safetensors", "text_map.json", "image_map.safetensors", "image_map.json"}
    result = CliRunner().invoke(app, ["export", openclip_linear, "--format", "onnx", "--out", str(tmp_path / "o"),
                                      "--no-encoders"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "text_map.onnx").exists() and not (tmp_path / "o" / "text_encoder.onnx").exists()
    bad = CliRunner().invoke(app, ["export", openclip_linear, "--format", "pickle", "--out", str(tmp_path / "o")])
    assert bad.exit_code != 0 and "--format" in bad.output


@pytest.mark.slow
def test_testbed_peers_export_and_onnxruntime_reproduces_them(tmp_path):
    """On the testbed's lit models (needs `xbt testbed build`): a residual adapter (non-linear) and SLERP (an
    ensemble) fitted on testbed data, exported; the map graphs, and for the adapter the whole lit encoders,
    reproduce encode_text / encode_image on eval items in onnxruntime."""
    from xbt.compat.export import export_model
    from xbt.compat.fit import fit_peer
    from xbt.data.datasets import open_dataset
    from xbt.specs import load_model

    old, new = load_model("testbed:old"), load_model("testbed:new")
    pairs = list(open_dataset("testbed:xbt_train"))[:96]
    support = list(open_dataset("testbed:val"))[:48]
    evaluation = list(open_dataset("testbed:eval"))[:16]
    texts, images = [p.caption for p in evaluation], [p.image for p in evaluation]
    for method in ("adapter", "slerp"):
        options = {"epochs": 2} if method == "adapter" else {}
        model = fit_peer(method, old, new, [p.caption for p in pairs], pairs, support, **options)
        model.save_pretrained(tmp_path / method)
        model = load_model(f"compat:{tmp_path / method}")
        manifest = export_model(model, tmp_path / f"{method}-onnx", "onnx")
        for tower, want, encode in (("text", model.encode_text(texts).numpy(), lambda m: m.encode_text(texts)),
                                    ("image", model.encode_image(images).numpy(), lambda m: m.encode_image(images))):
            feeds = {"new": encode(new).numpy()} | ({"old": encode(old).numpy()} if method == "slerp" else {})
            assert_close(ort_run(tmp_path / f"{method}-onnx" / f"{tower}_map.onnx", feeds), want)
            encoder = manifest["towers"][tower]["encoder"]
            if method == "slerp":  # an ensemble: two encoders, never one graph
                assert not encoder["exported"] and "ensemble" in encoder["why"]
                continue
            # the lit towers (sentence-transformers text, EfficientNet-Lite image) export whole
            assert encoder["exported"], encoder
            inputs = ({n: t.numpy() for n, t in model.tokenize(texts).items() if n in encoder["inputs"]} if tower == "text"
                      else {"pixels": new.preprocess(images).numpy()})
            assert_close(ort_run(tmp_path / f"{method}-onnx" / f"{tower}_encoder.onnx", inputs), want)
