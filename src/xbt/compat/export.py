"""Taking a compatible model's query side out of xbt: ONNX graphs, or the map as plain arrays + JSON.

Most teams run their own search service (an onnxruntime or Triton encoder in front of Milvus, Qdrant,
faiss, ...). What they need from an upgrade is what a compatible model adds to a query: its query map,
new-model embedding in, old-space unit vector out. `export_model` writes, per tower ("text", "image"):

    {tower}_map.onnx          the map as an ONNX graph (opset 17, dynamic batch): input `new` (and `old`,
                              the old model's embedding of the same query, for an ensemble), output `query`
    {tower}_encoder.onnx      where the backend traces (open_clip, Hugging Face CLIP): the whole query
                              encoder, token ids or pixels in, old-space vector out
    {tower}_map.npz / .safetensors + {tower}_map.json
                              the map as plain arrays and a description of how to apply them
    export.json               what was written, the spaces, the artifact's digest, each graph's check

Every graph is checked with onnx.checker and run in onnxruntime (CPU) against the torch model before it
is kept: a graph that does not reproduce the model within cosine 0.99999 is never written. Both
towers are exported even while one map serves both (`CompatibleModel.query_map_for`), so a deployment
does not change shape when the maps become per tower.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xbt.compat.maps import LinearMap, OldQueryBlend, Projection, QueryMap, ResidualMap, SlerpMap, slerp
from xbt.compat.model import CompatibleModel, artifact_digest
from xbt.errors import InputError, XbtError
from xbt.models.base import write_json
from xbt.models.device import model_device

FORMATS = ("onnx", "npz", "safetensors")
TOWERS = ("text", "image")
OPSET = 17
MANIFEST_NAME = "export.json"
DESCRIPTION_FORMAT = "xbt.export.map/1"
MIN_COSINE = 0.99999  # a graph is kept only if onnxruntime reproduces the torch model this closely
NORMALISATION = ("input: L2-normalised inside (any scale accepted; for an ensemble the old embedding too);"
                 " output: L2-normalised, as the compatible model's encode_text / encode_image return it")


class ExportError(XbtError):
    """A compatible model (or one of its graphs) that cannot be exported as asked."""


# ----- what the graphs compute -------------------------------------------------------------------------
def _map_forward(query_map: QueryMap, new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """The map on unit vectors, as onnxruntime can run it: SLERP in float32 (its float64 arccos, which the
    torch map uses, has no onnxruntime kernel; the two agree to ~1e-7)."""
    if isinstance(query_map, SlerpMap):
        return slerp(old, query_map.rotation(new), query_map.weight, dtype=torch.float32)
    return query_map(new, old)


class MapGraph(nn.Module):
    """new (+ old) embedding -> normalised old-space query: `CompatibleModel.map_features` as one module."""

    def __init__(self, query_map: QueryMap):
        super().__init__()
        self.query_map = query_map

    def forward(self, new: torch.Tensor, old: torch.Tensor | None = None) -> torch.Tensor:
        old = F.normalize(old, dim=-1) if old is not None else None
        return F.normalize(_map_forward(self.query_map, F.normalize(new, dim=-1), old).float(), dim=-1)


class EncoderGraph(nn.Module):
    """Token ids (or pixels) -> the (LoRA-adapted) new model -> the map -> normalised old-space query."""

    def __init__(self, model: CompatibleModel, tower: str, input_names: Sequence[str], constants: dict[str, Any]):
        super().__init__()
        self.model, self.tower, self.input_names, self.constants = model, tower, list(input_names), constants

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.tower == "image":
            new = self.model.new_image(inputs[0])
        else:
            tokens = inputs[0] if self.input_names == ["tokens"] else dict(zip(self.input_names, inputs)) | self.constants
            new = self.model.new_text(tokens)
        return F.normalize(_map_forward(self.model.query_map_for(self.tower), new, None).float(), dim=-1)


# ----- the map as plain arrays -------------------------------------------------------------------------
def _t(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().copy()


def map_arrays(query_map: QueryMap) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The map as arrays + how to apply them: y = x @ weight (+ bias); with an MLP, y += gelu(s @ mlp.w1 +
    mlp.b1) @ mlp.w2 + mlp.b2 where s is x ("input") or y ("linear"); then the ensemble step, if any.
    Weights are stored (in, out), for a row-vector matrix product."""
    ensemble = None
    if isinstance(query_map, OldQueryBlend):
        ensemble = {"kind": "old-query-blend", "weight": query_map.weight,
                    "formula": "y = (1 - weight) * unit(y) + weight * unit(old)"}
        query_map = query_map.projection
    elif isinstance(query_map, SlerpMap):
        ensemble = {"kind": "slerp", "weight": query_map.weight,
                    "formula": "y = slerp(unit(old), unit(y), weight): weight 0 is the old query, 1 the mapped one"}
    arrays: dict[str, np.ndarray] = {}
    mlp: nn.Sequential | None = None
    on = "input"
    if isinstance(query_map, (LinearMap, SlerpMap, ResidualMap)):
        linear = query_map if isinstance(query_map, LinearMap) else query_map.rotation
        arrays["weight"] = _t(linear.weight)
        if linear.bias is not None:
            arrays["bias"] = _t(linear.bias)
        if isinstance(query_map, ResidualMap):
            mlp, on = query_map.mlp.net, "linear"
    elif isinstance(query_map, Projection):
        arrays["weight"], arrays["bias"] = _t(query_map.linear.weight.T), _t(query_map.linear.bias)
        mlp = query_map.mlp if query_map.projection_kind == "mlp" else None
    else:
        raise ExportError(f"a {query_map.kind!r} query map has no plain-array form in this xbt; export it with"
                          " --format onnx, which runs any map torch can trace")
    if mlp is not None:
        first, last = mlp[0], mlp[-1]
        arrays |= {"mlp.w1": _t(first.weight.T), "mlp.b1": _t(first.bias), "mlp.w2": _t(last.weight.T),
                   "mlp.b2": _t(last.bias)}
    description = {
        "linear": {"weight": "weight", "bias": "bias" if "bias" in arrays else None},
        "mlp": {"on": on, "w1": "mlp.w1", "b1": "mlp.b1", "w2": "mlp.w2", "b2": "mlp.b2",
                "activation": "gelu (exact, erf)"} if mlp is not None else None,
        "ensemble": ensemble,
    }
    return arrays, description


# ----- export --------------------------------------------------------------------------------------------
def export_model(model: CompatibleModel, out: str | Path, fmt: str = "onnx", *, encoders: bool = True,
                 towers: Sequence[str] = TOWERS) -> dict[str, Any]:
    """Write `model`'s query side to `out` in `fmt` (onnx, npz or safetensors); returns the manifest, also
    written to out/export.json. `encoders`: with onnx, also try the whole query encoder of each tower
    (a backend that does not trace is recorded in the manifest with the reason, not an error)."""
    if fmt not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not isinstance(model, CompatibleModel):
        raise InputError(f"{getattr(model, 'spec', model)!r} is not a compatible model: export a compat:DIR"
                         " (made by `xbt fit`, `xbt train` or `xbt upgrade`)")
    if isinstance(model.new_model, CompatibleModel):
        raise ExportError("a chained model runs two maps in a row; export each half (`xbt export compat:HALF`)"
                          " and apply the newer half's map, then the older half's")
    folder = Path(model.spec.removeprefix("compat:")) if model.spec.startswith("compat:") else None
    if folder is None or not folder.is_dir():
        raise InputError("export needs a saved compatible model (its digest goes into the metadata): save it with"
                         " model.save_pretrained(DIR), then export compat:DIR")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "format": "xbt.export/1", "source": model.spec, "artifact_digest": artifact_digest(folder),
        "method": model.method, "new_space": model.new_space_at_training.id, "old_space": model.old_space.id,
        "new_model": model.new_spec, "old_model": getattr(model.old_model, "spec", None),
        "normalisation": NORMALISATION, "export_format": fmt, "towers": {},
    }
    for tower in towers:
        if tower not in TOWERS:
            raise InputError(f"tower must be text or image, not {tower!r}")
        query_map = copy.deepcopy(model.query_map_for(tower)).cpu().eval()
        meta = _metadata(model, manifest, tower, query_map)
        if fmt == "onnx":
            entry = {"map": export_map_onnx(query_map, out / f"{tower}_map.onnx", meta)}
            if encoders:
                entry["encoder"] = _export_encoder_onnx(model, tower, out / f"{tower}_encoder.onnx", meta)
        else:
            entry = {"map": _export_arrays(query_map, out, tower, fmt, meta)}
        manifest["towers"][tower] = entry
    write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _metadata(model: CompatibleModel, manifest: dict[str, Any], tower: str, query_map: QueryMap) -> dict[str, str]:
    adapted = tower in model.lora_configs
    source = (f"the new model's {tower} embedding with xbt's LoRA adapters on that tower (the plain new model's"
              f" embedding will not do: deploy {tower}_encoder.onnx)") if adapted else f"the new model's {tower} embedding"
    return {
        "xbt.tower": tower, "xbt.method": model.method, "xbt.map_kind": query_map.kind,
        "xbt.new_space": manifest["new_space"], "xbt.old_space": manifest["old_space"],
        "xbt.artifact_digest": manifest["artifact_digest"], "xbt.source": manifest["source"],
        "xbt.normalisation": NORMALISATION, "xbt.input_new": source,
        "xbt.inputs": "new,old" if query_map.needs_old_query else "new",
        "xbt.ensemble": (f"{query_map.kind}: input `old` is the old model ({manifest['old_model']}) embedding of the"
                         " same query" if query_map.needs_old_query else "no"),
        "xbt.lora_adapted": str(adapted).lower(),
    }


def _export_arrays(query_map: QueryMap, out: Path, tower: str, fmt: str, meta: dict[str, str]) -> dict[str, Any]:
    arrays, how = map_arrays(query_map)
    description = {
        "format": DESCRIPTION_FORMAT, "tower": tower, "in_dim": query_map.in_dim, "out_dim": query_map.out_dim,
        "inputs": meta["xbt.inputs"].split(","), "normalise_before": True, "normalise_after": True,
        "weight_layout": "(in, out): y = x @ weight + bias on row vectors", **how,
        **{k.removeprefix("xbt."): v for k, v in meta.items() if k not in ("xbt.tower", "xbt.inputs", "xbt.ensemble")},
    }
    file = out / f"{tower}_map.{fmt}"
    if fmt == "npz":
        np.savez(file, **arrays)
    else:
        from safetensors.numpy import save_file

        save_file(arrays, str(file), metadata={"xbt.description": json.dumps(description)})
    write_json(out / f"{tower}_map.json", description)
    return {"file": file.name, "description": f"{tower}_map.json", "arrays": sorted(arrays)}


def export_map_onnx(query_map: QueryMap, file: Path, meta: dict[str, str]) -> dict[str, Any]:
    """One map as an ONNX graph at `file` with `meta` as its metadata, checked in onnxruntime (refused below
    cosine MIN_COSINE); what the manifest records of it."""
    graph = MapGraph(query_map).eval()
    names = ["new", "old"] if query_map.needs_old_query else ["new"]
    dims = [query_map.in_dim, query_map.out_dim][: len(names)]
    device = model_device(query_map)  # traced and checked where the map's weights are

    def draw(n: int, d: int, seed: int) -> torch.Tensor:
        return torch.randn(n, d, generator=torch.Generator(device=device).manual_seed(seed), device=device)

    example = tuple(F.normalize(draw(3, d, i), dim=-1) for i, d in enumerate(dims))
    _onnx_export(graph, example, names, {n: {0: "batch"} for n in names}, file, meta)
    probe = tuple(draw(7, d, 10 + i) for i, d in enumerate(dims))
    check = verify_onnx(file, lambda *x: graph(*x), dict(zip(names, probe)))
    if check["min_cosine"] < MIN_COSINE:
        file.unlink()
        raise ExportError(f"the exported {meta['xbt.tower']} map does not reproduce the model in onnxruntime"
                          f" (cosine {check['min_cosine']:.7f} < {MIN_COSINE}); please report it with the artifact")
    return {"file": file.name, "inputs": names, "output": "query", "opset": OPSET, "check": check}


def _export_encoder_onnx(model: CompatibleModel, tower: str, file: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The whole query encoder of `tower`, or why not (kept in the manifest and the command's output). Traced
    on one batch, checked on another of another size (and, for texts, other lengths): the axes are dynamic."""
    if model.needs_old_model_at_query_time:
        return {"exported": False, "why": f"{model.method} is an ensemble: a query runs two encoders with their own"
                " tokenizers and preprocessing; deploy both encoders and the map graph (inputs new, old)"}
    try:
        names, traced, constants = _encoder_inputs(model, tower, 0)
        _, probe, _ = _encoder_inputs(model, tower, 1)
        axes = {n: {0: "batch"} if tower == "image" or names == ["tokens"] else {0: "batch", 1: "sequence"} for n in names}
        graph = EncoderGraph(model, tower, names, constants).eval()
        with torch.no_grad():
            graph(*traced)  # one run first: lazy state (a tower's folded inference copy) is built outside the trace
            _onnx_export(graph, traced, names, axes, file, {**meta, "xbt.graph": "encoder", "xbt.inputs": ",".join(names)})
            check = verify_onnx(file, lambda *x: graph(*x), dict(zip(names, probe)))
    except Exception as exc:  # noqa: BLE001 - any backend that torch cannot trace: recorded, not fatal
        file.unlink(missing_ok=True)
        return {"exported": False, "why": f"the {tower} tower of {model.new_spec} did not export to ONNX"
                f" ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); use {tower}_map.onnx"
                " behind your own encoder of the new model"}
    if check["min_cosine"] < MIN_COSINE:
        file.unlink()
        return {"exported": False, "why": f"the traced {tower} encoder of {model.new_spec} does not reproduce torch's on"
                f" a batch of another size (cosine {check['min_cosine']:.4f}: the trace fixed a shape or a branch);"
                f" use {tower}_map.onnx behind your own encoder of the new model"}
    return {"exported": True, "file": file.name, "inputs": names, "output": "query", "opset": OPSET, "check": check,
            **({"constant_inputs": constants} if constants else {})}


_EXAMPLES = {"text": (["a photo of a dog on the grass", "a red car"],
                      ["three birds", "an old wooden house with a green door and two windows", "a cat"]),
             "image": (("white", "navy"), ("red", "black", "olive"))}


def _encoder_inputs(model: CompatibleModel, tower: str, which: int
                    ) -> tuple[list[str], tuple[torch.Tensor, ...], dict[str, Any]]:
    """(input names, tensors on the model's device, constant entries) of example batch `which` (0: traced,
    1: checked). A tokenizer's non-tensor entries (sentence-transformers' `modality`) stay constants."""
    device = model_device(model.new_model)  # traced where the model runs; the graph itself has no device
    if tower == "image":
        from PIL import Image

        pixels = torch.stack([model.image_transform(Image.new("RGB", (64, 48), c)) for c in _EXAMPLES["image"][which]])
        return ["pixels"], (pixels.to(device),), {}
    tokens = model.tokenize(_EXAMPLES["text"][which])
    if isinstance(tokens, torch.Tensor):
        return ["tokens"], (tokens.to(device),), {}
    names = [k for k, v in tokens.items() if isinstance(v, torch.Tensor)]
    return names, tuple(tokens[k].to(device) for k in names), {k: v for k, v in tokens.items() if k not in names}


def _onnx_export(graph: nn.Module, example: tuple[torch.Tensor, ...], names: list[str],
                 axes: dict[str, dict[int, str]], file: Path, meta: dict[str, str]) -> None:
    import onnx

    with warnings.catch_warnings():  # the tracer's notes on Python branches: the check below is what decides
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(graph, example, str(file), dynamo=False, opset_version=OPSET, input_names=names,
                          output_names=["query"], dynamic_axes={**axes, "query": {0: "batch"}})
    proto = onnx.load(str(file))
    onnx.helper.set_model_props(proto, {"xbt.graph": "map", **meta})
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(file))


def verify_onnx(file: Path, torch_fn: Callable[..., torch.Tensor], feeds: dict[str, torch.Tensor]) -> dict[str, float]:
    """Run the graph in onnxruntime (CPU) on `feeds` and compare with `torch_fn` on the same tensors."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
    got = session.run(["query"], {k: v.detach().cpu().numpy() for k, v in feeds.items()})[0]
    with torch.inference_mode():
        want = torch_fn(*feeds.values()).float().cpu().numpy()
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    return {"max_abs_diff": float(np.abs(got - want).max()), "min_cosine": float(cosine.min()), "rows": len(got)}
