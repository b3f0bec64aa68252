import pytest

from moegen import MoESpec, TemplateError
from moegen.render import (make_environment, render_template, template_digests, template_names,
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
