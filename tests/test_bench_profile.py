"""profile_kernel and the matrix runner on the C backend (tiny specs; no timing assertions)."""

import numpy as np
import pytest

import moegen
from moegen import MoESpec
from moegen.bench import matrix, report
from moegen.profiling import ceilings
from moegen.profiling.problems import make_inputs, make_weights
from moegen.profiling.profile import profile_kernel, workspace_bytes
from moegen.jit import clear_memo

SPEC = MoESpec(8, 2, 40, 24, dtype="float32", backend="c")
# Given ceilings keep the tests from spending time measuring this machine.
CEIL = ceilings.fixed("cpu", 1e10, 1e11)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEGEN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    clear_memo()
    yield moegen.compile(SPEC)
    mp.undo()
    clear_memo()


@pytest.mark.parametrize("T", [0, 1, 7, 33])
def test_profile_reports_every_stage(kernel, T):
    w = make_weights(kernel)
    xs = make_inputs(kernel, T, count=2)
    p = profile_kernel(kernel, xs, w.packed, repeats=3, warmup=1, ceilings=CEIL)
    for key in report.PROFILE_KEYS:
        assert key in p, key
    assert p["stages"] == list(kernel.stages)
    assert set(p["stage_ms"]) == set(kernel.stages)
    assert all(v >= 0 for v in p["stage_ms"].values())
    assert p["total_ms"] > 0 and p["repeats"] == 3 and p["rotate"] == 2
    assert p["tokens"] == T
    assert p["floor_ms"] > 0 and p["frac_of_floor"] > 0
    assert 0 <= p["experts_touched"] <= min(8, 2 * T)
    assert p["ceilings"]["measured"] is False
    assert p["memory"]["workspace_bytes"] > 0
    assert p["memory"]["method"] == "tracemalloc"
    assert p["graph_ms"] is None              # CPU: no CUDA graph


def test_profile_through_the_kernel_method_rotates_copies(kernel):
    w = make_weights(kernel)
    x = make_inputs(kernel, 5)[0]
    p = kernel.profile(x, w.packed, repeats=2, warmup=1, rotate=3, ceilings=CEIL, memory=False)
    assert p["rotate"] == 3 and p["memory"] == {}
    assert p["experts_touched"] >= 2


def test_profile_rejects_bad_input_before_running(kernel):
    w = make_weights(kernel)
    with pytest.raises(ValueError, match="hidden_dim"):
        profile_kernel(kernel, np.ones((3, 41), np.float32), w.packed, repeats=1, ceilings=CEIL)
    with pytest.raises(TypeError, match="dtype"):
        profile_kernel(kernel, np.ones((3, 40), np.float64), w.packed, repeats=1, ceilings=CEIL)


def test_workspace_bytes_counts_each_buffer_once():
    class WS:
        pass
    base = np.zeros(100, np.float32)
    ws = WS()
    ws.a, ws.b, ws.c = base[:10], base[10:], np.zeros(3, np.int32)
    assert workspace_bytes(ws) == 400 + 12


def test_matrix_on_cpu_checks_errors_and_baselines(kernel, tmp_path):
    pytest.importorskip("torch")
    cfg = matrix.Config(shapes=[("tiny", SPEC)], tokens=[0, 1, 9], budget_s=0.05, repeats=2,
                        warmup=1, rotate=2, ceilings=CEIL, baselines=("naive", "grouped_mm", "numpy"))
    seen = []
    points, ceils = matrix.run(cfg, on_point=seen.append)
    assert [p["tokens"] for p in points] == [0, 1, 9] and seen == points
    for p in points:
        assert p["skipped"] is None, p["skipped"]
        assert p["moegen"]["total_ms"] > 0
        if p["tokens"]:
            assert p["moegen_err"] <= 1e-5
            assert set(p["baselines"]) == {"naive", "grouped_mm", "numpy"}
            for name, b in p["baselines"].items():
                assert b["err"] <= 1e-5, name
                assert b["ms"] > 0 and b["repeats"] == 2
    rep = report.make_report("test", report.machine_info("cpu"), ceils, points, cfg.notes)
    assert report.validate(rep) == []


def test_matrix_skips_a_shape_that_fails_to_compile(monkeypatch):
    def boom(spec):
        raise RuntimeError("no compiler today")
    monkeypatch.setattr(moegen.jit, "compile", boom)
    cfg = matrix.Config(shapes=[("tiny", SPEC)], tokens=[1, 2], ceilings=CEIL, baselines=())
    points, _ = matrix.run(cfg)
    assert [p["skipped"] for p in points] == ["compile failed: RuntimeError: no compiler today"] * 2
    assert all(p["floor_ms"] > 0 for p in points)


def test_time_limit_skips_the_rest(kernel):
    cfg = matrix.Config(shapes=[("tiny", SPEC)], tokens=[1, 2], ceilings=CEIL, baselines=(),
                        time_limit_s=0.0)
    points, _ = matrix.run(cfg)
    assert [p["skipped"] for p in points] == ["time limit reached"] * 2


def test_shape_and_grid_specs():
    specs = matrix.shape_specs(["seed-small", "deepseek-v3"], backend="c")
    assert [s.num_experts for _, s in specs] == [8, 256]
    assert all(s.dtype == "bfloat16" for _, s in specs)
    with pytest.raises(ValueError, match="shape must be one of"):
        matrix.shape_specs(["gpt-5"])
    grid = matrix.grid_specs([8, 16], [2], [64], [None], ["float32"], backend="c")
    assert [lbl for lbl, _ in grid] == ["e8k2h64f256-fp32", "e16k2h64f256-fp32"]


def test_callgrind_counts_instructions_of_moegen_and_numpy(kernel):
    from moegen.bench import instructions
    why = instructions.available()
    if why:
        pytest.skip(why)
    rows = instructions.measure(SPEC, [1, 6], ("moegen", "numpy"))
    assert [(r["tokens"], r["contender"]) for r in rows] == [(1, "moegen"), (1, "numpy"),
                                                            (6, "moegen"), (6, "numpy")]
    by = {(r["tokens"], r["contender"]): r["instructions"] for r in rows}
    assert all(v and v > 1000 for v in by.values())
    assert by[(6, "moegen")] > by[(1, "moegen")]          # more tokens, more work
    text = instructions.table(rows)
    assert "numpy/moegen" in text.splitlines()[0]


def test_parse_dumps_reads_labelled_totals(tmp_path):
    from moegen.bench.instructions import parse_dumps
    (tmp_path / "callgrind.out.1.1").write_text(
        "desc: Trigger: Client Request: moegen@4\nevents: Ir\nsummary: 0\nfn=(1) f\n3 10\ntotals: 12345\n")
    (tmp_path / "callgrind.out.1").write_text("desc: Trigger: Program termination\ntotals: 0\n")
    assert parse_dumps(tmp_path) == {"moegen@4": 12345}
