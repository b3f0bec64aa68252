"""The backward binary: rendered from the forward's plan, keyed purely, kept in the kernel cache."""

import pytest

from moegen import backward, jit
from moegen.backends.c import CBackend
from moegen.backward import MoEBackward
from moegen.backward_build import (ENTRY_SUFFIX, BackwardPlan, backward_plan, key_parts,
                                   render_backward)
from moegen.cache import default_cache
from moegen.errors import SpecError
from moegen.spec import MoESpec

SPEC = MoESpec(num_experts=4, top_k=2, hidden_dim=24, ffn_dim=20, backend="c")
TOOLCHAIN = {"cc": "/usr/bin/cc", "version": "cc 1.0"}


def test_rendered_from_the_forward_plan():
    plan = backward_plan(SPEC)
    assert plan.forward == jit.plan_for(SPEC)
    text = render_backward(plan).text
    # the forward source is inside, from the same plan; the backward uses its constants
    assert CBackend().render(plan.forward).text.strip() in text
    assert f"#define kBwdChunk      {plan.chunk}" in text


def test_key_is_pure_and_follows_plan_and_sources():
    plan = backward_plan(SPEC)
    src = render_backward(plan)
    a = key_parts(plan, src, TOOLCHAIN)
    assert a == key_parts(plan, src, TOOLCHAIN)
    assert a["backward"] == {"chunk": plan.chunk}
    assert a["plan"] == plan.forward.to_dict()
    other = BackwardPlan(plan.forward, plan.chunk * 2)
    b = key_parts(other, render_backward(other), TOOLCHAIN)
    assert b["source"] != a["source"] and b["backward"] != a["backward"]
    saved = backward_plan(SPEC.replace(save_activations=True))
    c = key_parts(saved, render_backward(saved), TOOLCHAIN)
    assert c["plan"]["spec"]["save_activations"] is True and c["plan"] != a["plan"]


def test_built_once_then_read_from_the_cache(tmp_cache, monkeypatch):
    MoEBackward(SPEC)
    names = [e.name for e in default_cache().entries()]
    assert SPEC.name + ENTRY_SUFFIX in names

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled although the cache holds the backward")

    monkeypatch.setattr(CBackend, "compile", no_compiler)
    MoEBackward(SPEC)          # a new instance, no per-process memo: found in the cache


def test_a_corrupt_entry_is_rebuilt(tmp_cache):
    MoEBackward(SPEC)
    entry = next(e for e in default_cache().entries() if e.name == SPEC.name + ENTRY_SUFFIX)
    files = [p for p in tmp_cache.rglob("*") if p.is_file() and entry.key[:16] in p.name]
    assert files
    for p in files:
        p.write_bytes(b"not a binary")
    MoEBackward(SPEC)          # the damaged entry is a miss (or dropped), never a crash


def test_cuda_spec_is_refused_in_one_line():
    with pytest.raises(ValueError, match="the CUDA backward is moegen.backends.cuda_backward"):
        MoEBackward(SPEC.replace(backend="cuda"))


def test_save_activations_is_a_checked_spec_field_in_the_name():
    s = SPEC.replace(save_activations=True)
    assert s.name == SPEC.name + "_saveact"
    assert MoESpec.from_dict(s.to_dict()) == s
    with pytest.raises(SpecError, match="save_activations must be True or False, got 1"):
        SPEC.replace(save_activations=1)


def test_an_activation_without_a_derivative_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(backward, "ACT_GRAD", {"gelu": None, "relu": None})
    with pytest.raises(ValueError, match="MoEBackward has no gradient for activation='swiglu' yet"):
        MoEBackward(SPEC)


def test_a_spec_field_the_backward_does_not_handle_is_refused(monkeypatch):
    monkeypatch.setattr(backward, "BACKWARD_FIELDS", backward.BACKWARD_FIELDS - {"capacity_factor"})
    with pytest.raises(ValueError, match=r"has no gradient for MoESpec.capacity_factor=1.5 yet"):
        MoEBackward(SPEC.replace(capacity_factor=1.5))
    MoEBackward(SPEC)                   # at its default the field is fine
