"""The main job: from "a new model is out" to upgraded search over the untouched old gallery.

    job = UpgradeJob.testbed()            # or UpgradeJob(old=..., new=..., eval_data=..., ...)
    summary = run_upgrade(job, out_dir)

Steps, each cached by content (a re-run reuses what did not change; a changed config re-runs what
depends on it): the old galleries (images and captions of the evaluation data, embedded by the old
model, in the crash-safe gallery store), XBT training, the peers, the evaluation report, every
method saved as a deployable compatible model (OUT/models/<method>, the recommended one linked as
OUT/models/recommended), and pictures of what changed for a handful of queries. Models, the config and
the data are loaded once; every embedding goes through the feature cache, so the galleries and the
evaluation share them, and the pictures show the evaluation's own vectors. A warm rerun (nothing changed)
reads every step back: the peers' fits (XBT_HOME/peers), the XBT run, the vectors, the pictures (redrawn
only when what they show changed), and builds no model tower (docs/architecture.md, "What a warm rerun
loads").
"""

from __future__ import annotations

import hashlib
import json
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xbt.compat.registry import PEER_METHODS
from xbt.data.datasets import open_dataset, open_images
from xbt.data.pairs import Pair
from xbt.data.texts import load_texts
from xbt.errors import InputError
from xbt.models.base import VLPModel
from xbt.paths import cache_dir, resolve_config
from xbt.progress import peak_rss_mb


@dataclass
class UpgradeJob:
    old: str
    new: str
    eval_data: str  # what the galleries and the evaluation are built from (never trained on)
    fit_pairs: str  # image-text pairs for XBT stage 2 and the image-fitted peers
    fit_texts: str | list[str]  # text corpus (one source or several) for XBT stage 1 and the text-side fits
    support: str | None = None  # every choice on held-out data is made here (SLERP's weight, NNN's alpha, ...)
    # Unlabeled images (sources; captions ignored) for every peer's image-side fit, e.g. the gallery-modality
    # maps' text-query side; never the evaluated items.
    fit_images: list[str] = field(default_factory=list)
    calibrate: bool = True  # every method also evaluated with NNN calibration of the gallery (+nnn)
    xbt_config: str = "xbt-testbed"  # a YAML path or a shipped config name
    peers: list[str] = field(default_factory=lambda: list(PEER_METHODS))
    n_example_queries: int = 4
    seed: int = 0
    build_testbed: bool = False
    device: str = "auto"  # where every model runs (auto: a CUDA GPU when torch sees one); training too
    precision: str = "fp32"  # fp32 | bf16 | fp16 (GPU only): autocast in encoding and training
    num_workers: int = 0  # DataLoader processes decoding images

    @classmethod
    def testbed(cls, **overrides: Any) -> UpgradeJob:
        # fit_images: the openclipart renders (the models' pretraining images, never an eval or val item)
        base = dict(old="testbed:old", new="testbed:new", eval_data="testbed:eval", fit_pairs="testbed:xbt_train",
                    fit_texts="testbed:text_corpus", support="testbed:val", build_testbed=True,
                    fit_images=["testbed:vlp_old"])
        return cls(**(base | overrides))

    @property
    def fit_text_sources(self) -> list[str]:
        return [self.fit_texts] if isinstance(self.fit_texts, str) else list(self.fit_texts)

    @property
    def fit_texts_label(self) -> str:
        """How XBT's config records the text corpus (one source: as given, so earlier runs keep their key)."""
        return ", ".join(self.fit_text_sources)


#: The shipped XBT config for each backend of the new model (LoRA targets, batch sizes, schedules).
XBT_CONFIG_BY_BACKEND = {"testbed": "xbt-testbed", "openclip": "xbt-clip", "hf": "xbt-clip"}


def xbt_config_for(new: str) -> str:
    """The shipped XBT config for upgrading to the model `new` (a spec): the testbed's lit models train with
    xbt-testbed, open_clip and Hugging Face CLIP / SigLIP models with xbt-clip; any other model needs a config
    written for it."""
    backend = new.partition(":")[0]
    if backend not in XBT_CONFIG_BY_BACKEND:
        raise InputError(f"no shipped XBT config fits the new model {new!r} (backend {backend!r}); give --config: a"
                         " YAML file (start from src/xbt/configs/xbt-clip.yaml or xbt-testbed.yaml)")
    return XBT_CONFIG_BY_BACKEND[backend]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----- step 2: the old galleries --------------------------------------------------------------------
def build_gallery(model: VLPModel, pairs: Sequence[Pair], modality: str, root: Path):
    """The evaluation items embedded by `model` into a stamped gallery, cached by (space, items). The
    vectors come from the feature cache (the evaluation reads the same entries, so nothing is embedded
    twice); an interrupted build resumes (items already stored are skipped)."""
    from xbt.embed import embed_pairs
    from xbt.gallery import Gallery
    from xbt.gallery.ingest import items_from_pairs
    from xbt.gallery.store import is_gallery

    items = items_from_pairs(pairs, modality)
    path = root / f"{modality}-{_digest(model.space.id, [(i.id, i.payload) for i in items])}"
    gallery = Gallery.open(path) if is_gallery(path) else Gallery.create(path, model.space, modality=modality)
    if len(gallery.present([i.id for i in items])) < len(items):
        embeddings = embed_pairs(model, pairs)
        vectors = embeddings.images if modality == "image" else embeddings.texts
        gallery.add(vectors, [i.id for i in items], [i.payload for i in items], space=model.space, on_conflict="skip")
    return gallery


# ----- step 3: XBT ----------------------------------------------------------------------------------
def train_or_reuse_xbt(
    job: UpgradeJob, old: VLPModel, new: VLPModel, fit_pairs: Sequence[Pair], fit_texts: Sequence[str],
    show_progress: bool = True,
):
    """Train the compatible model, or load it if this exact config and data were trained before. `new` is
    left untouched (the compatible model adapts a copy of it with LoRA)."""
    import copy

    import yaml

    from xbt.compat.model import CONFIG_NAME
    from xbt.specs import load_compatible
    from xbt.train.distributed import DistContext
    from xbt.train.config import XBTConfig
    from xbt.train.stages import train_xbt

    path = resolve_config(job.xbt_config)
    cfg = XBTConfig.from_dict(yaml.safe_load(path.read_text()) | {
        "old": job.old, "new": job.new, "train_pairs": job.fit_pairs, "text_corpus": job.fit_texts_label, "seed": job.seed,
    })
    data_id = _digest(old.space.id, new.space.id, [asdict(p) for p in fit_pairs], list(fit_texts))
    precision = "" if job.precision == "fp32" else f"-{job.precision}"  # fp32 runs keep their cache key
    out = cache_dir("runs") / f"xbt-{_digest(cfg.to_dict(), data_id)}{precision}"
    adapted = copy.deepcopy(new)  # LoRA goes into this copy; `new` stays the plain new model
    if (out / CONFIG_NAME).exists() and (out / "training_report.json").exists():
        return load_compatible(out, new_model=adapted), out, True
    # trained on the new model's device (the job's --device), at the job's precision
    return train_xbt(cfg, out, old=old, new=adapted, show_progress=show_progress,
                     distributed=DistContext.local(adapted.device), precision=job.precision, train_pairs=fit_pairs,
                     text_corpus=fit_texts), out, False


# ----- step 4b: what to deploy -----------------------------------------------------------------------
def save_methods(run: Any, results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Every method's compatible model under out/<name>, the recommended one linked as out/recommended,
    with the reasons in out/recommended.json. Returns that JSON. A calibrated system (NAME+nnn) is its
    method's model searching a calibrated gallery: it shares NAME's folder, and the record says how the
    galleries are calibrated (`calibration`: the bank's source and alpha per direction)."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    folders: dict[str, str] = {}
    derived = {name: run.methods[name].details.get("derived_from") for name in run.compatible}
    for name, model in run.compatible.items():
        if derived[name]:
            continue
        folder = out / _folder_name(name)
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        folders[name] = str(folder.resolve())
    for name, base in derived.items():
        if base:
            folders[name] = folders[base]
    rec = results.get("recommendation") or {}
    link = out / "recommended"
    if link.is_symlink() or link.exists():
        link.unlink()
    chosen = rec.get("method")
    record: dict[str, Any] = {"method": chosen, "reason": rec.get("reason"), "models": folders}
    if chosen:
        link.symlink_to(Path(folders[chosen]).name, target_is_directory=True)
        record |= {
            "path": folders[chosen], "spec": f"compat:{link.absolute()}",  # the link: re-point it to switch
            "needs_old_model_at_query_time": run.compatible[chosen].needs_old_model_at_query_time,
            "mean_gain_percent": _mean_gain(results, chosen),
        }
        calibration = run.methods[chosen].details.get("calibration") if derived.get(chosen) else None
        if calibration:
            record["calibration"] = {"alpha": calibration["alpha"], "k": calibration["k"]}
    (out / "recommended.json").write_text(json.dumps(record, indent=1))
    return record


def _folder_name(method: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in method.lower())


def _mean_gain(results: dict[str, Any], method: str) -> float | None:
    cells = [c["gain"]["value"] for d in results["matrix"]["methods"][method].values() for c in d.values()]
    cells = [c for c in cells if c is not None]
    return round(sum(cells) / len(cells), 1) if cells else None


def deploy_commands(spec: str, old_images: Path, old_captions: Path, example_query: str, model_needs_old: bool,
                    image_files: Sequence[str | Path] = (), calibration: Sequence[str] = ()) -> list[str]:
    """The exact commands that put the recommended model to work on the old galleries. `image_files`: the
    image gallery's pictures; the service shows only images under folders it is given, so the serve command
    names the folders that hold them (`--media-root`), and its page shows every item's picture. `calibration`:
    the commands that calibrate the galleries first, when the recommended system searches a calibrated gallery."""
    from xbt.serve.media import covering_folders

    roots = "".join(f" --media-root {shlex.quote(str(root))}" for root in covering_folders(image_files))
    lines = []
    if calibration:
        lines += ["# the recommended method searches calibrated galleries (NNN): calibrate both once, as evaluated",
                  *calibration]
    lines += [
        f'xbt gallery search --gallery {old_images} --model {spec} --text "{example_query}" -k 5',
        f"xbt gallery add --gallery {old_images} --model {spec} --data NEW_IMAGES_FOLDER_OR_PAIRS",
        f"xbt serve --gallery {old_images} --model {spec}{roots} --port 8000   # then open http://127.0.0.1:8000/",
    ]
    if model_needs_old:
        lines.append("# this model is an ensemble: it loads and runs the old model for every query too")
    lines.append(f"# captions gallery (image queries): --gallery {old_captions}")
    return lines


def migration_strategy(run: Any, results: dict[str, Any]) -> dict[str, Any] | None:
    """Query-side (the recommended method) against in place (procrustes-gallery's maps transposed) on the
    evaluated galleries (`xbt.eval.migration_strategy.compare_on_run`), with the transform and encoding rates
    bench/transform.py measured on this machine where the checkout has them."""
    from xbt.eval.migration_strategy import compare_on_run

    method = (results.get("recommendation") or {}).get("method")
    if not method:
        return None
    t0 = time.perf_counter()
    rates = Path(__file__).resolve().parents[2] / "bench" / "results" / "transform.json"
    transform_per_s = encode_per_s = None
    if rates.exists():
        doc = json.loads(rates.read_text())
        transform_per_s = (doc.get("store") or {}).get("vectors_per_s")
        encode_per_s = (doc.get("encode") or {}).get("images_per_s")
    strategy = compare_on_run(run, method, "procrustes-gallery", transform_per_s=transform_per_s, encode_per_s=encode_per_s)
    if strategy is not None:
        strategy["transform_from"] = "procrustes-gallery"
        strategy["rates_from"] = str(rates) if rates.exists() else None
        strategy["seconds"] = round(time.perf_counter() - t0, 2)
    return strategy


def in_place_commands(strategy: dict[str, Any], transform_model: str, new_spec: str, old_images: Path,
                      old_captions: Path, moved_to: Path) -> list[str]:
    """The commands of the gallery-side migration: transform each gallery once, serve it with the new model,
    replace its rows by native ones as re-encoding allows. Headed by which strategy is picked and why."""
    head = ("# migration strategy picked: in place (" + strategy["why"] + "): these commands, instead of the query-side"
            " ones above" if strategy["pick"] == "in-place" else
            "# migration strategy picked: query-side (" + strategy["why"] + "): the commands above; in place would be")
    lines = [head]
    moved_images = moved_to.absolute() / f"{Path(old_images).name}-new-space"
    for gallery in (old_images, old_captions):
        moved = moved_to.absolute() / f"{Path(gallery).name}-new-space"
        lines += [f"xbt gallery transform --gallery {gallery} --out {moved} --map compat:{transform_model}",
                  f"xbt gallery backfill --in-place --gallery {moved} --model {new_spec} --order oldest"]
    lines.append(f"xbt serve --gallery {moved_images} --model {new_spec} --port 8000   # the new model itself")
    return lines


# ----- step 5: pictures ------------------------------------------------------------------------------
def example_grids(
    rows: Sequence[tuple[str, Any, Any, Any]], queries: Sequence[Any], modality: str, truth: Sequence[set[str]], out: Path,
    k: int = 5,
) -> list[Path]:
    """One PNG per query: a row per system (old, upgraded, ceiling), its top-k results left to right,
    correct results framed in green. `rows` = (label, gallery, vectors, space): the vectors of `queries` (a
    row each) that the evaluation measured, in `space`, searched in that gallery (which checks the space).
    A picture is drawn again only when what it shows changed (its digest is kept in out/.pictures.json)."""
    out.mkdir(parents=True, exist_ok=True)
    stamps_file = out / PICTURE_STAMPS
    try:
        stamps = json.loads(stamps_file.read_text())
    except (OSError, ValueError):
        stamps = {}
    paths = []
    for qi, query in enumerate(queries):
        path = out / f"{modality}-query-{qi + 1}.png"
        results = [(label, gallery.search(vectors[qi: qi + 1], k, space=space)[0]) for label, gallery, vectors, space in rows]
        shown = [(label, [(h.id, f"{h.score:.2f}", h.payload.get("caption"), _file_stamp(h.payload.get("image")))
                          for h in hits]) for label, hits in results]
        digest = _digest(modality, _file_stamp(query) if modality == "image" else query, sorted(truth[qi]), k, shown)
        if stamps.get(path.name) != digest or not path.exists():
            _draw_example(path, results, query, modality, truth[qi], k)
            stamps[path.name] = digest
            tmp = stamps_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(stamps, indent=1, sort_keys=True))
            tmp.replace(stamps_file)
        paths.append(path)
    return paths


PICTURE_STAMPS = ".pictures.json"


def _file_stamp(path: Any) -> Any:
    """An image file by path, size and modification time (its picture is redrawn when it changes)."""
    try:
        st = Path(path).stat()
    except (OSError, TypeError):
        return path
    return [str(path), st.st_size, st.st_mtime_ns]


def _draw_example(path: Path, results: Sequence[tuple[str, Any]], query: Any, modality: str, truth: set[str],
                  k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from xbt.data.images import load_image

    fig, axes = plt.subplots(len(results), k + 1, figsize=(2.1 * (k + 1), 2.3 * len(results)))
    for ri, (label, hits) in enumerate(results):
        ax = axes[ri][0]
        ax.axis("off")
        if modality == "text":
            ax.text(0.5, 0.5, f"{label}\n\n\u201c{query}\u201d", ha="center", va="center", wrap=True, fontsize=8)
        else:
            ax.imshow(load_image(query).resize((160, 160), Image.BICUBIC))
            ax.set_title(label, fontsize=8)
        for hi in range(k):
            ax = axes[ri][hi + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if hi >= len(hits):
                ax.axis("off")
                continue
            hit = hits[hi]
            correct = hit.id in truth
            if modality == "text":
                ax.imshow(load_image(hit.payload["image"]).resize((160, 160), Image.BICUBIC))
            else:
                ax.text(0.5, 0.5, hit.payload.get("caption", hit.id), ha="center", va="center", wrap=True, fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor("#1a9850" if correct else "#bbbbbb")
                spine.set_linewidth(4 if correct else 1)
            ax.set_title(f"#{hi + 1}  {hit.score:.2f}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----- phase times ------------------------------------------------------------------------------------
def _setup_timings() -> dict[str, float]:
    """The set-up phases ./run.sh ran before this process, {name: seconds} (XBT_SETUP_TIMINGS); {} when
    run otherwise, or when the variable does not hold a JSON object of numbers."""
    import os

    try:
        value = json.loads(os.environ.get("XBT_SETUP_TIMINGS") or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if isinstance(v, (int, float))}




def _training_timings(run_dir: Path) -> dict[str, float]:
    """Stage times from a training run's report (prepare, stage 1, stage 2), {} when it has none."""
    try:
        report = json.loads((run_dir / "training_report.json").read_text())
    except (OSError, ValueError):
        return {}
    timings = report.get("timings") if isinstance(report, dict) else None
    return {k: v for k, v in timings.items() if isinstance(v, (int, float))} if isinstance(timings, dict) else {}


# ----- the job -----------------------------------------------------------------------------------------
def run_upgrade(job: UpgradeJob, out: str | Path, show_progress: bool = True, log=print) -> dict[str, Any]:
    """Run every step; returns the summary (also written to out/summary.json)."""
    import random

    from xbt.eval.report import write_report
    from xbt.eval.runner import run_evaluation
    from xbt.models.device import describe
    from xbt.specs import load_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    peak_mb: dict[str, float] = {}

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)
        peak_mb[name] = peak_rss_mb()
        log(f"[{name}] {timings[name]:.1f} s  (peak memory so far {peak_mb[name]:,.0f} MB)")

    def parts(name: str, seconds: dict[str, float]) -> None:
        """A phase's own breakdown, printed under it and kept in the summary (timings_s["NAME: PART"])."""
        for part, value in seconds.items():
            key = f"{name}: {part.removesuffix('_s')}"
            timings[key] = round(float(value), 1)
            log(f"  [{key}] {timings[key]:.1f} s")

    # ./run.sh hands over its own phases (Debian packages, Python environment, assets) with their times.
    setup = _setup_timings()
    for name, seconds in setup.items():
        log(f"[0 set-up: {name}] {seconds:.1f} s")

    t = time.perf_counter()
    resolve_config(job.xbt_config)  # a missing config fails now, not after the galleries
    if job.build_testbed:
        from xbt.data.testbed import STEP_TIMINGS
        from xbt.train.testbed import build_testbed

        STEP_TIMINGS.clear()
        built = build_testbed(("old", "new"), show_progress=show_progress)
        stage("1a testbed", t)
        parts("1a testbed", built.get("timings", {}) | dict(STEP_TIMINGS))
        t = time.perf_counter()
    old = load_model(job.old).configure(job.device, job.precision, job.num_workers)
    new = load_model(job.new).configure(job.device, job.precision, job.num_workers)
    eval_pairs = open_dataset(job.eval_data)
    fit_pairs = open_dataset(job.fit_pairs)
    fit_texts = [t for source in job.fit_text_sources for t in load_texts(source)]
    fit_images = [p for source in job.fit_images for p in open_images(source)]
    support = open_dataset(job.support) if job.support else None
    if job.build_testbed and job.precision == "fp32":
        # The testbed's lit models: every item's vectors from the towers' features cached by the build (the
        # heads are a linear map), so galleries, training and evaluation encode nothing again.
        from xbt.compat.fit import fit_image_items
        from xbt.embed import prime_lit_cache

        for model in (old, new):
            prime_lit_cache(model, [*eval_pairs, *fit_image_items(fit_pairs, fit_images), *(support or [])], fit_texts)
            model.release_towers()  # every vector is cached now; XBT's training builds its own copy's tower
    stage("1b models and data" if job.build_testbed else "1 models and data", t)

    t = time.perf_counter()
    galleries = cache_dir("galleries")
    old_images = build_gallery(old, eval_pairs, "image", galleries)
    old_captions = build_gallery(old, eval_pairs, "text", galleries)
    # The ceiling: what a full backfill would give (the new model on a re-embedded gallery).
    new_images = build_gallery(new, eval_pairs, "image", galleries)
    new_captions = build_gallery(new, eval_pairs, "text", galleries)
    stage("2 galleries", t)

    t = time.perf_counter()
    compat, xbt_dir, reused = train_or_reuse_xbt(job, old, new, fit_pairs, fit_texts, show_progress)
    compat.configure(job.device, job.precision, job.num_workers)  # training returns it on the CPU
    stage("3 XBT training" + (" (reused)" if reused else ""), t)
    if not reused:
        parts("3 XBT training", _training_timings(xbt_dir))

    t = time.perf_counter()
    methods: dict[str, Any] = {name: name for name in job.peers}
    methods["XBT"] = compat
    run = run_evaluation(
        old, new, eval_pairs, methods, fit_texts=fit_texts, fit_pairs=fit_pairs, support_pairs=support,
        seed=job.seed, skip_unfittable=True, show_progress=show_progress, fit_cache=cache_dir("peers"),
        fit_images=fit_images,
        describe={"old": job.old, "new": job.new, "eval": job.eval_data, "fit_pairs": job.fit_pairs,
                  "fit_texts": job.fit_texts_label, "support": job.support, "xbt": str(xbt_dir),
                  "fit_images": ", ".join(job.fit_images) or None},
    )
    if job.calibrate and support and fit_pairs:
        from xbt.eval.calibrated import add_calibrated

        tc = time.perf_counter()
        add_calibrated(run, old, new, bank_pairs=fit_pairs, val_pairs=support)  # the bank: training queries
        run.timings_s["calibrate"] = time.perf_counter() - tc
    results = run.to_results()
    strategy = migration_strategy(run, results)
    if strategy is not None:
        results["migration_strategy"] = strategy
        run.timings_s["migration strategy"] = strategy.pop("seconds")
    report_files = write_report(results, out / "report")
    stage("4 evaluation and report", t)
    parts("4 evaluation and report", run.timings_s)

    t = time.perf_counter()
    deployed = save_methods(run, results, out / "models")
    stage("5 compatible models saved", t)

    t = time.perf_counter()
    rng = random.Random(job.seed)
    picks = sorted(rng.sample(range(len(eval_pairs)), min(job.n_example_queries, len(eval_pairs))))
    text_queries = [eval_pairs[i].caption for i in picks]
    text_truth = [{eval_pairs[i].image_id} for i in picks]
    image_queries = [eval_pairs[i].image for i in picks]
    image_truth = [{f"{eval_pairs[i].image_id}#0"} for i in picks]
    # The queries' vectors as the evaluation computed them (nothing is encoded again for the pictures).
    olds, news, upgraded = run.embeddings["old"], run.embeddings["new"], run.queries["XBT"]
    rows_of = [olds.caption_image_index[i] for i in picks]  # each picked pair's image row
    text_rows = [("old model, old gallery", old_images, olds.texts[picks], olds.space),
                 ("XBT upgrade, old gallery", old_images, upgraded.texts[picks], upgraded.space),
                 ("new model, full backfill", new_images, news.texts[picks], news.space)]
    image_rows = [("old model, old captions", old_captions, olds.images[rows_of], olds.space),
                  ("XBT upgrade, old captions", old_captions, upgraded.images[rows_of], upgraded.space),
                  ("new model, full backfill", new_captions, news.images[rows_of], news.space)]
    pictures = example_grids(text_rows, text_queries, "text", text_truth, out / "examples")
    pictures += example_grids(image_rows, image_queries, "image", image_truth, out / "examples")
    stage("6 example pictures", t)

    commands = []
    if deployed.get("spec"):
        calibration = []
        if deployed.get("calibration"):
            from xbt.eval.calibrated import calibration_commands

            calibration = calibration_commands(deployed["spec"], old_images.path, old_captions.path, job.fit_pairs,
                                               deployed["calibration"]["alpha"])
        commands = deploy_commands(deployed["spec"], old_images.path, old_captions.path, text_queries[0] if text_queries
                                   else "a query", bool(deployed.get("needs_old_model_at_query_time")),
                                   image_files=[p.image for p in eval_pairs], calibration=calibration)
        if strategy is not None and deployed["models"].get(strategy["transform_from"]):
            commands += in_place_commands(strategy, deployed["models"][strategy["transform_from"]], job.new,
                                          old_images.path, old_captions.path, out / "galleries")
    summary = {
        "results": str(report_files["results"]),
        "report": {k: str(v) for k, v in report_files.items()},
        "examples": [str(p) for p in pictures],
        "xbt_model": str(xbt_dir),
        "models": deployed,
        "deploy_commands": commands,
        "galleries": {"old_images": str(old_images.path), "old_captions": str(old_captions.path)},
        "timings_s": timings,
        "peak_rss_mb_after": peak_mb,  # this process's peak resident memory at the end of each phase
        "setup_timings_s": setup,
        "runtime": describe(new),
        "recommendation": results.get("recommendation"),
        "matrix": results["matrix"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
