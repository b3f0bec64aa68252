"""N processes, one cold key: exactly one build, nobody sees a partial entry; a builder killed
midway leaves nothing loadable and no stuck lock."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from moegen.backends.base import Artifact
from moegen.cache import KernelCache, digest

NAME = "moe_e8_k2_h512_f2048_f32_swiglu"
KEY = digest({"concurrency": 1})
# Large enough that diskcache writes it to a value file (the partial-write case).
BINARY = hashlib.sha256(b"kernel").digest() * 40_000


def _worker(cache_dir: str, log_path: str, out_path: str, barrier) -> None:
    def build():
        with open(log_path, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)            # widen the window in which the others ask for the same key
        return Artifact(BINARY, {"backend": "c", "builder": os.getpid()})

    cache = KernelCache(Path(cache_dir), prebuilt=[])
    barrier.wait(timeout=120)
    art, built = cache.get_or_build(NAME, KEY, build)
    ok = art.binary == BINARY and art.meta["key"] == KEY
    Path(out_path).write_text(f"{int(built)} {int(ok)}")


@pytest.mark.parametrize("n", [2, 8])
def test_cold_key_is_built_once(tmp_path, n):
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n)
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_worker, args=(str(tmp_path / "cache"), str(log),
                                               str(tmp_path / f"out{i}"), barrier))
             for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * n
    assert len(log.read_text().splitlines()) == 1
    outs = [(tmp_path / f"out{i}").read_text().split() for i in range(n)]
    assert all(ok == "1" for _, ok in outs)                 # everyone got the full binary
    assert sum(built == "1" for built, _ in outs) == 1      # one of them built it


def _killed_builder(cache_dir: str, started: str) -> None:
    def build():
        Path(started).write_text(str(os.getpid()))
        time.sleep(600)
        return Artifact(BINARY, {})

    KernelCache(Path(cache_dir), prebuilt=[]).get_or_build(NAME, KEY, build)


def _kill_once_started(target, tmp_path, what: str):
    """Run ``target(cache_dir, started_file)`` in a spawned process, SIGKILL it as soon as it
    has written the started file, and return the joined process."""
    ctx = mp.get_context("spawn")
    started = tmp_path / "started"
    p = ctx.Process(target=target, args=(str(tmp_path / "cache"), str(started)))
    p.start()
    deadline = time.monotonic() + 120
    while not started.exists():
        assert p.is_alive() and time.monotonic() < deadline, f"{what} never started"
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=60)
    return p


def test_builder_killed_midway_leaves_no_entry_and_no_stuck_lock(tmp_path):
    p = _kill_once_started(_killed_builder, tmp_path, "builder")
    assert p.exitcode == -signal.SIGKILL

    cache = KernelCache(tmp_path / "cache", prebuilt=[])
    assert cache.get(NAME, KEY) is None
    assert cache.entries() == [] and cache.verify() == []
    art, built = cache.get_or_build(NAME, KEY, lambda: Artifact(b"fresh", {}))
    assert built and cache.get(NAME, KEY).binary == b"fresh"


def _killed_writer(cache_dir: str, started: str) -> None:
    """Dies inside diskcache's value-file write, after part of the frame reached the disk."""
    import diskcache.core

    real_write = diskcache.core.Disk._write

    def write(self, full_path, iterator, mode, encoding=None):
        def dying():
            for i, chunk in enumerate(iterator):
                yield chunk[: len(chunk) // 2]
                Path(started).write_text("x")
                time.sleep(600)
        return real_write(self, full_path, dying(), mode, encoding)

    diskcache.core.Disk._write = write
    KernelCache(Path(cache_dir), prebuilt=[]).put(NAME, KEY, Artifact(BINARY, {}))


def test_writer_killed_midway_leaves_no_entry(tmp_path):
    _kill_once_started(_killed_writer, tmp_path, "writer")
    cache = KernelCache(tmp_path / "cache", prebuilt=[])
    assert cache.get(NAME, KEY) is None and cache.entries() == []
