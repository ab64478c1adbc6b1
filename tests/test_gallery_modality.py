"""A query map per tower (artifact format 3) and the gallery-modality peers: each query tower mapped by the
map fitted on the modality its queries search (text queries: the image-fitted map; image queries: the
text-fitted one), saved, loaded (formats 1-3), described, chained, blended and evaluated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_eval_runner import toy_world

from xbt.compat.base import FitData
from xbt.compat.fit import fit_image_items
from xbt.compat.maps import LinearMap, Projection
from xbt.compat.model import CONFIG_NAME, MAP_NAME, CompatibleModel, chain
from xbt.compat.old_query import with_old_query
from xbt.compat.registry import PEER_METHODS, build_method
from xbt.compat.support import support_score
from xbt.data.pairs import Pair
from xbt.errors import InputError
from xbt.embed import embed_pairs
from xbt.eval.runner import run_evaluation
from xbt.gallery.ingest import describe_model


@pytest.fixture()
def world(tmp_path, monkeypatch):
    return toy_world(tmp_path, monkeypatch)


def _two_map_model(old, new, seed: int = 0) -> CompatibleModel:
    rng = np.random.default_rng(seed)
    maps = {t: LinearMap.from_arrays(rng.standard_normal((new.dim, old.dim)).astype(np.float32)) for t in ("text", "image")}
    return CompatibleModel(new, maps, old.space, method="two-maps")


def test_each_tower_runs_its_own_map_and_the_single_map_accessor_refuses_two(world):
    old, new, eval_pairs, *_ = world
    model = _two_map_model(old, new)
    assert not model.shares_query_map and model.query_map_for("text") is not model.query_map_for("image")
    with pytest.raises(InputError, match="query_map_for"):
        _ = model.query_map
    with pytest.raises(InputError, match="'text' or 'image'"):
        model.query_map_for("audio")
    captions, images = [p.caption for p in eval_pairs[:5]], [p.image for p in eval_pairs[:5]]
    new_text, new_image = new.encode_text(captions).numpy(), new.encode_image(images).numpy()
    np.testing.assert_allclose(model.encode_text(captions).numpy(), model.query_map_for("text").apply(new_text), atol=1e-5)
    np.testing.assert_allclose(model.encode_image(images).numpy(), model.query_map_for("image").apply(new_image), atol=1e-5)
    # the two towers really differ: the text map applied to images is not what the image tower returns
    assert not np.allclose(model.encode_image(images).numpy(), model.query_map_for("text").apply(new_image), atol=1e-3)
    with pytest.raises(InputError, match="query_map_for"):
        model.map_features(new_text)  # which tower? a two-map model needs to be told
    shared = CompatibleModel(new, model.query_map_for("text"), old.space)
    assert shared.shares_query_map and shared.query_map is shared.projection is shared.query_map_for("image")


def test_format_3_saves_a_file_per_tower_and_reloads_the_same_vectors(world, tmp_path):
    old, new, eval_pairs, *_ = world
    model = _two_map_model(old, new)
    folder = model.save_pretrained(tmp_path / "two")
    config = json.loads((folder / CONFIG_NAME).read_text())
    assert config["format"] == "xbt.compat/3"
    assert {t: e["file"] for t, e in config["maps"].items()} == {"text": "map_text.safetensors", "image": "map_image.safetensors"}
    assert not (folder / MAP_NAME).exists() and set(config["weights_sha256"]) == {"map_text.safetensors", "map_image.safetensors"}
    loaded = CompatibleModel.from_pretrained(folder, new_model=new)
    captions, images = [p.caption for p in eval_pairs[:6]], [p.image for p in eval_pairs[:6]]
    np.testing.assert_allclose(loaded.encode_text(captions).numpy(), model.encode_text(captions).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_image(images).numpy(), model.encode_image(images).numpy(), atol=1e-6)
    assert loaded.encoder_id == model.encoder_id and not loaded.shares_query_map
    # the same folder saved again as a shared-map model keeps no stale per-tower file
    CompatibleModel(new, model.query_map_for("text"), old.space).save_pretrained(folder)
    assert (folder / MAP_NAME).exists() and not (folder / "map_text.safetensors").exists()
    assert CompatibleModel.from_pretrained(folder, new_model=new).shares_query_map


def test_a_version_2_artifact_loads_with_the_same_vectors_and_encoder_id(world, tmp_path):
    old, new, eval_pairs, *_ = world
    torch.manual_seed(0)
    model = CompatibleModel(new, Projection(new.dim, old.dim, "mlp", hidden=16), old.space)
    torch.nn.init.normal_(model.projection.mlp[-1].weight, std=0.1)  # a residual that is not zero
    folder = model.save_pretrained(tmp_path / "v3")
    config = json.loads((folder / CONFIG_NAME).read_text())
    # what xbt.compat/2 wrote: one `map` config and map.safetensors for both towers
    v2 = {k: v for k, v in config.items() if k != "maps"} | {"format": "xbt.compat/2", "map": config["maps"]["text"]["config"]}
    (folder / CONFIG_NAME).write_text(json.dumps(v2))
    loaded = CompatibleModel.from_pretrained(folder, new_model=new)
    assert loaded.shares_query_map and loaded.encoder_id == model.encoder_id
    captions, images = [p.caption for p in eval_pairs[:6]], [p.image for p in eval_pairs[:6]]
    np.testing.assert_allclose(loaded.encode_text(captions).numpy(), model.encode_text(captions).numpy(), atol=1e-6)
    np.testing.assert_allclose(loaded.encode_image(images).numpy(), model.encode_image(images).numpy(), atol=1e-6)
    loaded.save_pretrained(tmp_path / "resaved")  # and it is written back as version 3
    assert json.loads((tmp_path / "resaved" / CONFIG_NAME).read_text())["format"] == "xbt.compat/3"


def _fit_data(rng, new_dim=12, old_dim=8, n=60) -> FitData:
    return FitData(new_text=rng.standard_normal((n, new_dim)), old_text=rng.standard_normal((n, old_dim)),
                   new_image=rng.standard_normal((n, new_dim)), old_image=rng.standard_normal((n, old_dim)))


def test_gallery_modality_maps_each_tower_with_the_other_modalitys_fit(world):
    old, new, *_ = world
    assert {"procrustes-gallery", "affine-gallery", "adapter-gallery", "slerp-gallery"} <= set(PEER_METHODS)
    data = _fit_data(np.random.default_rng(0))
    gallery = build_method("procrustes-gallery", new.space, old.space).fit(data)
    on_images = build_method("procrustes-image", new.space, old.space).fit(data)
    on_texts = build_method("procrustes-text", new.space, old.space).fit(data)
    maps = gallery.to_maps()
    torch.testing.assert_close(maps["text"].weight, on_images.to_map().weight)
    torch.testing.assert_close(maps["image"].weight, on_texts.to_map().weight)
    model = gallery.to_model(new)
    assert model.method == "procrustes-gallery" and not model.shares_query_map
    described = describe_model(model)["query_maps"]
    assert not described["shared"] and "image pairs" in described["text"]["fitted_on"]
    assert "text pairs" in described["image"]["fitted_on"] and described["text"]["searches"] == "old images"
    with pytest.raises(InputError, match="no fit_on"):
        build_method("affine-gallery", new.space, old.space, fit_on="both")


def test_a_half_chooses_its_setting_on_the_direction_its_queries_serve(world):
    old, new, eval_pairs, train, support, _ = world
    new_s, old_s = embed_pairs(new, support), embed_pairs(old, support)
    rotation = build_method("procrustes-both", new.space, old.space).fit(
        FitData(embed_pairs(new, train).texts, embed_pairs(old, train).texts,
                embed_pairs(new, train).images, embed_pairs(old, train).images)).rotation
    both = support_score(lambda x, o: x @ rotation, new_s, old_s)
    t2i = support_score(lambda x, o: x @ rotation, new_s, old_s, directions=("t2i",))
    i2t = support_score(lambda x, o: x @ rotation, new_s, old_s, directions=("i2t",))
    assert both == pytest.approx((t2i + i2t) / 2)
    with pytest.raises(InputError, match="directions"):
        support_score(lambda x, o: x @ rotation, new_s, old_s, directions=("x2y",))
    gallery = build_method("affine-gallery", new.space, old.space)
    assert gallery.halves["text"].support_directions == ("t2i",) and gallery.halves["image"].support_directions == ("i2t",)


def test_chain_and_old_query_blend_keep_a_map_per_tower(world, tmp_path):
    old, new, eval_pairs, *_ = world
    two = _two_map_model(old, new)
    blended = with_old_query(two, old, 0.3)
    assert blended.needs_old_model_at_query_time and not blended.shares_query_map
    assert blended.query_map_for("text").projection is two.query_map_for("text")
    assert blended.query_map_for("image").projection is two.query_map_for("image")
    shared = with_old_query(CompatibleModel(new, two.query_map_for("text"), old.space), old, 0.3)
    assert shared.shares_query_map  # one map in, one blend out
    # a chain runs each tower through the older half's map of that tower
    newer = CompatibleModel(new, LinearMap.from_arrays(np.eye(new.dim, dtype=np.float32)), new.space)
    newer.save_pretrained(tmp_path / "newer")
    newer = CompatibleModel.from_pretrained(tmp_path / "newer", new_model=new)
    chained = chain(newer, two)
    assert chained.query_map_for("text") is two.query_map_for("text")
    assert chained.query_map_for("image") is two.query_map_for("image")


def test_unlabeled_fit_images_feed_the_image_side_fits_and_leaks_are_reported(world, tmp_path):
    old, new, eval_pairs, train, support, latents = world
    unlabeled = [Pair(p.image, "", f"u{i}") for i, p in enumerate(support)]  # captions not used
    items = fit_image_items(train, [*unlabeled, train[0]])
    extra = items[len(train):]  # after the training pairs: each unlabeled file once, none of the training images
    assert len(extra) == len({p.image for p in support}) and not {p.image for p in extra} & {p.image for p in train}
    run = run_evaluation(old, new, eval_pairs, ["procrustes-image", "procrustes-gallery"], fit_pairs=train,
                         fit_images=unlabeled, n_resamples=20, cost_batch_sizes=(8,))
    assert run.data["fit_images"]["n_images"] == len({p.image for p in support})
    assert not any("fit images" in w for w in run.warnings)
    plain = run_evaluation(old, new, eval_pairs, ["procrustes-image"], fit_pairs=train, n_resamples=20, cost_batch_sizes=(8,))
    assert not np.allclose(run.queries["procrustes-image"].texts, plain.queries["procrustes-image"].texts, atol=1e-4)
    record = run.methods["procrustes-gallery"]
    assert record.details["query_maps"]["text"]["kind"] == "linear" and "per tower" in record.cost_note
    leaky = run_evaluation(old, new, eval_pairs, ["procrustes-image"], fit_pairs=train, n_resamples=20,
                           fit_images=eval_pairs[:3], cost_batch_sizes=(8,))
    assert any("unlabeled fit images" in w for w in leaky.warnings)


def test_unlabeled_images_come_from_a_plain_folder_a_path_list_or_any_dataset(world, tmp_path):
    from xbt.data.datasets import open_images
    from xbt.data.pairs import write_pairs

    _, _, eval_pairs, *_ = world
    folder = tmp_path / "unlabeled"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(eval_pairs[:3]):
        (folder / ("sub" if i else "") / f"x{i}.png").write_bytes(open(p.image, "rb").read())
    (folder / "notes.md").write_text("not an image")
    assert sorted(p.image for p in open_images(folder)) == sorted(str(f) for f in folder.rglob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text("unlabeled/x0.png\n\nunlabeled/sub/x1.png\n")
    assert [p.image for p in open_images(listing)] == [str(tmp_path / "unlabeled/x0.png"), str(tmp_path / "unlabeled/sub/x1.png")]
    write_pairs(tmp_path / "pairs.jsonl", eval_pairs[:4])
    from_pairs = open_images(tmp_path / "pairs.jsonl")
    assert [p.image for p in from_pairs] == [p.image for p in eval_pairs[:4]] and all(p.caption == "" for p in from_pairs)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        open_images(tmp_path / "empty")
    listing.write_text("unlabeled/missing.png\n")
    with pytest.raises(InputError):
        open_images(listing)


def test_the_service_info_says_which_map_each_tower_uses(world, tmp_path):
    import httpx
    from gallery_support import running_server

    from xbt.gallery.ingest import GalleryRetriever
    from xbt.gallery.store import Gallery
    from xbt.serve.app import ServeConfig, create_app

    old, new, eval_pairs, *_ = world
    gallery = Gallery.create(tmp_path / "gallery", old.space, modality="image")
    items = {p.image_id: p for p in eval_pairs}
    gallery.add(old.encode_image([p.image for p in items.values()]).numpy(), list(items),
                [{"image": p.image} for p in items.values()], space=old.space)
    model = _two_map_model(old, new)
    with running_server(create_app(GalleryRetriever(gallery, model), ServeConfig(open_info=True))) as url:
        info = httpx.get(f"{url}/info").json()
        hits = httpx.post(f"{url}/search/text", json={"text": eval_pairs[0].caption, "k": 3}).json()["results"]
    gallery.close()
    maps = info["query_model"]["query_maps"]
    assert maps["shared"] is False and maps["text"]["searches"] == "old images" and maps["image"]["searches"] == "old captions"
    # the text query went through the text tower's map
    expected = model.query_map_for("text").apply(new.encode_text([eval_pairs[0].caption]).numpy())[0]
    stored = old.encode_image([items[hits[0]["id"]].image]).numpy()[0]
    assert hits[0]["score"] == pytest.approx(float(expected @ stored), abs=1e-4)
