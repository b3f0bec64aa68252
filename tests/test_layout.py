import numpy as np
import pytest

from moegen import MoESpec
from moegen import reference as R
from moegen.layout import PackedLayout, PackedWeights, logical_weights, pack_host, unpack_host


@pytest.mark.parametrize("orders", [("nk", "nk", 0, "eh"), ("kn", "kn", 0, "he"),
                                    ("nk", "kn", 4, "eh"), ("kn", "nk", 2, "he")])
@pytest.mark.parametrize("spec", [MoESpec(4, 2, 12, 8, dtype="bfloat16", bias=True,
                                          num_shared_experts=1),
                                  MoESpec(3, 1, 10, 6, activation="relu"),
                                  MoESpec(5, 2, 7, 6, dtype="float16", activation="geglu")],
                         ids=lambda s: s.name)
def test_pack_unpack_roundtrip(spec, orders):
    w13, w2, inter, router = orders
    if inter and spec.ffn_dim % inter:
        inter = 0
    lay = PackedLayout(spec, w13, w2, inter, router)
    x, w = R.random_problem(spec, 1)
    logical = logical_weights(spec, **R.weight_kwargs(spec, w))
    buf, r = pack_host(lay, logical)
    assert buf.shape == (lay.total,) and buf.dtype == spec.dt.numpy
    back = unpack_host(PackedWeights(buf, r, lay))
    for k, v in logical.items():
        if v is None:
            assert back[k] is None
        else:
            np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(v, np.float32), k)


def test_segments_are_aligned():
    spec = MoESpec(3, 1, 10, 6, dtype="bfloat16", bias=True)
    lay = PackedLayout(spec)
    for name, off in lay.offsets.items():
        assert off % lay.align == 0, name


def test_interleave_puts_gate_and_up_blocks_side_by_side():
    spec = MoESpec(2, 1, 4, 8)
    lay = PackedLayout(spec, gate_up_interleave=4)
    assert lay.gate_up_row_order().tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15]
    with pytest.raises(ValueError, match="gate_up_interleave"):
        PackedLayout(spec, gate_up_interleave=3)


def test_accepts_hf_lists_vllm_stacked_and_router_transposed():
    spec = MoESpec(3, 2, 6, 4)
    x, w = R.random_problem(spec, 1)
    a = logical_weights(spec, router=w["router"], w1=list(w["w1"]), w3=list(w["w3"]), w2=list(w["w2"]))
    b = logical_weights(spec, router=w["router"].T, w13=np.concatenate([w["w1"], w["w3"]], 1),
                        w2=w["w2"])
    for k in ("router", "w1", "w3", "w2"):
        np.testing.assert_array_equal(a[k], b[k])


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    spec = MoESpec(2, 1, 4, 4, dtype="bfloat16")
    x, w = R.random_problem(spec, 1)
    t = {k: torch.from_numpy(np.asarray(v, np.float32)).to(torch.bfloat16)
         for k, v in R.weight_kwargs(spec, w).items()}
    lw = logical_weights(spec, **t)
    np.testing.assert_array_equal(np.asarray(lw["w1"], np.float32), np.asarray(w["w1"], np.float32))


@pytest.mark.parametrize("kwargs, match", [
    (dict(w1="w1", w3="w3", w2="w2"), "router"),
    (dict(router="bad_router", w1="w1", w3="w3", w2="w2"), "router must have shape"),
    (dict(router="router", w1="w1_short", w3="w3", w2="w2"), r"w1 must have shape \(3, 4, 6\)"),
    (dict(router="router", w1="w1", w2="w2"), "w3"),
    (dict(router="router", w1="w1", w3="w3"), "w2 is required"),
    (dict(router="router", w1="w1", w3="w3", w2="w2", b1="b1"), "spec.bias is False"),
    (dict(router="router", w13="w13", w1="w1", w2="w2"), "either w13 or w1/w3"),
    (dict(router="router", w1="list2", w3="w3", w2="w2"), "one array per expert"),
])
def test_bad_weights_name_the_argument(kwargs, match):
    spec = MoESpec(3, 2, 6, 4)
    x, w = R.random_problem(spec, 1)
    pool = {"router": w["router"], "bad_router": w["router"][:2], "w1": w["w1"], "w3": w["w3"],
            "w2": w["w2"], "w1_short": w["w1"][:, :3], "b1": np.ones((3, 4)),
            "w13": np.concatenate([w["w1"], w["w3"]], 1), "list2": list(w["w1"][:2])}
    with pytest.raises(ValueError, match=match):
        logical_weights(spec, **{k: pool[v] for k, v in kwargs.items()})


def test_square_router_needs_explicit_layout():
    spec = MoESpec(4, 2, 4, 4)
    x, w = R.random_problem(spec, 1)
    kw = R.weight_kwargs(spec, w)
    with pytest.raises(ValueError, match="router_layout"):
        logical_weights(spec, **kw)
    lw = logical_weights(spec, router_layout="he", **kw)
    np.testing.assert_array_equal(lw["router"], w["router"].T)
