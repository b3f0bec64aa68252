"""The checked-in renders under generated/ must match a fresh render."""

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
