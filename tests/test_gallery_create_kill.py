"""A gallery's creation survives a kill at any of its steps, and two creators of one folder do not collide.

Every step the creation of a gallery and its first writes take is a point where a process can die: each
file-system call (mkdir, rename, replace, unlink, rmdir, rmtree) and each SQL statement (SQLite's trace
callback runs as a statement starts). A forked child is SIGKILLed just before its k-th step (a real kill:
no handler, no close, no clean-up), for every k until a run completes; after each kill the same create is
rerun, as `xbt gallery build` reruns it, and must succeed and hold exactly what it was given. Before the
staged creation, a kill while SQLite switched the new database to WAL left `gallery.db-journal` behind,
and the rerun refused the folder ("exists and is not empty"): the flake of tests/test_kill.py."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from xbt.errors import InputError
from xbt.gallery import store
from xbt.gallery.store import Gallery, is_complete_gallery
from xbt.models.base import EmbeddingSpace

SPACE = EmbeddingSpace("kill-test", 8, "f" * 16)
IDS = [f"item-{i}" for i in range(6)]
VECTORS = np.random.default_rng(0).standard_normal((len(IDS), 8)).astype(np.float32)
VECTORS /= np.linalg.norm(VECTORS, axis=1, keepdims=True)


def _create_and_fill(folder: Path) -> None:
    """What a build does first: create the gallery (or resume one whose creation committed), add items."""
    gallery = Gallery.open(folder) if is_complete_gallery(folder) else Gallery.create(folder, SPACE, modality="image")
    with gallery:
        gallery.add(VECTORS, IDS, [{"n": i} for i in range(len(IDS))], space=SPACE, on_conflict="skip")


def _run_until_step(folder: Path, k: int) -> bool:
    """Run `_create_and_fill` in a forked child SIGKILLed just before its k-th step; True if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: count steps, die at the k-th
        seen = [0]

        def step() -> None:
            seen[0] += 1
            if seen[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)

        def wrap(module, name):
            real = getattr(module, name)

            def call(path, *args, **kwargs):
                if str(folder) in os.fspath(path):
                    step()
                return real(path, *args, **kwargs)

            setattr(module, name, call)

        for module, name in ((os, "mkdir"), (os, "rename"), (os, "replace"), (os, "unlink"), (os, "rmdir"),
                             (shutil, "rmtree")):
            wrap(module, name)
        real_connect = Gallery._connect

        def connect(db):
            conn = real_connect(db)
            conn.set_trace_callback(lambda _sql: step())
            return conn

        Gallery._connect = staticmethod(connect)
        try:
            _create_and_fill(folder)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the run with a kill at step {k} failed without being killed"
    return False


def _check(folder: Path) -> None:
    with Gallery.open(folder) as g:
        assert g.verify() == []
        assert sorted(g.ids()) == sorted(IDS)
        got = g.get(IDS, with_vectors=True)
        np.testing.assert_allclose(np.stack([got[i]["vector"] for i in IDS]), VECTORS, atol=1e-6)
        assert g.space == SPACE


def test_a_create_killed_before_any_of_its_steps_is_resumed_by_the_rerun(tmp_path):
    k, kills = 1, 0
    while _run_until_step(tmp_path / f"g{k}", k):
        kills += 1
        _create_and_fill(tmp_path / f"g{k}")  # the rerun, as a user would: the same create
        _check(tmp_path / f"g{k}")
        k += 1
    _check(tmp_path / f"g{k}")
    assert kills >= 20, f"only {kills} kill points: the step counter no longer sees the creation's steps"
    print({"kill_points": kills, "resumed": kills, "lost": 0})


def test_a_journal_left_by_an_old_in_place_creation_is_cleaned_up(tmp_path):
    """What the flaky build left: a database whose creating transaction never committed, with a rollback
    journal beside it (a kill while SQLite switched a new database to WAL)."""
    import sqlite3

    folder = tmp_path / "g"
    folder.mkdir()
    sqlite3.connect(folder / store.DB_NAME).close()  # an empty database file: no tables
    (folder / (store.DB_NAME + "-journal")).write_bytes(b"")
    _create_and_fill(folder)
    _check(folder)


def test_a_folder_holding_other_files_is_still_refused(tmp_path):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        Gallery.create(tmp_path / "g", SPACE)
    assert (tmp_path / "g" / "notes.txt").read_text() == "mine"


def test_two_simultaneous_creates_of_one_folder(tmp_path):
    """Under the creation lock the second creator waits, then finds the first's gallery and is refused
    with a clear message; it never deletes the first's database while that one is being written."""
    folder = tmp_path / "g"
    outcomes: list[str] = []
    barrier = threading.Barrier(2)

    def create() -> None:
        barrier.wait()
        try:
            Gallery.create(folder, SPACE).close()
            outcomes.append("created")
        except InputError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 2 and outcomes.count("created") == 1, outcomes
    refused = next(o for o in outcomes if o != "created")
    assert "already holds a gallery" in refused
    with Gallery.open(folder) as g:
        assert g.verify() == [] and len(g) == 0


_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_gallery_create_kill import SPACE, Gallery
print("ready", flush=True)
sys.stdin.readline()  # strace attaches here, after the imports (tracing Python's start-up costs seconds)
Gallery.create(Path({folder!r}), SPACE, modality="image").close()
"""


def _paths_of_a_create(folder: Path) -> list[Path]:
    """Every path a create touches (SQLite's side files included)."""
    names = [store.DB_NAME + suffix for suffix in ("", "-journal", "-wal", "-shm")]
    staging = folder / getattr(store, "STAGING_NAME", ".creating")
    return [folder, staging, *(staging / n for n in names),
            *(folder / n for n in names)]


def _traced(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("TracerPid:")[1].split()[0]) != 0


def _run_killed_at_call(strace: str, folder: Path, k: int) -> int:
    """Run a create in a child that strace SIGKILLs at its k-th system call on a path of
    the gallery; the child's exit status."""
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", _CHILD.format(tests=str(Path(__file__).parent), folder=str(folder))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert child.stdout is not None and child.stdin is not None
    assert child.stdout.readline().strip() == "ready"
    watched = [arg for p in _paths_of_a_create(folder) for arg in ("-P", str(p))]
    tracer = subprocess.Popen([strace, "-qq", "-f", "-o", os.devnull, *watched, "-e",
                               "trace=openat,unlink,unlinkat,rename,renameat,renameat2,mkdir,mkdirat,rmdir,fsync,"
                               "fdatasync,write,pwrite64,ftruncate,flock",
                               "-e", f"inject=all:signal=KILL:when={k}", "-p", str(child.pid)])
    deadline = time.monotonic() + 30
    while not _traced(child.pid):
        assert time.monotonic() < deadline and tracer.poll() is None, "strace did not attach"
        time.sleep(0.01)
    child.stdin.write("go\n")
    child.stdin.flush()
    code = child.wait(timeout=120)
    tracer.wait(timeout=30)
    return code


@pytest.mark.slow
def test_a_create_killed_at_every_file_system_call_sqlite_makes(tmp_path):
    """The kill the flaky build test hit, made deterministic: strace SIGKILLs the child at its k-th system
    call on a path of the gallery (SQLite's own opens, writes, fsyncs and unlinks included: the rollback
    journal it writes while switching a new database to WAL is among them), for every k until a run
    completes; each kill is followed by the rerun, which must resume."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: ./run.sh setup installs it (Debian package strace)")
    leftovers, k = set(), 1
    while True:
        folder = tmp_path / f"g{k}"
        code = _run_killed_at_call(strace, folder, k)
        if code == 0:
            break
        assert code == -signal.SIGKILL, f"the child failed (exit {code}) instead of being killed at call {k}"
        if folder.exists():
            leftovers |= {p.name for p in folder.rglob("*")}
        _create_and_fill(folder)  # the rerun
        _check(folder)
        k += 1
    _create_and_fill(folder)  # the uninterrupted create, then the build's first add
    _check(folder)
    assert k > 10, f"only {k - 1} kill points: strace no longer sees the creation's system calls"
    assert store.DB_NAME + "-journal" in leftovers, "no kill left SQLite's rollback journal: the flake's state is untested"
    print({"kill_points": k - 1, "resumed": k - 1, "leftovers_seen": sorted(leftovers), "lost": 0})
