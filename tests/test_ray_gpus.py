"""Ray actors on GPUs: `gpus_per_actor` reaches the actors' resource request (map_batches num_gpus) and each
actor is given its GPU. Tested on CPU with a local Ray that declares one logical GPU: Ray schedules and
assigns it exactly as a real one (CUDA_VISIBLE_DEVICES, ray.get_gpu_ids), while torch, seeing no CUDA
driver, runs the actor's model on the CPU (device auto)."""

from __future__ import annotations

import pytest
from device_support import assert_same_directions
from gallery_support import make_images, save_tiny_openclip

from xbt.errors import InputError
from xbt.gallery.ingest import GalleryItem
from xbt.scale.ray_embed import RayOptions, embed_items
from xbt.scale.vectors import Manifest, read_vectors, shard_meta


def test_gpus_per_actor_becomes_the_actors_num_gpus():
    assert RayOptions().map_options() == {"num_cpus": 1.0}
    assert RayOptions(cpus_per_actor=2, gpus_per_actor=0.25).map_options() == {"num_cpus": 2, "num_gpus": 0.25}
    with pytest.raises(InputError):
        RayOptions(gpus_per_actor=-1).map_options()


def test_gpu_actors_with_device_cpu_are_refused(tmp_path):
    with pytest.raises(InputError, match="--gpus-per-actor"):
        embed_items("openclip:none", [GalleryItem("a", {"caption": "x"})], tmp_path, "text", engine="ray",
                    ray_options=RayOptions(gpus_per_actor=1), device="cpu")


def test_actors_that_reserve_no_gpu_run_on_the_cpu():
    """Ray 2.49+ leaves the GPUs visible to actors that request none: `auto` there would load every CPU actor's
    model copy onto cuda:0 with nothing reserved. Such actors get `cpu`; cuda for them is refused."""
    options = RayOptions(cpus_per_actor=1)
    assert options.actor_device("auto") == "cpu" and options.actor_device("cpu") == "cpu"
    for device in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="--gpus-per-actor"):
            options.actor_device(device)


def test_gpu_actors_are_not_given_a_gpu_number():
    """An actor sees only the GPU Ray gave it, as cuda:0: `cuda:N` would fail in every actor."""
    options = RayOptions(gpus_per_actor=1)
    assert options.actor_device("auto") == "auto" and options.actor_device("cuda") == "cuda"
    with pytest.raises(InputError, match="cuda:0"):
        options.actor_device("cuda:1")


def test_gpu_numbers_for_ray_actors_are_refused_before_ray_starts(tmp_path, monkeypatch):
    import xbt.scale.ray_embed as ray_embed

    monkeypatch.setattr(ray_embed, "start_ray", lambda options: pytest.fail("Ray started before the device was checked"))
    items = [GalleryItem("a", {"caption": "a red apple"})]
    with pytest.raises(InputError, match="cuda:0"):
        embed_items("openclip:none", items, tmp_path / "out", "text", engine="ray",
                    ray_options=RayOptions(gpus_per_actor=1), device="cuda:1")


@pytest.mark.slow
def test_two_actors_share_one_gpu_and_write_the_local_engines_vectors(tmp_path, xbt_home, monkeypatch):
    ray = pytest.importorskip("ray")
    spec = save_tiny_openclip(tmp_path / "model", seed=0)
    images = make_images(tmp_path / "images", 8)
    items = [GalleryItem(p.stem, {"image": str(p)}) for p in images]
    local = embed_items(spec, items, tmp_path / "local", "image", shard_size=4, device="cpu")
    # Ray refuses a declared GPU that CUDA_VISIBLE_DEVICES hides (the suite's CPU pin, conftest.py); Ray sets the
    # variable for each actor itself. On a GPU host the actors then run on the real GPU: compared by cosine below.
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False, logging_level="warning")
    try:
        options = RayOptions(cpus_per_actor=0.5, gpus_per_actor=0.5, threads=1)
        report = embed_items(spec, items, tmp_path / "ray", "image", engine="ray", shard_size=4, ray_options=options)
    finally:
        ray.shutdown()
    assert report.space == local.space and len(report.written) == 2
    ids_l, vec_l, _, _ = read_vectors(tmp_path / "local")
    ids_r, vec_r, _, _ = read_vectors(tmp_path / "ray")
    assert ids_r == ids_l
    assert_same_directions(vec_r, vec_l)  # on a GPU host the actors run on the GPU (TF32): compared by cosine
    for shard in Manifest.read(tmp_path / "ray").shards:
        runtime = shard_meta(tmp_path / "ray" / shard["name"])["runtime"]
        assert runtime["accelerators"] == ["0"]  # Ray gave each actor the (logical) GPU
        assert runtime["device"] == ("cuda:0" if runtime["device"].startswith("cuda") else "cpu")
        assert runtime["precision"] == "fp32"
    assert shard_meta(tmp_path / "local" / Manifest.read(tmp_path / "local").shards[0]["name"])["runtime"]["accelerators"] == []
