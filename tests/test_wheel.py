"""The wheel ships the templates and declares its dependencies: install it with them into a
fresh venv that cannot see this interpreter's packages, then compile from there."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_wheel_installs_and_compiles_from_its_own_templates(tmp_path):
    wheel_dir = tmp_path / "wheel"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(ROOT)], capture_output=True, text=True)
    if build.returncode != 0:     # e.g. an old setuptools in this venv: build isolated
        build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                                str(wheel_dir), str(ROOT)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("moegen-*.whl")
    import zipfile
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("moegen/templates/c/") and n.endswith(".jinja") for n in names), names
    assert any(n.startswith("moegen/templates/cuda/") and n.endswith(".jinja") for n in names)

    venv = tmp_path / "venv"
    # No --system-site-packages: the wheel's declared dependencies must be enough.
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Without PYTHONPATH: a checkout on it (with its egg-info) would count as installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    inst = subprocess.run([str(py), "-m", "pip", "install", "-q", str(wheel)],
                          capture_output=True, text=True, env=env)
    assert inst.returncode == 0, inst.stdout + inst.stderr
    script = textwrap.dedent("""
        import moegen, moegen.render, sys
        assert not sys.flags.no_site and sys.prefix != sys.base_prefix
        from moegen import MoESpec, reference as R
        assert "site-packages" in moegen.__file__, moegen.__file__
        root = str(moegen.render.template_root())
        assert "site-packages" in root, root
        spec = MoESpec(4, 2, 16, 24, backend="c")
        k = moegen.compile(spec)
        x, w = R.random_problem(spec, 5)
        y = k(x, k.pack(**R.weight_kwargs(spec, w)))
        err = R.rel_error(y, R.moe(spec, x, w)[0])
        assert err < 1e-5, err
        print("OK", root)
    """)
    env["MOEGEN_CACHE_DIR"] = str(tmp_path / "cache")
    r = subprocess.run([str(py), "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK" in r.stdout
    # the console script of the wheel (the moegen.cli package) builds from the same install
    cli = subprocess.run([str(venv / "bin" / "moegen"), "build", "--backend", "c", "--experts",
                          "4", "--topk", "2", "--hidden", "16", "--ffn", "24"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "cached:" in cli.stdout or "compiled:" in cli.stdout
