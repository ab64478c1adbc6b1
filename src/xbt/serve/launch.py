"""What `xbt serve` sets up before the service starts: the bearer token (given one way only) and the
retrievers (a gallery, or a migration in progress, each searched through the query model's own view; the
old model's retriever beside it), with every model's weights loaded before the first query."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from xbt.errors import InputError
from xbt.models.base import VLPModel
from xbt.serve.app import read_token_file

TOKEN_ON_COMMAND_LINE = ("--token on the command line is visible to every user of this machine (ps, /proc) and stays"
                         " in shell history; prefer XBT_SERVE_TOKEN or --token-file")


def serve_token(token: str | None, token_file: Path | None, on_command_line: bool = False,
                warn: Callable[[str], None] | None = None) -> str | None:
    """The service's bearer token: from `token_file`, or `token` (the XBT_SERVE_TOKEN variable or --token), never
    both; an empty token is no token (a read-only service). A token typed on the command line (`on_command_line`)
    is served, with a warning to `warn`."""
    token = token or None
    if token_file is not None:
        if token is not None:
            raise InputError("give the token one way: --token-file, or XBT_SERVE_TOKEN (or --token), not both")
        return read_token_file(token_file)
    if token is not None and on_command_line and warn is not None:
        warn(TOKEN_ON_COMMAND_LINE)
    return token


def token_on_command_line(argv: list[str]) -> bool:
    """Whether --token was typed among `argv` (rather than read from XBT_SERVE_TOKEN)."""
    return any(a == "--token" or a.startswith("--token=") for a in argv)


def open_retrievers(model: str, load: Callable[[str], VLPModel], *, gallery: str | None = None,
                    migration: Path | None = None, new_model: str | None = None,
                    old_model: str | None = None) -> tuple[Any, Any]:
    """The served retriever and, with `old_model`, the old gallery's own retriever (the page shows its results
    beside the served model's): over `gallery`, or during a backfill over the `migration` folder with
    `new_model`. `load` turns a spec into a placed model. Every tower is built now, not on the first query."""
    from xbt.gallery.base import QueryModelView, open_gallery
    from xbt.gallery.ingest import GalleryRetriever
    from xbt.gallery.migrating import MigratingRetriever
    from xbt.gallery.migration import Migration

    if migration is not None:
        if new_model is None:
            raise InputError("--migration needs --new-model")
        retriever: Any = MigratingRetriever(Migration(migration), load(model), load(new_model))
        old_gallery = retriever.old
        served = [retriever.compat_model, retriever.new_model]
    else:
        if gallery is None:
            raise InputError("give --gallery (or --migration with --new-model)")
        served_model = load(model)
        # Each model searches through its own view: a calibration applies to the model it was made for.
        retriever = GalleryRetriever(QueryModelView(open_gallery(gallery), served_model), served_model)  # type: ignore[arg-type]  # a view searches like the gallery it wraps
        old_gallery = retriever.gallery.gallery
        served = [retriever.model]
    old_vlp = load(old_model) if old_model else None
    old = GalleryRetriever(QueryModelView(old_gallery, old_vlp), old_vlp) if old_vlp is not None else None  # type: ignore[arg-type]  # a view, as above
    for loaded in [*served, *([old_vlp] if old_vlp is not None else [])]:
        loaded.build_towers()  # every weight loaded now, not on the first query
    return retriever, old
