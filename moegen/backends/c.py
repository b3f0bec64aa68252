"""The ``c`` backend: generated C compiled by the system C compiler, loaded with ctypes.

    render_context(spec) -> templates/c/moe.c.jinja -> compile (cc -O3 ... -shared) -> .so bytes
    load(artifact) -> CModule (moegen.backends.c_module)

The binary is built for an explicit ISA tier (`moegen.backends.isa`), never ``-march=native``,
and without ``-ffast-math`` (which would delete the NaN checks of the routing).  Threads come
from OpenMP; the thread count is a call argument (``MOEGEN_NUM_THREADS``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .. import __version__, settings
from ..errors import CompileError, SpecError
from ..layout import PackedLayout
from ..spec import MoESpec
from . import isa
from .base import Artifact, Sources
from .c_module import ROUTE_CHUNK

log = logging.getLogger("moegen.backends.c")

_ROUTING_CODE = {"softmax_topk": 0, "topk_softmax": 1, "sigmoid_topk": 2}
# Multiply-adds below which a stage stays on the calling thread (see PAR_MIN_WORK).
_PAR_MIN_WORK = 1 << 18
# Tokens per route work item; the workspace sizes its stats partial sums with the same number.
_ROUTE_CHUNK = ROUTE_CHUNK
# k per GEMM chunk (a multiple of 32, the pair-dot step): 3 x 512 activations + 4 x 512
# weights = 14 KB of fp32, well inside a 32 KB L1.
_KC = 512
# What `moegen tune` may change, each a tuple of allowed values (the first is the default).
# KC trades L1 reuse against loop overhead; PAR_MIN_WORK moves the one-thread/many-thread
# crossover, which depends on the machine's thread start-up cost.
TUNABLES = {"kc": (_KC, 256, 1024), "par_min_work": (_PAR_MIN_WORK, 1 << 16, 1 << 20)}
# Seconds a compile may take before we give up on the compiler.
_COMPILE_TIMEOUT = 600


def layout_for(spec: MoESpec) -> PackedLayout:
    """The packed layout the C GEMMs read: W13 as [G, H] and W2 as [H, F] ("nk"), so a register
    tile streams whole weight rows front to back; gate rows then up rows (no interleave).  The
    router is [H, E]: its per-token GEMM accumulates whole rows of E logits per k instead."""
    return PackedLayout(spec, w13_order="nk", w2_order="nk", gate_up_interleave=0,
                        router_order="he", align_bytes=64)


@functools.lru_cache(maxsize=8)
def _toolchain(cc: str) -> tuple[str, str]:
    path = shutil.which(cc)
    if path is None:
        raise FileNotFoundError(f"C compiler {cc!r} not found on PATH (set MOEGEN_CC)")
    path = os.path.realpath(path)
    proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return path, first[0] if first else ""


class CBackend:
    """Backend protocol (`moegen.backends.base.Backend`) for CPUs."""

    name = "c"
    templates = ("c/moe.c.jinja",)

    # -- capability --------------------------------------------------------------------------
    def can_compile(self) -> bool:
        try:
            _toolchain(settings.cc())
            return True
        except (OSError, subprocess.SubprocessError) as exc:
            log.info("c backend cannot compile: %s", exc)
            return False

    def available(self) -> bool:
        if not self.can_compile():
            return False
        try:
            return isa.runnable(isa.resolve())
        except SpecError:
            return False

    # -- what gets built ---------------------------------------------------------------------
    def tunables(self, spec: MoESpec) -> dict[str, tuple]:
        """The template constants `moegen tune` may choose, with their allowed values."""
        return dict(TUNABLES)

    def render_context(self, spec: MoESpec, tuning: dict | None = None) -> dict:
        """Template variables: ints, floats and strings from moegen's lookup tables only.

        Capacity code (``moe_group_capacity``, ``moe_combine_kept``) is rendered only when
        ``spec.capacity_factor`` is set; the capacity itself is a call argument (it depends on T).
        ``tuning`` overrides TUNABLES constants; a value outside the allowed ones is a ValueError.
        """
        tuned = {name: values[0] for name, values in TUNABLES.items()}
        for name, value in (tuning or {}).items():
            if name not in TUNABLES or value not in TUNABLES[name]:
                raise ValueError(f"c backend tuning {name}={value!r} is not allowed; choices: "
                                 f"{ {n: list(v) for n, v in TUNABLES.items()} }")
            tuned[name] = value
        layout = layout_for(spec)
        off = layout.offsets
        dt = spec.dt
        return {
            "spec_name": spec.name, "version": __version__,
            "E": spec.num_experts, "K": spec.top_k, "S": spec.num_shared_experts,
            "H": spec.hidden_dim, "F": spec.ffn_dim, "G": layout.gate_rows,
            "gated": int(spec.gated), "activation": spec.act.name, "act_fn": spec.act.fn,
            "bias": int(spec.bias),
            "routing": spec.routing, "routing_code": _ROUTING_CODE[spec.routing],
            "renormalize": int(spec.renormalize), "scaling": float(spec.routed_scaling_factor),
            "n_group": spec.n_group, "topk_group": spec.topk_group,
            "topk_max": max(spec.top_k, spec.topk_group),
            "off_w13": off["w13"], "off_b13": off.get("b13", 0), "off_w2": off["w2"],
            "off_b2": off.get("b2", 0), "stride": off["stride"],
            # The source is the same for every ISA tier: it picks its tile shape with the
            # compiler's own macros, so only -march (in the options and key) differs.
            "tiers": [{"name": t.name, "guard": t.guard, "vec_floats": t.vec_floats,
                       "mr": t.mr, "ncol": t.ncol} for t in map(isa.TIERS.get, isa.GUARD_ORDER)],
            "max_mr": max(t.mr for t in isa.TIERS.values()),
            "widths": sorted({t.vec_floats for t in isa.TIERS.values()}),
            "kc": tuned["kc"],
            "route_chunk": _ROUTE_CHUNK, "par_min_work": tuned["par_min_work"],
            "capacity": int(spec.capacity_factor is not None),
            "capacity_drop": spec.capacity_drop,
            "drop_by_weight": int(spec.capacity_drop == "weight"),
            "dt_short": dt.short, "c_type": dt.c_type, "c_load": dt.c_load, "c_store": dt.c_store,
        }

    def target(self, spec: MoESpec) -> str:
        """The ISA tier to build for (``MOEGEN_ISA`` or detected)."""
        return isa.resolve().name

    def toolchain(self) -> dict:
        """{"cc": resolved compiler path, "version": first line of ``cc --version``}."""
        path, version = _toolchain(settings.cc())
        return {"cc": path, "version": version}

    def options(self, spec: MoESpec, target: str) -> list[str]:
        """The full flag list.  -ffp-contract=fast only fuses a*b+c into one FMA (ISO C mode
        turns that off); it reorders nothing and keeps NaN semantics, unlike -ffast-math."""
        try:
            tier = isa.TIERS[target]
        except KeyError:
            raise SpecError(f"c backend target must be one of {sorted(isa.TIERS)}, got {target!r}") from None
        return ["-O3", "-fPIC", "-shared", "-std=c11", "-fopenmp", *tier.flags,
                "-ffp-contract=fast", "-fno-math-errno", "-fvisibility=hidden",
                "-Wall", "-Wno-unused-function"]

    # -- compile and load --------------------------------------------------------------------
    def compile(self, sources: Sources, spec: MoESpec, target: str, key: str) -> Artifact:
        """Compile the rendered source to a shared object in a private temp dir.

        Returns an Artifact with the .so bytes.  Raises CompileError (argv, log and source)
        when the compiler fails or is missing.
        """
        cc_path, version = _toolchain(settings.cc())
        opts = self.options(spec, target)
        with tempfile.TemporaryDirectory(prefix="moegen-cc-") as tmp:
            src = Path(tmp) / sources.entry
            src.write_text(sources.text, encoding="utf-8")
            out = Path(tmp) / "moe.so"
            argv = [cc_path, *opts, "-o", str(out), str(src), "-lm"]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp,
                                      timeout=_COMPILE_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise CompileError("c", spec.name, key, argv, str(exc), sources.text) from None
            logtext = (proc.stdout or "") + (proc.stderr or "")
            if proc.returncode != 0 or not out.exists():
                raise CompileError("c", spec.name, key, argv, logtext, sources.text)
            binary = out.read_bytes()
        meta = {"backend": "c", "target": target, "options": opts,
                "toolchain": {"cc": cc_path, "version": version},
                "build_seconds": round(time.perf_counter() - t0, 4)}
        if logtext.strip():
            log.debug("cc output for %s:\n%s", spec.name, logtext)
        return Artifact(binary, meta)

    def load(self, artifact: Artifact, spec: MoESpec):
        """Write the bytes under a content-addressed name (dlopen hands back an already-loaded
        library for a path it has seen) in a private directory, and load them with ctypes.

        Returns a `moegen.backends.c_module.CModule`.  Raises RuntimeError when the binary's
        ISA tier (``artifact.meta["target"]``) is one this CPU cannot run, OSError when the bytes
        do not load.
        """
        from .c_module import CModule
        target = artifact.meta.get("target")
        if target in isa.TIERS and not isa.runnable(isa.TIERS[target]):
            # Calling into it would die of SIGILL; refuse while it is still an exception.
            raise RuntimeError(f"{spec.name}: binary built for ISA tier {target!r}, which this CPU "
                               f"cannot run (it runs {isa.detect()!r}); unset MOEGEN_ISA or set it "
                               f"to a tier this CPU has")
        path = write_library(artifact.binary)
        return CModule(spec, path, layout_for(spec))


@functools.lru_cache(maxsize=1)
def _library_dir() -> Path:
    """A private (0700) directory for this process's loaded libraries, removed at exit."""
    import atexit
    d = Path(tempfile.mkdtemp(prefix="moegen-so-"))
    atexit.register(shutil.rmtree, d, True)
    return d


def library_name(binary: bytes) -> str:
    """``moegen_<sha256[:20]>.so``: the file name a binary is loaded from."""
    return f"moegen_{hashlib.sha256(binary).hexdigest()[:20]}.so"


def write_library(binary: bytes) -> Path:
    """The path of ``binary`` in the private library dir, written (0700) if not there yet."""
    path = _library_dir() / library_name(binary)
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "wb") as fh:
            fh.write(binary)
        os.replace(tmp, path)
    return path
