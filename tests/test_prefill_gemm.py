"""benchmarks/prefill_gemm.py without a GPU: on sm_90a its "ws" variant (a tuning choice the
plan accepts) runs the persistent prefill kernel, its other variant the default wgmma tile.
The device run itself (both variants NaN-free, bitwise repeats, tile counters back at 0,
timing) is the script on an H100/H200."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moegen.backends import cuda_tiles
from moegen.plan import make_plan
from moegen.render import render

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("prefill_gemm", ROOT / "benchmarks" / "prefill_gemm.py")
prefill_gemm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prefill_gemm)


@pytest.mark.parametrize("shape", sorted(prefill_gemm.SHAPES))
def test_harness_variants_are_the_new_and_the_old_prefill_kernels(shape):
    spec = prefill_gemm.SHAPES[shape].replace(backend="cuda", arch="sm_90a")
    new = make_plan(spec, "sm_90a", prefill_gemm.WS_TILE).detail.buckets[-1]
    old = make_plan(spec, "sm_90a", prefill_gemm.WGMMA_TILE).detail.buckets[-1]
    assert make_plan(spec, "sm_90a", {}).detail.buckets[-1] == new        # the default
    assert new.ffn1.kind == new.ffn2.kind == "wgmma_ws"
    assert old.ffn1.kind == old.ffn2.kind == "wgmma"
    assert prefill_gemm.WS_TILE["tile_bm128"] in cuda_tiles.tile_choices(spec, "sm_90a")["tile_bm128"]


def test_async_tile_store_changes_only_the_tile_ring_store():
    import dataclasses
    spec = prefill_gemm.SHAPES["small"].replace(backend="cuda", arch="sm_90a")
    plan = make_plan(spec, "sm_90a", prefill_gemm.WS_TILE)
    alt = dataclasses.replace(plan, detail=dataclasses.replace(
        plan.detail, ws=dataclasses.replace(plan.detail.ws, async_tile_store=True)))
    plain, asy = render(plan).text, render(alt).text
    assert "st_async_tx(slot0" not in plain and "st_async_tx(slot0" in asy
    assert "mbar_arrive_tx(tfull0" in asy and "mbar_arrive(tfull0" in plain
