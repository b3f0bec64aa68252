"""Render a plan's templates to source text: pure (reads template files, writes nothing).

One strict Jinja environment (``StrictUndefined``: a misspelt variable is an error, not empty
text).  Templates live in the top-level ``templates/`` folder, shipped as the package
``moegen.templates`` and found through ``importlib.resources`` from a checkout or a wheel.
Template inputs come from a `moegen.plan.KernelPlan` (the backend's ``render(plan)``):
validated ints, floats and strings from lookup tables, never text a user typed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from pathlib import Path

import jinja2

from .backends import get_backend
from .backends.base import Sources
from .backends.cuda_plan import RENDER_ARCH
from .errors import TemplateError
from .plan import KernelPlan, make_plan
from .spec import MoESpec


def template_root():
    """The templates folder as an importlib Traversable (installed) or a Path (checkout)."""
    try:
        root = importlib.resources.files("moegen.templates")
        if root.joinpath("c").is_dir():
            return root
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "templates"


def _walk(node, prefix=""):
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        rel = f"{prefix}{child.name}"
        if child.is_dir():
            if not child.name.startswith("__"):
                yield from _walk(child, rel + "/")
        elif child.name.endswith(".jinja"):
            yield rel, child


@functools.lru_cache(maxsize=1)
def _template_files() -> dict[str, str]:
    return {rel: node.read_text(encoding="utf-8") for rel, node in _walk(template_root())}


def template_names() -> list[str]:
    return sorted(_template_files())


def template_digests() -> dict[str, str]:
    """sha256 of every template file, for the cache key."""
    return {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in _template_files().items()}


class _TextLoader(jinja2.BaseLoader):
    """Templates from an in-memory dict; the template name doubles as its file name, so
    tracebacks and error messages point at ``templates/<name>``."""

    def __init__(self, files: dict[str, str]):
        self.files = files

    def get_source(self, environment, template):
        if template not in self.files:
            raise jinja2.TemplateNotFound(template)
        return self.files[template], template, lambda: True

    def list_templates(self):
        return sorted(self.files)


def _finite(value):
    """Jinja filter: a float literal safe to paste into C/CUDA (e.g. ``2.5f``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TemplateError(f"f32 filter needs a number, got {value!r}")
    return f"{float(value)!r}f"


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one environment over the shipped templates."""
    return make_environment(_template_files())


def make_environment(files: dict[str, str]) -> jinja2.Environment:
    """A strict environment over ``files`` (name -> template text)."""
    env = jinja2.Environment(
        loader=_TextLoader(files),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["f32"] = _finite
    return env


def render_template(template: str, env: jinja2.Environment | None = None, **context) -> str:
    """Render one template; errors become TemplateError with the template's file and line.
    (The parameter is ``template``, not ``name``, so a context variable may be called name.)"""
    env = env or environment()
    try:
        return env.get_template(template).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.name or template}:{exc.lineno}: {exc.message}", exc.name or template,
                            exc.lineno) from None
    except jinja2.TemplateNotFound as exc:
        raise TemplateError(f"template {exc.name!r} not found (rendering {template!r}); known: "
                            f"{sorted(env.list_templates()) if env.loader else []}", template) from None
    except jinja2.UndefinedError as exc:
        lineno = _template_lineno(exc, template)
        raise TemplateError(f"{template}:{lineno}: {exc.message}", template, lineno) from None


def _template_lineno(exc: BaseException, name: str) -> int | None:
    tb = exc.__traceback__
    lineno = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(".jinja") or tb.tb_frame.f_code.co_filename == name:
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return lineno


def render_files(templates, context: dict) -> dict[str, str]:
    """{file name: text} of each template in ``templates`` rendered with ``context`` (the
    file name is the template's, without folder and ``.jinja``)."""
    return {name.rsplit("/", 1)[-1].removesuffix(".jinja"): render_template(name, **context)
            for name in templates}


def render(what, backend=None, tuning: dict | None = None) -> Sources:
    """All source files of a `KernelPlan`, or of a spec (planned here with ``tuning`` and, for a
    cuda spec without an arch, the reference arch `cuda_plan.RENDER_ARCH`).  ``backend`` is
    ignored for a plan; for a spec it overrides ``spec.backend``.
    Returns `Sources`; raises TemplateError, or ValueError for a tuning the backend refuses."""
    if not isinstance(what, KernelPlan):
        spec = what if backend is None else what.replace(backend=backend.name)
        what = make_plan(spec, display_target(spec), tuning)
    return get_backend(what.backend).render(what)


def display_target(spec: MoESpec) -> str | None:
    """The target a spec renders for outside a build: its arch for cuda (the reference arch
    when it has none, so rendering needs no GPU), the backend's own choice otherwise."""
    if spec.backend == "cuda":
        return spec.arch or RENDER_ARCH
    return None
