"""JSON schema and table formatting of moegen.bench.report (pure, no device)."""

import json

import pytest

from moegen.bench import report
from moegen.bench.plot import series


def _profile(total=2.0):
    return {"spec": "moe_e8_k2_h16_f32_fp32_swiglu", "backend": "c", "target": "x86-64-v3",
            "dtype": "float32", "tokens": 4, "stages": ["route", "group", "ffn1", "ffn2", "combine"],
            "stage_ms": {"route": 0.1, "group": 0.05, "ffn1": 1.0, "ffn2": 0.5, "combine": 0.1},
            "stage_sum_ms": 1.75, "total_ms": total, "total_min_ms": 1.5, "total_p90_ms": 2.5,
            "repeats": 10, "throughput_ms": 1.9, "graph_ms": None, "tokens_per_s": 2000.0,
            "experts_touched": 5, "bytes": 1e6, "flops": 1e6, "gbps": 0.5, "tflops": 0.0005,
            "floor_ms": 0.5, "floor_bound": "memory", "frac_of_floor": 0.25,
            "ceilings": {"bandwidth": 2e9, "peak": 1e11, "measured": True},
            "memory": {"workspace_bytes": 2 ** 20, "allocs_per_call": 0.0}}


def _point(**over):
    p = {"shape": "seed-small", "spec": "moe_e8_k2_h16_f32_fp32_swiglu", "E": 8, "k": 2, "H": 16,
         "F": 32, "dtype": "float32", "backend": "c", "tokens": 4, "floor_ms": 0.5,
         "floor_bound": "memory", "moegen": _profile(), "moegen_err": 1e-7,
         "baselines": {"naive": {"ms": 8.0, "min_ms": 7.0, "repeats": 3, "err": 2e-7, "note": ""}},
         "skipped": None}
    p.update(over)
    return p


def _report(points):
    return report.make_report("moegen bench --test", {"device": "cpu"}, {"cpu": {"bandwidth": 1.0}},
                              points, ["a note"])


def test_valid_report_has_no_problems_and_round_trips():
    rep = _report([_point(), _point(tokens=0, moegen=None, skipped="time limit reached")])
    assert report.validate(rep) == []
    back = json.loads(report.dumps(rep))
    assert back["schema"] == report.SCHEMA
    assert back["points"][0]["baselines"]["naive"]["ms"] == 8.0
    assert report.validate(back) == []


@pytest.mark.parametrize("breaker,expect", [
    (lambda r: r.pop("machine"), "missing top-level key 'machine'"),
    (lambda r: r.update(schema="other/9"), "schema must be"),
    (lambda r: r["points"][0].pop("floor_ms"), "points[0] missing 'floor_ms'"),
    (lambda r: r["points"][0]["moegen"].pop("stage_ms"), "points[0].moegen missing 'stage_ms'"),
    (lambda r: r["points"][0].update(moegen=None), "no moegen result and no 'skipped'"),
    (lambda r: r["points"][0].update(tokens=-1), "tokens must be an int"),
    (lambda r: r["points"][0]["baselines"]["naive"].pop("err"), "baselines.naive missing 'err'"),
    (lambda r: r["points"][0]["moegen"].update(total_ms=0), "total_ms must be a positive"),
])
def test_validate_names_each_problem(breaker, expect):
    rep = _report([_point()])
    breaker(rep)
    problems = report.validate(rep)
    assert any(expect in p for p in problems), problems


def test_dumps_keeps_non_finite_errors_visible():
    rep = _report([_point(moegen_err=float("inf"))])
    text = report.dumps(rep)
    assert json.loads(text)["points"][0]["moegen_err"] == "inf"
    assert "NaN" not in text and "Infinity" not in text


def test_table_rows_line_up_with_the_header():
    text = report.matrix_table([_point()], ["naive", "grouped_mm"])
    head, rule, line = text.splitlines()
    assert len(head) == len(rule) == len(line) and set(rule) <= {"-", " "}
    cells = line.split()
    assert cells[:2] == ["seed-small", "4"]
    assert "4.00" in cells          # naive 8 ms / moegen 2 ms
    assert cells[-2:] == ["-", "-"]  # grouped_mm not measured
    assert head.split()[-2:] == ["ms", "x"] and "grouped_mm" in head


def test_matrix_table_takes_its_columns_from_the_points():
    p = _point()
    p["baselines"]["vllm"] = {"ms": 4.0, "min_ms": 4.0, "repeats": 3, "err": 0.0, "note": ""}
    head = report.matrix_table([p]).splitlines()[0]
    assert head.index("naive ms") < head.index("vllm ms")


def test_row_of_a_skipped_point_says_why():
    text = report.matrix_table([_point(moegen=None, skipped="weights need 99 GB")], [])
    head, _, line = text.splitlines()
    assert head.split()[-1] == "skipped" and line.endswith("weights need 99 GB")
    assert line.split()[3] == "-"
    assert "skipped (weights need 99 GB)" in report.point_line(
        _point(moegen=None, skipped="weights need 99 GB"))


@pytest.mark.parametrize("v,want", [(None, "-"), (float("nan"), "-"), (0.01234, "0.0123"),
                                    (1.23456, "1.235"), (1234.5, "1234.5")])
def test_fmt_ms(v, want):
    assert report.fmt_ms(v) == want


def test_stage_table_lists_every_stage_and_memory():
    text = report.stage_table([_point(), _point(moegen=None, skipped="x")])
    lines = text.splitlines()
    assert len(lines) == 3                       # header, rule, one measured point
    for s in ("route", "group", "ffn1", "ffn2", "combine", "alloc/call"):
        assert s in lines[0]
    assert "1.0" in lines[2].split()             # workspace 1 MiB
    assert report.stage_table([]) == ""


def test_startup_table():
    rows = [{"backend": "c", "spec": "moe_x", "import_ms": 120.0, "warm_callable_ms": 3.5,
             "cold_compile_s": 1.25, "note": ""},
            {"backend": "cuda", "spec": "moe_y", "import_ms": 130.0, "warm_callable_ms": None,
             "cold_compile_s": 4.0, "note": "cannot run here"}]
    text = report.startup_table(rows)
    assert "1.25" in text and "3.5" in text and "cannot run here" in text


def test_plot_series_skips_missing_and_zero_tokens():
    pts = [_point(), _point(tokens=0), _point(tokens=8, moegen=None, skipped="x")]
    s = series(pts)
    assert set(s["seed-small"]) == {"floor", "moegen", "naive"}
    assert s["seed-small"]["moegen"] == [(4, 2.0)]
    assert (8, 0.5) in s["seed-small"]["floor"]


def test_machine_info_cpu():
    info = report.machine_info("cpu")
    for key in ("platform", "python", "cpu", "cpus", "moegen", "numpy", "threads"):
        assert key in info


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from moegen.bench.plot import plot
    path = plot([_point(), _point(tokens=64), _point(shape="other", tokens=8)], str(tmp_path / "p.png"))
    data = (tmp_path / "p.png").read_bytes()
    assert path.endswith("p.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no measured points"):
        plot([_point(tokens=0)], str(tmp_path / "q.png"))


def test_targets_summary_counts_and_lists_misses():
    vllm = {"ms": 1.2, "min_ms": 1.1, "repeats": 3, "err": 0.0, "note": "", "graph_ms": 0.9}
    fast = _point(shape="mixtral-8x7b", tokens=8, backend="cuda",
                  moegen=dict(_profile(total=1.0), frac_of_floor=0.97, graph_ms=0.8,
                              memory={"allocs_per_call": 0}),
                  baselines={"grouped_mm": {"ms": 1.5, "min_ms": 1.4, "repeats": 3, "err": 0.0, "note": ""},
                             "vllm": vllm})
    slow = _point(shape="mixtral-8x7b", tokens=16384, backend="cuda",
                  moegen=dict(_profile(total=20.0), frac_of_floor=0.8, graph_ms=19.5,
                              memory={"allocs_per_call": 2}),
                  baselines={"grouped_mm": {"ms": 19.0, "min_ms": 18.0, "repeats": 3, "err": 0.0, "note": ""},
                             "vllm": dict(vllm, ms=21.0, graph_ms=19.0)})
    tiny = _point(shape="seed-small", tokens=1, backend="cuda",
                  moegen=dict(_profile(total=0.035), graph_ms=None),
                  baselines={})
    qwen = _point(shape="qwen3-30b-a3b", tokens=4096, backend="cuda",
                  moegen=dict(_profile(total=1.0), frac_of_floor=0.76), baselines={})
    text = report.targets_summary([fast, slow, tiny, qwen, _point(moegen=None, skipped="x")])
    lines = dict(line.split(": ", 1) for line in text.splitlines())
    assert lines["target 1 eager faster than grouped_mm"].startswith("1/2 met; misses: mixtral-8x7b T=16384")
    assert lines["target 1 eager faster than vllm"] == "2/2 met"           # a contender column
    assert lines["target 1 graph faster than vllm"].startswith("1/2 met; misses: mixtral-8x7b T=16384")
    assert lines["target 2 weight-bound >= 0.92 of floor"] == "1/1 met"
    assert lines["target 2 compute-bound >= 0.85 of floor"].startswith("0/1 met")
    assert lines["target 2 qwen3 prefill >= 0.75 of floor"] == "1/1 met"
    assert lines["target 3 seed-small T=1 eager <= 40 us"] == "1/1 met"
    assert lines["target 3 seed-small T=1 graph <= 15 us"].startswith("0/1 met")
    assert lines["target 4 no allocation per call"] == "3/4 met; misses: mixtral-8x7b T=16384 (2)"


def test_cpu_targets_summary():
    pts = [_point(tokens=16), _point(tokens=1024), _point(shape="qwen3-30b-a3b", tokens=128,
           baselines={"naive": {"ms": 5.0, "min_ms": 5.0, "repeats": 2, "err": 0.0, "note": ""}}),
           _point(shape="other", tokens=16)]
    lines = dict(line.split(": ", 1) for line in report.targets_summary(pts).splitlines())
    # naive 8 ms vs moegen 2 ms = 4x; qwen3 5 ms vs 2 ms = 2.5x
    assert lines == {"target cpu-1 >= 2x the torch loop at T <= 128": "2/2 met",
                     "target cpu-1 not slower than the torch loop at T = 1024": "1/1 met"}
