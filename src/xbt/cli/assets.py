"""`xbt assets`: the shipped model towers and the image-caption data."""

from __future__ import annotations

from typing import Any

import typer

from xbt.cli.common import App, console

assets_app = App(help="Install and check the shipped model towers and image-caption data.", no_args_is_help=True)


@assets_app.command("install")
def assets_install(quiet: bool = typer.Option(False, "--quiet", help="Print only problems.")) -> None:
    """Reassemble the towers that ship in parts and report what is present."""
    from xbt.assets import install_assets

    _print_assets(install_assets(), quiet)


@assets_app.command("check")
def assets_check() -> None:
    """Report every asset: where it is, or the command that installs it."""
    from xbt.assets import check_assets

    status = check_assets()
    _print_assets(status, quiet=False)
    if not all(s.ok for s in status):
        raise typer.Exit(1)


def _print_assets(status: Any, quiet: bool) -> None:
    for s in status:
        if not s.ok:
            console.print(f"[yellow]missing[/] {s.name}: {s.detail}")
        elif not quiet:
            console.print(f"[green]ok[/] {s.name}: {s.detail}")
