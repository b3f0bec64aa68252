import pytest

from moegen import MoESpec, TemplateError
from moegen.generated import REFERENCE_SPECS
from moegen.render import (make_environment, render, render_template, template_digests, template_names,
                           template_root)


def test_templates_are_found_and_digested():
    names = template_names()
    assert any(n.startswith("c/") for n in names)
    assert any(n.startswith("cuda/") for n in names)
    digests = template_digests()
    assert set(digests) == set(names)
    assert all(len(d) == 64 for d in digests.values())
    assert template_root().joinpath("c").is_dir()


def test_undefined_variable_is_an_error_with_file_and_line():
    env = make_environment({"t.c.jinja": "#define E {{ E }}\n#define K {{ K }}\n"})
    assert render_template("t.c.jinja", env, E=8, K=2) == "#define E 8\n#define K 2\n"
    with pytest.raises(TemplateError) as info:
        render_template("t.c.jinja", env, E=8)
    assert "t.c.jinja:2" in str(info.value) and "'K' is undefined" in str(info.value)
    assert info.value.lineno == 2


def test_syntax_error_names_file_and_line():
    env = make_environment({"bad.c.jinja": "int x;\n{% if E %}\nint y;\n"})
    with pytest.raises(TemplateError) as info:
        render_template("bad.c.jinja", env, E=1)
    assert str(info.value).startswith("bad.c.jinja:")


def test_missing_include_is_named():
    env = make_environment({"a.c.jinja": "{% include 'missing.jinja' %}"})
    with pytest.raises(TemplateError, match="missing.jinja"):
        render_template("a.c.jinja", env)


def test_float_filter_refuses_text():
    env = make_environment({"f.jinja": "{{ v|f32 }}"})
    assert render_template("f.jinja", env, v=2.5) == "2.5f"
    with pytest.raises(TemplateError):
        render_template("f.jinja", env, v="1); system(\"x\"")


@pytest.mark.parametrize("backend", ["c", "cuda"])
def test_constants_come_first(backend):
    from moegen.render import render
    spec = MoESpec(8, 2, 512, backend=backend)
    text = render(spec).text
    head = "\n".join(text.splitlines()[:60])
    for value in ("8", "2", "512", "2048"):
        assert value in head
    assert "#define" in head or "constexpr" in head


def _code_lines(text: str) -> set[str]:
    """Every line of a source with its trailing // comment and spaces removed."""
    return {line.split("//")[0].strip() for line in text.splitlines()}


@pytest.mark.parametrize("label", [label for label, _ in REFERENCE_SPECS])
def test_cuda_renders_carry_the_spec_numbers_where_they_belong(label):
    """The checked-in CUDA renders (generated/cuda) and a fresh render define each layer constant
    once, as a whole declaration with the spec's value, and name each tile of the plan."""
    from pathlib import Path
    from moegen.plan import make_plan
    spec = dict(REFERENCE_SPECS)[label].replace(backend="cuda", arch="sm_90")
    plan = make_plan(spec, "sm_90", {})
    text = render(plan).text
    checked_in = (Path(__file__).resolve().parent.parent / "generated" / "cuda"
                  / f"{spec.name}.cu").read_text()
    assert checked_in == text
    lines = _code_lines(text)
    want = {f"constexpr int kExperts = {spec.num_experts};", f"constexpr int kTopK = {spec.top_k};",
            f"constexpr int kShared = {spec.num_shared_experts};",
            f"constexpr int kHidden = {spec.hidden_dim};", f"constexpr int kFfn = {spec.ffn_dim};",
            f"typedef {spec.dt.cuda_raw} elem_t;", f"constexpr int kVecH = {plan.detail.vec_h};",
            f"constexpr int kRouteWarps = {plan.detail.route.warps};",
            f"constexpr int kGroupWarps = {plan.detail.group.warps};",
            f"constexpr int kCombineThreads = {plan.detail.combine_threads};"}
    assert want <= lines, want - lines
    for name in ("kExperts", "kTopK", "kHidden", "kFfn"):
        assert sum(line.startswith(f"constexpr int {name} =") for line in lines) == 1, name
    for b in plan.detail.buckets:
        t = b.ffn2
        call = (f"moe_ffn::ffn2_{t.kind}<{t.bm}, {t.bn}, {t.warps_m}, {t.warps_n}, {t.stages}, "
                f"{b.ffn2_splits}, {t.bk}>(" if t.kind == "mma" else None)
        assert f"{b.ffn1_kernel}(" in text and f"{b.ffn2_kernel}(" in text
        if call:
            assert call in text, call
