"""moegen tune: candidates, the stored record, and compile picking it up (c backend)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import moegen
from moegen import MoESpec
from moegen import reference as R
from moegen.backends.base import Artifact
from moegen.cache import default_cache
from moegen.cli import main
from moegen.jit import clear_memo, key_parts
from moegen.render import render
from moegen.tuning import candidates, lookup, record_identity, store

SPEC = MoESpec(4, 2, 40, 24, backend="c")


@pytest.fixture(autouse=True)
def _private_cache(tmp_cache):
    yield


def test_candidates_cover_every_combination_defaults_first():
    cands = candidates(SPEC)
    assert cands[0] == {"kc": 512, "par_min_work": 1 << 18}
    assert len(cands) == 9 and len({tuple(sorted(c.items())) for c in cands}) == 9


def test_render_applies_and_validates_tuning():
    assert "#define BK             256" in render(SPEC, tuning={"kc": 256}).text
    with pytest.raises(ValueError, match="kc=300"):
        render(SPEC, tuning={"kc": 300})
    with pytest.raises(ValueError, match="unroll"):
        render(SPEC, tuning={"unroll": 4})


def test_store_then_compile_uses_the_record():
    untuned = key_parts(SPEC)
    assert untuned["tuning"] == {} and lookup(SPEC) == {}
    store(SPEC, {"kc": 256})
    assert lookup(SPEC) == {"kc": 256}
    tuned = key_parts(SPEC)
    assert tuned["tuning"] == {"kc": 256} and tuned["source"] != untuned["source"]
    clear_memo()
    k = moegen.compile(SPEC)
    assert k.meta["tuning"] == {"kc": 256}
    x, w = R.random_problem(SPEC, 9)
    y = k(x, k.pack(**R.weight_kwargs(SPEC, w)))
    assert R.rel_error(y, R.moe(SPEC, x, w)[0]) <= 1e-5
    with pytest.raises(ValueError, match="not allowed"):
        store(SPEC, {"kc": 7})


def test_unreadable_record_is_ignored(caplog):
    name, key = record_identity(SPEC)
    default_cache().put(name, key, Artifact(b"not json", {"kind": "tuning", "key": key}))
    assert lookup(SPEC) == {}
    assert "unreadable tuning record" in caplog.text
    default_cache().put(name, key, Artifact(json.dumps({"choice": {"kc": 3}}).encode(),
                                            {"kind": "tuning", "key": key}))
    assert lookup(SPEC) == {}


def test_cli_tune_measures_every_candidate_and_stores_the_best():
    r = CliRunner().invoke(main, ["tune", "--experts", "4", "--topk", "2", "--hidden", "40",
                                  "--ffn", "24", "--backend", "c", "--tokens", "1",
                                  "--budget", "0.02"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "best:" in r.output and "stored" in r.output
    best = lookup(SPEC)
    assert best in candidates(SPEC)
    assert moegen.compile(SPEC).meta["tuning"] == best
    assert np.isfinite(float(r.output.split("<- best")[0].split()[-1]))


def test_cuda_has_nothing_to_tune_yet():
    pytest.importorskip("cupy")
    spec = MoESpec(4, 2, 40, 24, backend="cuda", arch="sm_90")
    assert candidates(spec) == [{}]
    assert lookup(spec) == {}
