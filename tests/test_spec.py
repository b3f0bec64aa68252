import dataclasses
import pickle

import pytest

from moegen import MoESpec, SpecError
from moegen.dtypes import DTYPES, lookup
from moegen.spec import spec_name


def test_defaults_and_name():
    s = MoESpec(num_experts=8, top_k=2, hidden_dim=512)
    assert s.ffn_dim == 2048
    assert s.dtype == "float32" and s.activation == "swiglu"
    assert s.name == "moe_e8_k2_h512_f2048_fp32_swiglu"
    assert MoESpec(8, 2, 512, dtype="bf16").name == "moe_e8_k2_h512_f2048_bf16_swiglu"


def test_name_lists_non_defaults_in_fixed_order():
    s = MoESpec(256, 8, 7168, 2048, dtype="bf16", routing="sigmoid_topk", n_group=8,
                topk_group=4, routed_scaling_factor=2.5, num_shared_experts=1, bias=True,
                renormalize=False)
    assert s.name == ("moe_e256_k8_h7168_f2048_bf16_swiglu_sigmoid_raw_bias_g8_tg4_rs2p5_sh1")


def test_every_field_but_backend_and_arch_changes_the_name():
    base = MoESpec(8, 2, 64, 128)
    changes = dict(num_experts=16, top_k=1, hidden_dim=32, ffn_dim=96, dtype="float16",
                   activation="gelu", routing="topk_softmax", renormalize=False, bias=True,
                   num_shared_experts=1, capacity_factor=1.25, capacity_drop="weight",
                   routed_scaling_factor=2.0)
    for field, value in changes.items():
        assert base.replace(**{field: value}).name != base.name, field
    assert base.replace(backend="c").name == base.name


def test_no_deterministic_option():
    # the combine is always a fixed-order gather; an option nothing reads is refused
    with pytest.raises(TypeError):
        MoESpec(8, 2, 64, deterministic=False)
    with pytest.raises(SpecError, match="deterministic"):
        MoESpec.from_dict({**MoESpec(8, 2, 64).to_dict(), "deterministic": False})


def test_frozen_hashable_picklable():
    s = MoESpec(8, 2, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_k = 3
    assert {s: 1}[MoESpec(8, 2, 64, dtype="fp32")] == 1
    assert pickle.loads(pickle.dumps(s)) == s
    assert MoESpec.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=0, top_k=1, hidden_dim=8), "num_experts"),
    (dict(num_experts=8, top_k=9, hidden_dim=8), "top_k"),
    (dict(num_experts=8, top_k=0, hidden_dim=8), "top_k"),
    (dict(num_experts=8, top_k=2, hidden_dim=0), "hidden_dim"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, ffn_dim=-1), "ffn_dim"),
    (dict(num_experts=8, top_k=2, hidden_dim=8.0), "hidden_dim"),
    (dict(num_experts=True, top_k=1, hidden_dim=8), "num_experts"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, dtype="int8"), "dtype"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, activation="tanh"), "activation"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, routing="hash"), "routing"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, backend="metal"), "backend"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, arch="sm90"), "arch"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, arch="sm_90; rm -rf /"), "arch"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, renormalize="yes"), "renormalize"),
    (dict(num_experts=10, top_k=2, hidden_dim=8, routing="sigmoid_topk", n_group=4), "n_group"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, routing="topk_softmax", n_group=2), "n_group"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, routing="sigmoid_topk", n_group=2,
          topk_group=3), "topk_group"),
    (dict(num_experts=8, top_k=5, hidden_dim=8, routing="sigmoid_topk", n_group=4,
          topk_group=2), "top_k"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, routed_scaling_factor=float("nan")),
     "routed_scaling_factor"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, capacity_factor=0), "capacity_factor"),
    (dict(num_experts=8, top_k=2, hidden_dim=8, capacity_drop="random"), "capacity_drop"),
])
def test_bad_fields_name_the_field(kwargs, field):
    with pytest.raises(SpecError) as info:
        MoESpec(**kwargs)
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unknown_fields_rejected():
    with pytest.raises(SpecError, match="unknown fields"):
        MoESpec.from_dict({"num_experts": 8, "top_k": 2, "hidden_dim": 8, "experts": 3})


def test_dtype_table():
    for name, row in DTYPES.items():
        assert lookup(name) is row
        for alias in row.aliases:
            assert lookup(alias) is row
        assert row.numpy.itemsize == row.itemsize
    assert lookup("BF16").name == "bfloat16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        lookup("float64")


def test_flops():
    s = MoESpec(8, 2, 512, 2048)
    assert s.flops(4) == 2 * 4 * 2 * 3 * 512 * 2048
    assert MoESpec(8, 2, 512, 2048, activation="relu").flops(1) == 2 * 2 * 2 * 512 * 2048


def test_spec_name_is_the_one_name_function():
    s = MoESpec(64, 6, 100, 257, dtype="fp16", activation="geglu")
    assert spec_name(s) == s.name == "moe_e64_k6_h100_f257_fp16_geglu"
