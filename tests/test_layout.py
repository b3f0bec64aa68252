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


# -- packing on the device, expert-parallel shards (issue 12 item 2) -----------------------------
PACK_DEVICE_SPECS = [MoESpec(4, 2, 12, 8, dtype="bfloat16", bias=True, num_shared_experts=1),
                     MoESpec(3, 1, 10, 6, activation="relu", bias=True),
                     MoESpec(5, 2, 7, 6, dtype="float16", activation="geglu"),
                     MoESpec(4, 2, 8, 6, dtype="bfloat16", num_shared_experts=2,
                             shared_expert_gate=True)]


def _device_source(spec, lib: str) -> dict:
    """`logical_weights`' dict of a random problem as ``lib`` arrays (float32, so packing casts):
    numpy / torch stacked [n, ...] arrays; torch-same the same in the spec dtype (no cast: the
    word copies); torch-list per-expert lists; torch-views strided views (W1 and W3 halves of
    one [n, 2F, H] tensor, b1 / b3 of one [n, 2F], w2 a transpose)."""
    _, w = R.random_problem(spec, 0, seed=3)
    logical = logical_weights(spec, **R.weight_kwargs(spec, w))
    src = {k: (v if k == "expert_ids" or v is None else np.asarray(v, np.float32))
           for k, v in logical.items()}
    if lib == "numpy":
        return src
    torch = pytest.importorskip("torch")
    t = {k: (v if k == "expert_ids" or v is None else torch.from_numpy(v)) for k, v in src.items()}
    per_expert = ("w1", "w3", "w2", "b1", "b3", "b2")
    if lib == "torch-same":
        t = {k: (v if k == "expert_ids" or v is None else v.to(getattr(torch, spec.dtype)))
             for k, v in t.items()}
    elif lib == "torch-list":
        t.update({k: list(t[k]) for k in per_expert if t[k] is not None})
    elif lib == "torch-views":
        if spec.gated:
            w13 = torch.cat([t["w1"], t["w3"]], 1)
            t["w1"], t["w3"] = w13[:, :spec.ffn_dim], w13[:, spec.ffn_dim:]
            if spec.bias:
                b13 = torch.cat([t["b1"], t["b3"]], 1)
                t["b1"], t["b3"] = b13[:, :spec.ffn_dim], b13[:, spec.ffn_dim:]
        t["w2"] = t["w2"].transpose(1, 2).contiguous().transpose(1, 2)
        assert not t["w2"].is_contiguous()
    return t


@pytest.mark.parametrize("orders", [("nk", "nk", 0, "eh"), ("kn", "kn", 0, "he"),
                                    ("nk", "kn", 2, "eh"), ("kn", "nk", 2, "he")])
@pytest.mark.parametrize("spec", PACK_DEVICE_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("lib", ["numpy", "torch", "torch-same", "torch-list", "torch-views"])
def test_pack_device_writes_the_bytes_of_pack_host(spec, orders, lib):
    """The library-neutral packer (the cuda path runs it on torch CUDA / CuPy arrays) writes
    exactly pack_host's bytes; run here on NumPy and on torch CPU tensors (stacked, per-expert
    lists, strided views), with a dtype cast."""
    from moegen.layout import pack_device
    w13, w2, inter, router = orders
    lay = PackedLayout(spec, w13, w2, inter if spec.gated else 0, router)
    _, w = R.random_problem(spec, 0, seed=3)
    want_buf, want_router = pack_host(lay, logical_weights(spec, **R.weight_kwargs(spec, w)))
    src = _device_source(spec, lib)
    if lib.startswith("torch"):
        import torch
        tdt = getattr(torch, spec.dtype)
        buf, r = pack_device(lay, src, lambda shape: torch.zeros(shape, dtype=tdt))
        buf, r = R.f64(buf.float().numpy()), R.f64(r.float().numpy())
    else:
        buf, r = pack_device(lay, src, lambda shape: np.zeros(shape, dtype=spec.dt.numpy))
    np.testing.assert_array_equal(np.asarray(buf, np.float64), R.f64(want_buf))
    np.testing.assert_array_equal(np.asarray(r, np.float64), R.f64(want_router))


@pytest.mark.parametrize("same_dtype", [False, True])
@pytest.mark.parametrize("experts", [4, 64])
def test_pack_device_copies_stacked_weights_in_a_few_copies_whatever_the_experts(experts, same_dtype):
    """Stacked weights take a fixed number of tensor copies (the GPU's kernel launches), not a
    few per expert: one per W1 / W3 / W2 / bias part and the router, here 7 (w1, w3, w2, b1,
    b3, b2, router) for 4 and for 64 experts.  Sources already in the buffer's dtype move as
    8-byte words where their rows allow: all but b1 / b3 (rows of 2 interleaved elements)."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode
    from moegen.layout import pack_device

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = self.words = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten.copy_:
                self.copies += 1
                self.words += args[0].dtype == torch.int64
            return func(*args, **(kwargs or {}))

    spec = MoESpec(experts, 2, 16, 8, dtype="bfloat16", bias=True)
    lay = PackedLayout(spec, "nk", "nk", 2, "eh")
    src = _device_source(spec, "torch-same" if same_dtype else "torch")
    with CountCopies() as mode:
        buf, _ = pack_device(lay, src, lambda shape: torch.zeros(shape, dtype=torch.bfloat16))
    assert mode.copies == 7 and mode.words == (5 if same_dtype else 0)
    assert torch.equal(buf.view(torch.int16), torch.from_numpy(
        pack_host(lay, logical_weights(spec, **R.weight_kwargs(spec, R.random_problem(spec, 0, seed=3)[1])))[0]
        .view(np.int16)))


def test_shard_takes_its_experts_from_whole_or_sliced_weights():
    spec = MoESpec(3, 2, 8, 6)
    full = MoESpec(8, 2, 8, 6)
    _, w = R.random_problem(full, 1)
    ids = [5, 1, 6]
    a = logical_weights(spec, w1=w["w1"], w3=w["w3"], w2=w["w2"], expert_ids=ids)
    b = logical_weights(spec, w1=w["w1"][ids], w3=list(w["w3"][ids]), w2=w["w2"][ids], expert_ids=ids)
    for k in ("w1", "w3", "w2"):
        np.testing.assert_array_equal(a[k], w[k][ids])
        np.testing.assert_array_equal(b[k], w[k][ids])
    assert a["router"] is None and a["expert_ids"] == (5, 1, 6)
    with pytest.raises(ValueError, match="router must be None"):
        logical_weights(spec, router=w["router"], w1=w["w1"], w3=w["w3"], w2=w["w2"], expert_ids=ids)
    for bad in ([5, 1], [5, 5, 1], [5, -1, 2], [5, 1, 2.0]):
        with pytest.raises(ValueError, match="expert_ids must list 3 distinct"):
            logical_weights(spec, w1=w["w1"], w3=w["w3"], w2=w["w2"], expert_ids=bad)
    packed = PackedWeights(None, None, PackedLayout(spec), (5, 1, 6))
    np.testing.assert_array_equal(packed.local_ids(np.array([[6, 5], [1, 6]])), [[2, 0], [1, 2]])
    with pytest.raises(ValueError, match=r"global_ids must be experts of this shard.*\[2\]"):
        packed.local_ids(np.array([[2, 5]]))
