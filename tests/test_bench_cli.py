"""``moegen bench`` through click's CliRunner on tiny CPU specs."""

import json

import pytest
from click.testing import CliRunner

from moegen.bench import report
from moegen.cli.bench import bench
from moegen.jit import clear_memo

TINY = ["--backend", "c", "--experts", "4", "--topk", "2", "--hidden", "32", "--ffn", "24",
        "--budget", "0.05", "--repeats", "2", "--warmup", "1", "--rotate", "2",
        "--bandwidth", "1e10", "--peak", "1e11", "--no-progress"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    clear_memo()

    def invoke(*args):
        return CliRunner().invoke(bench, list(args), catch_exceptions=False)
    yield invoke
    clear_memo()


def test_grid_prints_table_and_writes_valid_json(run, tmp_path):
    out = tmp_path / "r.json"
    res = run(*TINY, "--tokens", "0,1,5", "--no-baselines", "--json", str(out))
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("shape "))
    rows = lines[head + 2:head + 5]
    assert [r.split()[:2] for r in rows] == [["e4k2h32f24-fp32", str(t)] for t in (0, 1, 5)]
    assert "ffn1" in res.output and "ceilings (cpu, given)" in res.output
    rep = json.loads(out.read_text())
    assert report.validate(rep) == []
    assert [p["tokens"] for p in rep["points"]] == [0, 1, 5]
    assert rep["points"][2]["moegen_err"] <= 1e-5
    assert rep["ceilings"]["cpu"]["bandwidth"] == 1e10


def test_baseline_columns_on_cpu(run):
    pytest.importorskip("torch")
    res = run(*TINY, "--tokens", "3", "--baselines", "naive,numpy", "--threads", "1")
    assert res.exit_code == 0, res.output
    assert "naive ms" in res.output and "numpy ms" in res.output
    assert "grouped_mm ms" not in res.output and "triton" not in res.output


@pytest.mark.parametrize("args,msg", [
    (["--tokens", "1,x"], "integers separated by commas, got 'x'"),
    (["--tokens", "-1"], "--tokens must be >= 0"),
    (["--shapes", "gpt-5"], "shape must be one of"),
    (["--bandwidth", "1e9"], "give both --bandwidth and --peak"),
    (["--budget", "0"], "--budget must be positive"),
    (["--experts", "4", "--topk", "9"], "top_k"),
])
def test_bad_options_exit_nonzero_with_a_message(run, args, msg):
    res = run("--backend", "c", *args)
    assert res.exit_code == 2
    assert msg in res.output


def test_plot_without_matplotlib_says_so(run, tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    res = run(*TINY, "--tokens", "2", "--no-baselines", "--plot", str(tmp_path / "p.png"))
    assert res.exit_code == 0
    assert "plot not drawn: matplotlib is not installed" in res.output
    assert not (tmp_path / "p.png").exists()


def test_plot_and_markdown_written(run, tmp_path):
    pytest.importorskip("matplotlib")
    res = run(*TINY, "--tokens", "1,3", "--no-baselines", "--plot", str(tmp_path / "p.png"),
              "--markdown", str(tmp_path / "t.md"))
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0].startswith("| shape | T | floor ms | moegen ms |")
    assert md[2].startswith("| e4k2h32f24-fp32 | 1 |")


def test_startup_alone(run, tmp_path):
    out = tmp_path / "s.json"
    res = run("--startup", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "cold compile s" in res.output
    rep = json.loads(out.read_text())
    rows = {r["backend"]: r for r in rep["startup"]}
    assert rows["c"]["import_ms"] > 0 and rows["c"]["cold_compile_s"] > 0
    assert rows["c"]["warm_callable_ms"] > 0


def test_plan_of_the_targets_matrix_and_the_cpu_matrix():
    from moegen.cli.bench import _plan
    specs, tokens = _plan("targets", None, None, None, None, None, None, None, "swiglu", "c", False)
    assert [lbl for lbl, _ in specs] == ["seed-small", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3"]
    assert tokens == [1, 8, 64, 512, 4096, 16384]
    assert {s.dtype for _, s in specs} == {"bfloat16"}
    assert (specs[3][1].num_experts, specs[3][1].top_k, specs[3][1].hidden_dim, specs[3][1].ffn_dim) == (
        256, 8, 7168, 2048)
    specs, tokens = _plan("cpu", None, None, None, None, None, None, None, "swiglu", "c", False)
    assert [(lbl, s.dtype) for lbl, s in specs] == [("seed-small", "float32")] and tokens == [1, 16, 128, 1024]
    specs, _ = _plan(None, "seed-small", "4,8", None, None, None, "5", "fp32,bf16", "geglu", "c", True)
    assert [lbl for lbl, _ in specs] == ["seed-small-fp32", "seed-small-bf16", "e4k2h512f2048-fp32",
                                         "e4k2h512f2048-bf16", "e8k2h512f2048-fp32", "e8k2h512f2048-bf16"]
    assert {s.activation for _, s in specs} == {"geglu"}


def test_instructions_counted_and_written(run, tmp_path):
    from moegen.bench import instructions
    if instructions.available():
        pytest.skip(instructions.available())
    out = tmp_path / "i.json"
    res = run(*TINY, "--tokens", "2,200", "--no-baselines", "--instructions", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "T > 128 not counted" in res.output and "moegen Ir" in res.output
    assert "one thread, x86-64-v3 build" in res.output or "avx512" not in res.output
    rows = json.loads(out.read_text())["instructions"]
    assert [(r["shape"], r["tokens"], r["contender"]) for r in rows] == [("e4k2h32f24-fp32", 2, "moegen")]
    assert rows[0]["instructions"] > 1000


@pytest.mark.slow
def test_bench_ep_prints_the_stage_breakdown(tmp_path, monkeypatch):
    """`moegen bench --ep 2` spawns two gloo ranks and prints every stage of the EP layer."""
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    r = CliRunner().invoke(bench, ["--ep", "2", "--experts", "8", "--topk", "2",
                                  "--hidden", "64", "--ffn", "96", "--tokens", "16",
                                  "--backend", "c", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    for stage in ("route", "pack", "exchange", "experts", "return", "combine"):
        assert f"\n{stage} " in r.output
