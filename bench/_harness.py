"""What every benchmark under bench/ shares: repeated timing with medians, memory readings, the machine's
description and load, and one command-line shape (`--quick`, `--repeats`, `--out`).

A benchmark script defines `run(args) -> dict` (a *figure*: its parameters, rows, goal verdict and notes)
and calls `cli(run, description, add_arguments)`. The figure is written as JSON; `bench/run_all.py` runs
every script in its own process (so one figure's memory never inflates another's), merges the figures into
bench/results.json and renders docs/benchmarks.md from that file alone (bench/report.py).

Timings are medians of n repeats; the minimum is kept beside it. The machine is shared, so the load average
at the start and end of every figure is recorded with it: a median measured at load 5 on two cores is
slower than the same code on an idle machine, and the report says so. Where a figure is about what code
costs rather than how long a user waits, single-threaded CPU time is measured beside wall time: it leaves
out the time the scheduler gave other jobs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

SCHEMA = "xbt.bench/1"
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


# ----- timing ----------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Seconds per call of n timed calls (after the warm-up calls, which are not counted)."""

    median: float
    min: float
    max: float
    n: int
    runs: list[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(runs: Sequence[float]) -> Timing:
    if not runs:
        raise ValueError("no timed runs to summarise")
    runs = [float(r) for r in runs]
    return Timing(statistics.median(runs), min(runs), max(runs), len(runs), runs)


def repeat(fn: Callable[[], Any], n: int, warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Time `fn()` n times after `warmup` untimed calls (which pay for lazy initialisation and caches).

    `clock`: wall time by default; `time.thread_time` gives the CPU time of a single-threaded call, which
    leaves out the time the scheduler gave to other jobs (on a busy machine, most of the wall time)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(n):
        t0 = clock()
        fn()
        runs.append(clock() - t0)
    return summarise(runs)


def interleaved(fns: dict[str, Callable[[], Any]], n: int, warmup: int = 1) -> tuple[dict[str, Timing], dict[str, Timing]]:
    """Time several variants round-robin (A B C A B C ...), so that a burst of load from another job hits
    every variant alike instead of biasing whichever happened to run during it. Returns the wall times
    and the process CPU times (with one thread: the cost itself, without the time other jobs held the core)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: summarise(v) for k, v in wall.items()}, {k: summarise(v) for k, v in cpu.items()}


def calls_per_run(fn: Callable[[], Any], target_s: float = 0.05, max_calls: int = 10_000) -> int:
    """How many back-to-back calls of a fast `fn` make one timed run of about `target_s` seconds, so that
    a microsecond-scale call is timed as a run of many calls rather than at the clock's resolution."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return int(max(1, min(max_calls, target_s / once)))


def repeat_fast(fn: Callable[[], Any], n: int, target_s: float = 0.05,
                clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Like `repeat`, for calls of microseconds: each run is k back-to-back calls; reports seconds per call."""
    k = calls_per_run(fn, target_s)

    def block() -> None:
        for _ in range(k):
            fn()

    t = repeat(block, n, warmup=1, clock=clock)
    return summarise([r / k for r in t.runs])


# ----- memory ----------------------------------------------------------------------------------------
def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory of this process now."""
    kib = _status_kib("VmRSS")
    if kib is None:  # not Linux: the peak is the best available reading
        return peak_rss_mib()
    return kib / 1024


def peak_rss_mib() -> float:
    """Peak resident memory of this process since it started, or since the last `reset_peak_rss`."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib / 1024
    scale = 1 if sys.platform != "darwin" else 1 / 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to /proc/self/clear_refs), so the next
    `peak_rss_mib` is the peak of what follows. Returns False where that is impossible; the peak then
    still counts from process start, which the caller must say."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc's malloc_trim), so that the RSS
    growth over the next block is that block's, not a reuse of memory an earlier block freed."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS deltas may then undercount
        pass


class PeakMemory:
    """Time, CPU time, peak and growth of resident memory over a block of code run once (a build, a
    training): `with PeakMemory() as m: ...` then m.elapsed_s, m.cpu_s (all threads of the process),
    m.peak_mib, m.delta_mib, m.peak_over_before_mib."""

    def __enter__(self) -> PeakMemory:
        self.reset = reset_peak_rss()
        self.before_mib = rss_mib()
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed_s = time.perf_counter() - self.t0
        self.cpu_s = time.process_time() - self.c0
        self.after_mib = rss_mib()
        self.peak_mib = peak_rss_mib()
        self.delta_mib = self.after_mib - self.before_mib
        self.peak_over_before_mib = self.peak_mib - self.before_mib


# ----- threads ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    """Run with n threads in torch and in every OpenMP/BLAS pool loaded (numpy's OpenBLAS, faiss's OpenMP).

    The benchmarks default to one: on cores shared with other jobs, a multithreaded kernel waits at every
    barrier for its slowest thread, which may be descheduled, and runs slower than on one thread."""
    import torch
    from threadpoolctl import threadpool_limits

    faiss = sys.modules.get("faiss")  # its OpenMP pool is limited by threadpoolctl too; this says so twice
    before = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(n)
    if faiss:
        faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before[0])
        if faiss:
            faiss.omp_set_num_threads(before[1])


# ----- machine ---------------------------------------------------------------------------------------
def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - platforms without getloadavg
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cpu_flags() -> list[str]:
    """The SIMD extensions that decide BLAS and faiss speed."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    except OSError:
        pass
    return []


def theoretical_peak_gflops() -> float | None:
    """float32 peak of all cores: clock x 32 FLOP per cycle (two 256-bit FMA units, as AVX2 cores of the
    last decade have) x cores. None where the clock or AVX2+FMA is unknown."""
    if not {"avx2", "fma"} <= set(cpu_flags()):
        return None
    try:
        mhz = next(float(line.split(":", 1)[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None
    return mhz / 1000 * 32 * (os.cpu_count() or 1)


def library_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing transformers & co. would take seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("numpy", "torch", "faiss-cpu", "open_clip_torch", "transformers", "sentence-transformers", "peft"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def machine_info() -> dict[str, Any]:
    """The machine, for a benchmark's record. Without torch (bench/main_job.py runs before any environment
    exists, under the system Python) the torch fields are None."""
    try:
        import torch
    except ImportError:
        torch = None
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads() if torch else None,
        "memory_gib": memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "gpu": torch.cuda.get_device_name(0) if torch and torch.cuda.is_available() else None,
        "versions": library_versions(),
    }


def sgemm_gflops(n_threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Best float32 matrix-multiply rate of `repeats` runs on n threads: the roofline that per-query costs
    of dense layers are compared with (the best run, because a floor must not include other jobs' load)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    clock = time.thread_time if n_threads == 1 else time.perf_counter  # one thread: its CPU time, not others' share
    with threads(n_threads):
        t = repeat(lambda: a @ b, repeats, warmup=2, clock=clock)
    return 2 * size**3 / t.min / 1e9


# ----- figures ---------------------------------------------------------------------------------------
def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class FigureRun:
    """Times a whole figure and records the load average at its start and end."""

    def __enter__(self) -> FigureRun:
        self.started, self.load_start, self.t0 = now_iso(), load_average(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finished, self.load_end = now_iso(), load_average()
        self.wall_s = time.perf_counter() - self.t0

    def stamp(self) -> dict[str, Any]:
        return {"started": self.started, "finished": self.finished, "wall_s": round(self.wall_s, 1),
                "load_average": {"start": self.load_start, "end": self.load_end}}


def goal(statement: str, met: bool | None, detail: str) -> dict[str, Any]:
    """A goal's verdict. `met` None: not measurable in this run (say why in `detail`)."""
    return {"statement": statement, "met": met, "detail": detail}


def column(key: str, header: str, fmt: str = "{}") -> list[str]:
    """How the report shows one field of a figure's rows."""
    return [key, header, fmt]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, few repeats (seconds, not minutes)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default: 5, quick: 2)")
    parser.add_argument("--out", type=Path, default=None, help="write the figure as JSON here (default: print it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch, BLAS and faiss (default 1: see `threads`)")
    return parser


def add_map_dimensions(parser: argparse.ArgumentParser) -> None:
    """The query map's shape, as on the testbed (512-d new -> 256-d old; XBT's mlp projection 1024 wide)."""
    parser.add_argument("--new-dim", type=int, default=512)
    parser.add_argument("--old-dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024, help="hidden width of XBT's mlp projection")


def cli(run: Callable[[argparse.Namespace], dict[str, Any]], description: str,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The shared command line of a benchmark script: parse, run the figure under `FigureRun`, write it."""
    parser = base_parser(description)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    with FigureRun() as fig, threads(args.threads):
        figure = run(args)
    figure = {**figure, **fig.stamp(), "quick": bool(args.quick), "repeats": args.repeats, "threads": args.threads}
    if args.out is not None:
        write_json(args.out, figure)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(json.dumps(figure, indent=1))
    return figure


def run_script(script: str | Path, args: Sequence[str], timeout_s: float | None = None) -> subprocess.CompletedProcess:
    """Run a bench script (or any Python file) in a fresh interpreter with this one's environment and
    src/ on the path; output streams through so long runs show progress."""
    env = dict(os.environ)
    src = str(REPO / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        env.setdefault(key, value)
    return subprocess.run([sys.executable, str(script), *map(str, args)], env=env, timeout=timeout_s, check=True)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
