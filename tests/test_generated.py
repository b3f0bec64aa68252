"""The checked-in renders under generated/ must match a fresh render."""

import re
from pathlib import Path

from moegen.generated import REFERENCE_SPECS, expected_files

ROOT = Path(__file__).resolve().parent.parent / "generated"


def test_generated_renders_are_fresh():
    expected = expected_files()
    assert len(expected) >= 2 * len(REFERENCE_SPECS)
    stale = [rel for rel, text in expected.items()
             if not (ROOT / rel).is_file() or (ROOT / rel).read_text() != text]
    assert not stale, (f"generated/ is stale for {stale}: run `moegen render --out generated/` "
                       "and commit the result")


def test_no_orphans_in_generated():
    expected = set(expected_files())
    present = {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()}
    assert present <= expected | {"README.md"}, present - expected


def _c_defines(text):
    return dict(re.findall(r"^#define (\w+) +(\S+)", text, re.M))


def test_c_renders_carry_the_spec_numbers_where_they_belong():
    """Each checked-in C render defines the spec's sizes under their names, the tier's tile,
    and no preprocessor branches over tiers, routings or dtypes."""
    from moegen.backends import isa
    from moegen.generated import C_TARGET
    tier = isa.TIERS[C_TARGET]
    for _, spec in REFERENCE_SPECS:
        text = (ROOT / "c" / f"{spec.name}.c").read_text()
        d = _c_defines(text)
        assert d["kExperts"] == str(spec.num_experts), spec.name
        assert d["kTopK"] == str(spec.top_k), spec.name
        assert d["kHidden"] == str(spec.hidden_dim), spec.name
        assert d["kFfn"] == str(spec.ffn_dim), spec.name
        assert d["kGateCols"] == str(2 * spec.ffn_dim), spec.name
        assert (d["kLanes"], d["BM"], d["BN"]) == (str(tier.vec_floats), str(tier.mr),
                                                   str(tier.ncol)), spec.name
        assert f"typedef {spec.dt.c_type} w_t;" in text
        assert not re.search(r"^\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b", text, re.M), spec.name
