"""The xbt command line: parses, calls the library, prints (the library never imports this package).

One module per command group: `assets`, `train` (train, fit, chain, export, testbed, lit), `evaluate`
(evaluate, recommend, upgrade, demo), `gallery` and `migration` (xbt gallery ...), `serve` (serve, embed);
`common` holds the console, the one error-handling path (`handle_errors`, applied to every command by `App`)
and the options several commands share."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from xbt.cli import evaluate, serve, train  # noqa: E402  (the variables above are set before any model library loads)
from xbt.cli.assets import assets_app  # noqa: E402
from xbt.cli.common import App, console  # noqa: E402
from xbt.cli.gallery import gallery_app  # noqa: E402
from xbt.cli.migration import gallery_backfill  # noqa: E402, F401  (registers backfill, cutover, backfill-curve)
from xbt.errors import XbtError  # noqa: E402

app = App(help="xbt: backfill-free upgrades of image-text retrieval systems.", no_args_is_help=True)
app.add_typer(assets_app, name="assets")
app.add_typer(train.testbed_app, name="testbed")
app.add_typer(train.lit_app, name="lit")
app.command("train")(train.train)
app.command("chain")(train.chain)
app.command("fit")(train.fit)
app.command("export")(train.export)
app.command("embed")(serve.embed)
app.command("evaluate")(evaluate.evaluate)
app.command("recommend")(evaluate.recommend)
app.command("upgrade")(evaluate.upgrade)
app.command("demo")(evaluate.demo)
app.add_typer(gallery_app, name="gallery")
app.command("serve")(serve.serve)

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except XbtError as exc:  # pragma: no cover - safety net: every command already turns these into a message
        console.print(f"[bold red]error:[/] {exc}")
        raise SystemExit(1) from None
