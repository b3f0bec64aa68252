"""``moegen bench --contender FILE``: the plugin file is loaded and checked, and each contender
it returns becomes a same-run column of the table and the JSON report (on the CPU here, with a
tiny CPU-torch plugin; on a GPU the same code gets CUDA tensors)."""

from __future__ import annotations

import json
import textwrap

import pytest
from click.testing import CliRunner

from moegen.bench import contenders
from moegen.bench import report
from moegen.cli.bench import bench

pytest.importorskip("torch")

TINY = ["--backend", "c", "--experts", "4", "--topk", "2", "--hidden", "32", "--ffn", "24",
        "--budget", "0.05", "--repeats", "2", "--warmup", "1", "--rotate", "2",
        "--bandwidth", "1e10", "--peak", "1e11", "--no-progress", "--no-baselines"]

LOOP = textwrap.dedent('''
    import torch

    def contenders(E, k, H, F, w13, w2, wg):
        assert w13.shape == (E, 2 * F, H) and w2.shape == (E, H, F) and wg.shape == (H, E)

        def loop(x, topk_w, topk_ids, wg):
            xf = x.float()
            out = torch.zeros_like(xf)
            for e in range(E):
                tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
                if tok.numel():
                    h = xf[tok] @ w13[e].float().T
                    y = (torch.nn.functional.silu(h[:, :F]) * h[:, F:]) @ w2[e].float().T
                    out.index_add_(0, tok, y * topk_w[tok, slot, None].float())
            return out.to(x.dtype)

        def wrong(x, topk_w, topk_ids, wg):
            return torch.ones_like(x)

        return {"torchloop": loop, "wrong": wrong}
''')


@pytest.fixture
def run(tmp_cache):
    return lambda *a: CliRunner().invoke(bench, list(a), catch_exceptions=False)


def plugin(tmp_path, text, name="plug.py"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_contender_columns_in_table_and_json(run, tmp_path):
    out = tmp_path / "r.json"
    res = run(*TINY, "--tokens", "0,5", "--contender", plugin(tmp_path, LOOP), "--json", str(out))
    assert res.exit_code == 0, res.output
    head = next(ln for ln in res.output.splitlines() if ln.startswith("shape "))
    assert "torchloop ms" in head and "wrong ms" in head
    rep = json.loads(out.read_text())
    assert report.validate(rep) == []
    b = rep["points"][1]["baselines"]
    assert b["torchloop"]["ms"] > 0 and b["torchloop"]["err"] < 1e-5      # a correct contender
    assert b["wrong"]["err"] > 0.5                                         # a wrong one shows
    assert "contender from plug.py" in b["torchloop"]["note"]


def test_a_wrong_output_shape_is_a_note_not_a_crash(run, tmp_path):
    src = "import torch\ndef contenders(E, k, H, F, w13, w2, wg):\n" \
          "    return {'short': lambda x, w, i, g: x[:, :1]}\n"
    out = tmp_path / "r.json"
    res = run(*TINY, "--tokens", "3", "--contender", plugin(tmp_path, src), "--json", str(out))
    assert res.exit_code == 0, res.output
    note = json.loads(out.read_text())["points"][0]["baselines"]["short"]["note"]
    assert "returned shape (3, 1), expected (3, 32)" in note


@pytest.mark.parametrize("name,text,msg", [
    ("p.txt", "", "must be a .py file"),
    ("p.py", "raise RuntimeError('boom')", "failed to import: RuntimeError: boom"),
    ("p.py", "contenders = 3", "must define a function contenders(E, k, H, F, w13, w2, wg)"),
    ("p.py", "x = 1", "found none"),
])
def test_bad_plugin_files_are_one_line(run, tmp_path, name, text, msg):
    res = run(*TINY, "--tokens", "1", "--contender", plugin(tmp_path, text, name))
    assert res.exit_code == 2 and msg in res.output, res.output


def test_missing_file(run, tmp_path):
    res = run(*TINY, "--tokens", "1", "--contender", str(tmp_path / "nope.py"))
    assert res.exit_code == 2 and "does not exist" in res.output


@pytest.mark.parametrize("ret,msg", [("{'moegen': lambda *a: a[0]}", "name 'moegen' is taken"),
                                     ("[1]", "must return a dict of name -> callable")])
def test_bad_contender_dicts_are_refused(tmp_path, ret, msg):
    fn = contenders.load(plugin(tmp_path, f"def contenders(*a):\n    return {ret}\n"))
    from moegen import MoESpec, reference
    spec = MoESpec(4, 2, 32, 24, backend="c")
    _, w = reference.random_problem(spec, 0)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        contenders.build({"f.py": fn}, spec, w, "numpy", "cpu")
