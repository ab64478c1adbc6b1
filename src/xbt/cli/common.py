"""What every command shares: the console, the one error-handling path, the option types that mean the same
thing in every command (--device, --precision, --num-workers, --fit-texts, --fit-images), and `Runtime`."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

from xbt.errors import XbtError

console = Console(stderr=True)

#: What a command turns into `error: MESSAGE` and exit status 1: xbt's own errors (a user's input, a missing
#: asset, a space mismatch), and the ValueError / OSError of reading what the user named.
USER_ERRORS = (XbtError, ValueError, OSError)

F = TypeVar("F", bound=Callable[..., Any])


def fail(exc: BaseException | str) -> typer.Exit:
    """Print `error: MESSAGE` and return the exit to raise (status 1)."""
    console.print(f"[bold red]error:[/] {exc}")
    return typer.Exit(1)


def handle_errors(command: F) -> F:
    """The one error-handling path of every command and callback: a user error becomes a message and exit 1."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as exc:
            raise fail(exc) from None

    return run  # type: ignore[return-value]  # functools.wraps keeps the signature typer reads


class App(typer.Typer):
    """A typer app whose every command (and group callback) goes through `handle_errors`."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().command(*args, **kwargs)

        def decorator(f: F) -> F:
            register(handle_errors(f))
            return f

        return decorator

    def callback(self, *args: Any, **kwargs: Any) -> Callable[[F], F]:
        register = super().callback(*args, **kwargs)

        def decorator(f: F) -> F:
            register(handle_errors(f))
            return f

        return decorator


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, default=str))


# ----- one definition of each option that several commands take ---------------------------------------------
Device = Annotated[str, typer.Option("--device", help="Where the models run: auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N.")]
Precision = Annotated[str, typer.Option("--precision", help="fp32, bf16 (CPU or GPU) or fp16 (GPU only): autocast for the forward passes; the weights, hence the embedding space, stay the same.")]
Workers = Annotated[int, typer.Option("--num-workers", help="Processes decoding and preprocessing images (DataLoader workers); 0 = in this process.")]

FIT_TEXTS_HELP = "Texts both models embed for the text-side fits (.txt, a dataset's captions, testbed:text_corpus); repeatable."
FIT_IMAGES_HELP = ("Unlabeled images both models embed for the image-side fits (a folder, a file list, any dataset"
                   " source; captions ignored), e.g. a sample of the gallery's kind of image, never its evaluated items; repeatable.")
FitTexts = Annotated[Optional[list[str]], typer.Option("--fit-texts", help=FIT_TEXTS_HELP)]
FitTextsOld = Annotated[Optional[list[str]], typer.Option("--fit-text", hidden=True, help="The older spelling of --fit-texts.")]
FitImages = Annotated[Optional[list[str]], typer.Option("--fit-images", help=FIT_IMAGES_HELP)]


def sources(*options: Optional[list[str]]) -> list[str]:
    """The sources of an option and its hidden older spelling (e.g. --fit-texts and --fit-text), in order."""
    return [s for option in options for s in option or []]


def split_list(value: str) -> list[str]:
    """A comma-separated option's items, stripped, empty ones dropped."""
    return [x.strip() for x in value.split(",") if x.strip()]


class Runtime:
    """The device, precision and loader workers of one command, checked once; `load` gives configured models."""

    def __init__(self, device: str = "auto", precision: str = "fp32", num_workers: int = 0):
        from xbt.models.device import check_precision, resolve_device

        self.device = resolve_device(device)
        self.precision = check_precision(precision, self.device)
        self.num_workers = num_workers
        self.options: dict[str, Any] = {"device": str(self.device), "precision": self.precision, "num_workers": num_workers}

    def load(self, spec: str) -> Any:
        from xbt.specs import load_model

        return self.place(load_model(spec))

    def place(self, model: Any) -> Any:
        return model.configure(self.device, self.precision, self.num_workers)
