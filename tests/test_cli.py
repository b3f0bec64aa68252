"""The CLI through click's CliRunner, on the C backend with a private cache."""

import json

import pytest
from click.testing import CliRunner

from moegen import MoESpec
from moegen.cli import main
from moegen.jit import clear_memo

SMALL = ["--experts", "4", "--topk", "2", "--hidden", "32", "--ffn", "24", "--backend", "c"]


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEGEN_CACHE_DIR", str(tmp_path / "cache"))
    clear_memo()
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)
    yield invoke
    clear_memo()


def test_build_prints_name_key_entry_and_time(run):
    r = run("build", *SMALL)
    assert r.exit_code == 0, r.output
    assert "moe_e4_k2_h32_f24_fp32_swiglu" in r.output
    assert "compiled" in r.output and "key:" in r.output and "entry:" in r.output
    again = run("build", *SMALL)
    assert again.exit_code == 0 and "cached" in again.output


def test_build_without_shape_is_a_usage_error(run):
    r = run("build", "--experts", "8")
    assert r.exit_code != 0
    assert "--topk" in r.output and "--hidden" in r.output


def test_bad_spec_value_exits_nonzero_with_the_field(run):
    r = run("build", "--experts", "4", "--topk", "9", "--hidden", "32", "--backend", "c")
    assert r.exit_code == 1
    assert "top_k" in r.output


def test_render_prints_c_source_with_constants(run):
    r = run("render", *SMALL)
    assert r.exit_code == 0, r.output
    assert "#define" in r.output and "moe_e4_k2_h32_f24_fp32_swiglu" in r.output


def test_render_out_writes_files(run, tmp_path):
    r = run("render", *SMALL, "--out", str(tmp_path / "gen"))
    assert r.exit_code == 0, r.output
    files = list((tmp_path / "gen").rglob("*"))
    assert any(f.suffix == ".c" for f in files)


def test_verify_passes_and_reports_errors(run):
    r = run("verify", *SMALL, "--tokens", "0,1,5")
    assert r.exit_code == 0, r.output
    assert r.output.count("ok") >= 3


def test_env_reports_sections(run):
    r = run("env")
    assert r.exit_code == 0, r.output
    for word in ("c backend", "cuda backend", "cache", "MOEGEN_CACHE_DIR"):
        assert word in r.output
    j = run("env", "--json")
    info = json.loads(j.output)
    assert "settings" in info and "c backend" in info


def test_grid_options_expand(run):
    from moegen.cli.options import specs_from_options
    o = dict(experts=[8, 64], topk=[2], hidden=[64], ffn=None, dtype=["bf16", "fp16"],
             activation=["swiglu"], routing="softmax_topk", renormalize=True, bias=False,
             n_group=1, topk_group=1, routed_scaling_factor=1.0, shared_experts=0,
             backend="auto", arch=["sm_80", "sm_90"])
    specs = specs_from_options(o)
    assert len(specs) == 8 and all(s.backend == "cuda" for s in specs)


@pytest.mark.parametrize("spec", [
    MoESpec(16, 4, 32, 24, dtype="bfloat16", routing="sigmoid_topk", n_group=4, topk_group=2,
            routed_scaling_factor=2.5, num_shared_experts=1, backend="c"),
    MoESpec(8, 2, 32, 24, activation="geglu", renormalize=False, bias=True,
            capacity_factor=1.25, capacity_drop="weight", backend="c"),
    MoESpec(16, 3, 32, 24, dtype="bfloat16", n_group=4, topk_group=2, router_dtype="float32",
            num_shared_experts=2, shared_expert_gate=True, backend="c"),
    MoESpec(8, 2, 32, 24, activation="swiglu_clamped", swiglu_alpha=1.5, swiglu_limit=6.0,
            routing="topk_softmax", bias=True, backend="c"),
    MoESpec(8, 2, 600, 24, batch_invariant=True, save_activations=True, backend="c"),
], ids=lambda s: s.name)
def test_every_variant_is_reachable_and_cli_args_round_trip(run, spec):
    """The command moegen prints in messages (offline misses) rebuilds the same spec."""
    from moegen.jit import cli_args
    args = cli_args(spec).split()
    r = run("render", *args)
    assert r.exit_code == 0, r.output                 # the c backend renders capacity too
    assert spec.name in r.output
