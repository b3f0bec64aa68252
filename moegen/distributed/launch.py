"""Run a function on N spawned processes, each a rank of a fresh ``torch.distributed`` group.

    results = launch(fn, ranks=4, args=(spec,), backend="gloo")   # [fn(0, spec), fn(1, spec), ...]

``backend`` "gloo" (CPU) or "nccl" (one GPU per rank: rank r uses cuda:r).  NVLink multicast is
kept off (``NCCL_NVLS_ENABLE=0``) unless the caller's environment sets it.  Processes are
spawned, never forked (a forked child of a process that ran an OpenMP kernel can hang).  Each
rank's return value must pickle; the first rank that raises makes `launch` raise
``RuntimeError`` with its traceback.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

BACKENDS = ("gloo", "nccl")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, ranks: int, port: int, backend: str, outdir: str, fn, args) -> None:
    import torch
    import torch.distributed as dist  # optional heavy dependency: only spawned ranks need it
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    if backend == "nccl":
        import cupy  # the cuda backend's launcher: its kernels load on CuPy's current device
        torch.cuda.set_device(rank)
        cupy.cuda.Device(rank).use()
    dist.init_process_group(backend, rank=rank, world_size=ranks)
    try:
        result = fn(rank, *args)
    finally:
        dist.destroy_process_group()
    Path(outdir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def launch(fn, ranks: int, args: tuple = (), backend: str = "gloo") -> list:
    """``[fn(rank, *args) for every rank]``, each run in its own spawned process of one group."""
    import torch.multiprocessing as mp  # optional heavy dependency (see the module docstring)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not isinstance(ranks, int) or isinstance(ranks, bool) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with tempfile.TemporaryDirectory(prefix="moegen-ep-") as outdir:
        try:
            mp.spawn(_child, args=(ranks, _free_port(), backend, outdir, fn, args), nprocs=ranks)
        except mp.ProcessRaisedException as exc:
            raise RuntimeError(f"a rank failed:\n{exc}") from None
        return [pickle.loads(Path(outdir, f"rank{r}.pkl").read_bytes()) for r in range(ranks)]
