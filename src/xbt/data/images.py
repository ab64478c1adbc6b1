"""Loading images the same way everywhere: raster files, SVG (rendered), alpha flattened on white."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from xbt.errors import InputError

ImageInput = Union[Image.Image, str, Path, bytes]

SVG_RENDER_SIZE = 384
MAX_PIXELS = 8192 * 8192


def _flatten(img: Image.Image) -> Image.Image:
    """RGB on a white background: stamps and clip art are transparent, and black is not neutral."""
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        background.alpha_composite(img)
        img = background
    return img.convert("RGB")


def render_svg(data: bytes, size: int = SVG_RENDER_SIZE) -> Image.Image:
    import cairosvg

    png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
    return Image.open(io.BytesIO(png))


def load_image(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a PIL image, a path (PNG/JPEG/... or SVG) or encoded bytes.

    A file that cannot be decoded raises InputError naming it, so a bad item can be dropped
    without losing the rest of a batch job.
    """
    if isinstance(image, Image.Image):
        return _flatten(image)
    name = str(image) if isinstance(image, (str, Path)) else "<bytes>"
    try:
        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.exists():
                raise InputError(f"image file not found: {path}")
            data = path.read_bytes()
            is_svg = path.suffix.lower() in (".svg", ".svgz")
        else:
            data = bytes(image)
            is_svg = data.lstrip()[:5] in (b"<?xml", b"<svg ") and b"<svg" in data[:4096]
        img = render_svg(data) if is_svg else Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_PIXELS:
            raise InputError(f"image {name} is {img.width}x{img.height}, larger than xbt accepts ({MAX_PIXELS} pixels)")
        img.load()
        return _flatten(img)
    except InputError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"cannot decode image {name}: {exc}. Remove or replace this file.") from exc
    except Exception as exc:  # cairosvg raises assorted parser errors on broken SVG
        raise InputError(f"cannot render image {name}: {type(exc).__name__}: {exc}. Remove or replace this file.") from exc
