"""Every CLI failure is one clear line and a non-zero exit, never a traceback (issue 9, items
3-6), through the real console entry point in a subprocess where the environment matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from moegen.arch import is_arch, parse_arch
from moegen.backends import cuda_usable
from moegen.cli import main
from moegen.errors import SpecError
from moegen.spec import MoESpec

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--experts", "4", "--topk", "2", "--hidden", "16", "--ffn", "24"]


@pytest.fixture
def cache_dir(tmp_cache):
    return tmp_cache


def moegen(*args, env=None, no_cupy=False, tmp=None):
    """Run ``python -m moegen.cli ARGS`` in a fresh process; (rc, stdout, stderr)."""
    e = dict(os.environ, **(env or {}))
    path = [str(ROOT)]
    if no_cupy:
        # an interpreter without the cuda extra: `import cupy` fails as if not installed
        (tmp / "sitecustomize.py").write_text("import sys\nsys.modules['cupy'] = None\n")
        path.insert(0, str(tmp))
    e["PYTHONPATH"] = os.pathsep.join(path)
    r = subprocess.run([sys.executable, "-m", "moegen.cli", *args], env=e, capture_output=True,
                       text=True, timeout=300)
    return r.returncode, r.stdout, r.stderr


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [ln for ln in lines if ln.lower().startswith("error")]
    assert len(errors) == 1, stderr
    return errors[0]


# -- item 3: no cuda extra -------------------------------------------------------------------
def test_cuda_build_without_cupy_names_the_extra(tmp_path, cache_dir):
    rc, out, err = moegen("build", "--backend", "cuda", "--arch", "sm_90", *SMALL, no_cupy=True,
                          tmp=tmp_path)
    assert rc != 0
    assert "pip install 'moegen[cuda]'" in one_error_line(err)


@pytest.mark.parametrize("cmd", [["verify", "--backend", "cuda", *SMALL],
                                 ["tune", "--backend", "cuda", *SMALL],
                                 ["bench", "--backend", "cuda", *SMALL, "--no-progress"]])
def test_gpu_commands_without_cupy_name_the_extra(tmp_path, cache_dir, cmd):
    rc, out, err = moegen(*cmd, no_cupy=True, tmp=tmp_path)
    assert rc == 1 and "pip install 'moegen[cuda]'" in one_error_line(err)


def test_env_names_the_extra_without_cupy(tmp_path, cache_dir):
    rc, out, err = moegen("env", no_cupy=True, tmp=tmp_path)
    assert rc == 0, err
    assert "pip install 'moegen[cuda]'" in out


# -- item 4: no usable GPU -------------------------------------------------------------------
@pytest.mark.skipif(cuda_usable(), reason="a usable GPU is present")
def test_verify_cuda_without_a_gpu_says_so_in_one_line(cache_dir):
    pytest.importorskip("cupy")
    r = CliRunner().invoke(main, ["verify", "--backend", "cuda", "--arch", "sm_90", *SMALL,
                                  "--tokens", "1"])
    assert r.exit_code == 1
    assert "no usable GPU is present" in r.output and "Traceback" not in r.output
    assert not (cache_dir / "cache.db").exists()        # nothing built, nothing evicted


def test_a_cuda_driver_error_becomes_one_line(cache_dir, monkeypatch):
    """A CUDA runtime error raised anywhere under a command (here: the build) is reported as a
    missing GPU, not a traceback."""
    cupy = pytest.importorskip("cupy")
    err_type = cupy.cuda.runtime.CUDARuntimeError

    def boom(spec):
        raise err_type(35)           # cudaErrorInsufficientDriver
    monkeypatch.setattr("moegen.cli.build.build_one", boom)
    r = CliRunner().invoke(main, ["build", "--backend", "c", *SMALL])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: no usable GPU is present")


# -- item 5: no C compiler -------------------------------------------------------------------
def test_missing_compiler_names_moegen_cc(cache_dir):
    rc, out, err = moegen("build", "--backend", "c", *SMALL,
                          env={"MOEGEN_CC": "/nonexistent/cc", "MOEGEN_CACHE_DIR": str(cache_dir)})
    assert rc == 1
    line = one_error_line(err)
    assert "MOEGEN_CC" in line and "/nonexistent/cc" in line


# -- item 6 ----------------------------------------------------------------------------------
def test_bogus_log_level_is_one_line(cache_dir):
    rc, out, err = moegen("env", env={"MOEGEN_LOG_LEVEL": "bogus"})
    assert rc == 1
    line = one_error_line(err)
    assert "MOEGEN_LOG_LEVEL" in line and "'bogus'" in line and "WARNING" in line


def test_negative_tokens_name_the_bad_value(cache_dir):
    r = CliRunner().invoke(main, ["verify", "--backend", "c", *SMALL, "--tokens", "1,-1"])
    assert r.exit_code == 2 and "--tokens must be >= 0, got -1" in r.output
    r = CliRunner().invoke(main, ["verify", "--backend", "c", *SMALL, "--tokens", "1,٣"])
    assert r.exit_code == 2 and "got '٣'" in r.output


def test_arch_with_the_c_backend_is_refused(cache_dir):
    r = CliRunner().invoke(main, ["build", "--backend", "c", "--arch", "sm_90", *SMALL])
    assert r.exit_code == 2
    assert "--arch sm_90 names a CUDA target; the c backend takes none" in r.output
    assert not cache_dir.exists()


@pytest.mark.parametrize("arch", ["sm_٩٠", "sm_0090", "sm_1000", "sm_²", "sm_90b", "sm_60",
                                  "sm_9", " sm_90", "sm_90a\n"])
def test_arch_names_outside_ascii_sm_digits_are_refused(arch, cache_dir):
    assert not is_arch(arch)
    with pytest.raises(SpecError, match="MoESpec.arch must look like"):
        MoESpec(8, 2, 64, arch=arch)
    if arch != arch.strip():
        return                  # the CLI strips the items of its comma lists
    r = CliRunner().invoke(main, ["build", "--arch", arch, *SMALL])
    assert r.exit_code == 1 and r.output.startswith("error: MoESpec.arch must look like"), r.output


@pytest.mark.parametrize("arch,want", [("sm_70", (70, False)), ("sm_90a", (90, True)),
                                       ("sm_100", (100, False)), ("sm_120a", (120, True))])
def test_arch_names_accepted(arch, want):
    assert parse_arch(arch) == want
    assert MoESpec(8, 2, 64, arch=arch).arch == arch


def test_verbose_after_the_subcommand(cache_dir):
    for args in (["-v", "build", "--backend", "c", *SMALL], ["build", "--backend", "c", *SMALL, "-v"]):
        rc, out, err = moegen(*args, env={"MOEGEN_ALWAYS_COMPILE": "1",
                                          "MOEGEN_CACHE_DIR": str(cache_dir)})
        assert rc == 0, err
        assert "INFO moegen.cache: built" in err, (args, err)
    rc, out, err = moegen("cache", "ls", "-v", env={"MOEGEN_CACHE_DIR": str(cache_dir)})
    assert rc == 0, err


def test_cache_explain_takes_the_entry_names_ls_prints(cache_dir):
    assert CliRunner().invoke(main, ["build", "--backend", "c", *SMALL]).exit_code == 0
    listed = json.loads(CliRunner().invoke(main, ["cache", "ls", "--json"]).output)
    entry = listed[0]["entry"]
    r = CliRunner().invoke(main, ["cache", "explain", entry])
    assert r.exit_code == 0, r.output
    assert f"entry:  {entry}" in r.output and "toolchain" in r.output
    r = CliRunner().invoke(main, ["cache", "explain", listed[0]["name"], "--json"])
    assert json.loads(r.output)[0]["key"] == listed[0]["key"]
    r = CliRunner().invoke(main, ["cache", "explain", "moe_nothing.0123"])
    assert r.exit_code == 1 and "no cache entry named 'moe_nothing.0123'" in r.output


QWEN3_TF5 = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
             "hidden_size": 64, "moe_intermediate_size": 32, "num_local_experts": 8,
             "num_experts_per_tok": 2, "hidden_act": "silu", "norm_topk_prob": True,
             "dtype": "bfloat16"}


def test_from_config_uses_the_model_dtype_and_transformers5_fields(tmp_path, cache_dir):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(QWEN3_TF5))
    r = CliRunner().invoke(main, ["build", "--from-config", str(cfg), "--backend", "c"])
    assert r.exit_code == 0, r.output
    assert "name:     moe_e8_k2_h64_f32_bf16_swiglu" in r.output
    r = CliRunner().invoke(main, ["build", "--from-config", str(cfg), "--backend", "c",
                                  "--dtype", "fp32"])
    assert r.exit_code == 0 and "moe_e8_k2_h64_f32_fp32_swiglu" in r.output, r.output


def test_from_config_matches_what_transformers5_writes(tmp_path, cache_dir):
    transformers = pytest.importorskip("transformers")
    conf = transformers.Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32,
                                       num_experts=8, num_experts_per_tok=2, dtype="bfloat16")
    conf.save_pretrained(tmp_path)
    from moegen.model_config import parse_model_config
    (fields,) = parse_model_config(tmp_path / "config.json")
    assert (fields["num_experts"], fields["top_k"], fields["dtype"]) == (8, 2, "bfloat16")


def test_deeply_nested_config_is_one_line(tmp_path, cache_dir):
    cfg = tmp_path / "config.json"
    cfg.write_text("[" * 200_000 + "]" * 200_000)
    rc, out, err = moegen("build", "--from-config", str(cfg), env={"MOEGEN_CACHE_DIR": str(cache_dir)})
    assert rc == 1 and "nests JSON too deeply" in one_error_line(err)
    big = tmp_path / "big.json"
    with open(big, "w") as fh:
        fh.write('{"a": "' + "x" * (5 << 20) + '"}')
    r = CliRunner().invoke(main, ["build", "--from-config", str(big)])
    assert r.exit_code == 1 and "must be at most" in r.output


def test_a_model_config_warning_prints_once(tmp_path, cache_dir):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 16,
                               "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu",
                               "router_jitter_noise": 0.01, "torch_dtype": "bfloat16"}))
    rc, out, err = moegen("build", "--from-config", str(cfg), "--backend", "auto",
                          env={"MOEGEN_CACHE_DIR": str(cache_dir)})
    assert rc == 0, err
    assert err.count("perturbs the router only while training") == 1, err


def test_bench_names_no_option_it_lacks(tmp_path, cache_dir):
    """A cuda bench with no GPU says so; it never suggests an option bench does not have."""
    if cuda_usable():
        pytest.skip("a usable GPU is present")
    r = CliRunner().invoke(main, ["bench", "--backend", "cuda", *SMALL, "--no-progress"])
    assert r.exit_code == 1 and "--arch" not in r.output, r.output


def test_warnings_reach_each_command_run_in_one_process(tmp_path, cache_dir):
    """The CLI's log handler follows the current stderr and forgets what it printed between
    commands, so a second command in the same process still shows its warning."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "mixtral", "hidden_size": 32, "intermediate_size": 16,
                               "num_local_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu",
                               "router_jitter_noise": 0.01, "torch_dtype": "bfloat16"}))
    for _ in range(2):
        r = CliRunner().invoke(main, ["build", "--from-config", str(cfg), "--backend", "auto"])
        assert r.exit_code == 0, r.output
        assert r.output.count("perturbs the router only while training") == 1, r.output


def test_a_closed_pipe_stops_quietly(cache_dir):
    """``moegen env | head -1``: no traceback and no error line when the reader goes away."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), MOEGEN_CACHE_DIR=str(cache_dir))
    # four C sources: far more than a pipe buffer holds, so the writer meets the closed pipe
    p = subprocess.Popen([sys.executable, "-m", "moegen.cli", "render", "--experts", "8,16,32,64",
                          "--topk", "2", "--hidden", "64", "--backend", "c"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert err == "", err
