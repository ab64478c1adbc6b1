"""One progress-bar helper (rich) for every long loop, silent when disabled or not on a terminal-like run, and
the peak memory a long job reports about itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def progress_bar(total: int | None, label: str, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(k=1, **fields)`; fields (e.g. loss=0.3) are shown beside the bar."""
    if not enabled:
        yield lambda k=1, **fields: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
    ]
    from rich.console import Console

    # stderr, like tqdm: stdout stays clean for results a command prints (JSON piped to another tool).
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=total, info="")

        def advance(k: int = 1, **fields: object) -> None:
            info = " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}" for key, value in fields.items())
            if fields:
                bar.update(task, advance=k, info=info)
            else:
                bar.update(task, advance=k)

        yield advance


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)
