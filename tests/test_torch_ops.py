"""The moegen torch ops on the CPU (c backend): opcheck, torch.compile(fullgraph=True) with no
graph break, zero-copy use of the tensors, one-line refusals, and the import boundary."""

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is in the test extra: install '.[test]'")

import moegen  # noqa: E402
from moegen import MoESpec  # noqa: E402
from moegen import reference as R  # noqa: E402
from moegen.torch import MoEBlock, kernel_for, kernel_handle  # noqa: E402

pytestmark = pytest.mark.usefixtures("module_cache")

SPECS = [MoESpec(8, 2, 32, 48, backend="c"),
         MoESpec(6, 3, 24, 16, dtype="bfloat16", activation="geglu", bias=True, num_shared_experts=1,
                 backend="c"),
         MoESpec(8, 2, 16, 24, routing="sigmoid_topk", n_group=4, topk_group=2, dtype="float16",
                 routed_scaling_factor=2.5, backend="c")]


def _block(spec, seed=0):
    _, w = R.random_problem(spec, 0, seed)
    bias = None
    if spec.routing == "sigmoid_topk":
        bias = np.random.default_rng(seed).standard_normal(spec.num_experts).astype(np.float32) * 0.1
    return MoEBlock(spec, R.weight_kwargs(spec, w), router_bias=bias), w, bias


def _x(spec, T, seed=1):
    x, _ = R.random_problem(spec, T, seed)
    return torch.from_numpy(np.asarray(x, np.float32)).to(getattr(torch, spec.dtype))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_ops_pass_opcheck(spec):
    block, _, _ = _block(spec)
    x = _x(spec, 5)
    args = (x, block.packed, block.router, block.router_bias, block.handle)
    torch.library.opcheck(torch.ops.moegen.moe.default, args)
    torch.library.opcheck(torch.ops.moegen.route.default, args)
    ids, wts = block.route(x)
    torch.library.opcheck(torch.ops.moegen.experts.default,
                          (x, block.packed, block.router, ids, wts, block.handle))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("T", [1, 7, 64])
def test_block_matches_the_reference(spec, T):
    block, w, bias = _block(spec)
    x = _x(spec, T)
    y = block(x)
    ref, info = R.moe(spec, moegen.arrays.host(x), w, router_bias=bias)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert R.rel_error(moegen.arrays.host(y), ref) <= spec.dt.tolerance
    ids, wts = block.route(x)
    near = R.near_ties(info["probs"] + (0 if bias is None else bias), spec.top_k, 1e-2)
    np.testing.assert_array_equal(ids.numpy()[~near], info["topk_ids"][~near])
    y2 = torch.ops.moegen.experts(x, block.packed, block.router, ids, wts, block.handle)
    assert torch.equal(y2, y)


def test_compile_fullgraph_has_no_graph_break():
    spec = SPECS[0]
    block, w, _ = _block(spec)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(spec.hidden_dim)
            self.moe = block

        def forward(self, x):
            return x + self.moe(self.norm(x))

    net = Net().eval()
    x = _x(spec, 9).reshape(3, 3, spec.hidden_dim)
    from torch._dynamo.utils import counters
    counters.clear()
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad():
        got, want = compiled(x), net(x)
        got2 = compiled(_x(spec, 9, seed=4).reshape(3, 3, spec.hidden_dim))
    assert not counters["graph_break"]
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5) and got2.shape == x.shape


def test_tensors_are_used_zero_copy():
    spec = SPECS[0]
    block, _, _ = _block(spec)
    k = kernel_for(block.handle)
    from moegen.torch.ops import packed_weights
    pw = k._check_weights(packed_weights(k, block.handle, block.packed, block.router))
    assert pw.buffer.ctypes.data == block.packed.data_ptr()
    assert pw.router.ctypes.data == block.router.data_ptr()


def test_bad_inputs_are_one_line_errors():
    spec = SPECS[0]
    block, _, _ = _block(spec)
    with pytest.raises(TypeError, match="x must have dtype float32.*float64"):
        block(torch.zeros(2, spec.hidden_dim, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 32\]"):
        block(torch.zeros(2, 31))
    with pytest.raises(ValueError, match="weights.buffer must have shape"):
        torch.ops.moegen.moe(_x(spec, 2), block.packed[:16], block.router, None, block.handle)
    with pytest.raises(ValueError, match="kernel handle must be the JSON of a MoESpec"):
        torch.ops.moegen.moe(_x(spec, 2), block.packed, block.router, None, "nonsense")


def test_handle_names_the_spec_and_compiles_in_a_fresh_registry():
    from moegen.torch import ops
    spec = SPECS[0]
    block, _, _ = _block(spec)
    assert kernel_handle(block.kernel) == block.handle and '"num_experts":8' in block.handle
    saved = dict(ops._kernels)
    ops._kernels.clear()                     # as in a process that loaded a cached graph
    try:
        assert kernel_for(block.handle).spec == block.spec
    finally:
        ops._kernels.update(saved)


def test_a_saved_graph_runs_in_a_process_that_never_built_the_block(tmp_path):
    """A graph holds the kernel as its handle, the spec's JSON: a fresh process that loads the
    saved graph (torch.export) finds the right kernel from the graph alone (compiled, or loaded
    from the disk cache) and gives the same bits.  A process-local id or a digest known only to
    the process that made it would fail here."""
    spec = SPECS[1]                          # bf16, geglu, bias, a shared expert: not a default
    block, _, _ = _block(spec)
    x = _x(spec, 5)
    with torch.no_grad():
        y = block(x)
        program = torch.export.export(block.eval(), (x,))
    assert block.handle in program.graph_module.code
    torch.export.save(program, tmp_path / "moe.pt2")
    torch.save({"x": x, "y": y}, tmp_path / "io.pt")
    code = ("import sys, torch\n"
            "from moegen.torch import ops\n"
            "program = torch.export.load(sys.argv[1])\n"
            "io = torch.load(sys.argv[2])\n"
            "assert not ops._kernels, list(ops._kernels)\n"
            "with torch.no_grad():\n"
            "    y = program.module()(io['x'])\n"
            "assert torch.equal(y, io['y']), (y - io['y']).abs().max()\n"
            "assert list(ops._kernels) == [sys.argv[3]]\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "moe.pt2"), str(tmp_path / "io.pt"),
                    block.handle], check=True)


def test_import_moegen_does_not_import_torch():
    code = "import sys, moegen; moegen.MoESpec(8, 2, 32); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_block_refuses_a_backward_through_itself():
    """The ops are non-differentiable; the block says so in one line on backward instead of
    leaving x silently without a gradient."""
    spec = SPECS[0]
    block, _, _ = _block(spec)
    x = _x(spec, 3).requires_grad_()
    y = block(x)
    assert y.requires_grad
    with pytest.raises(RuntimeError, match="MoEBlock has no backward"):
        y.sum().backward()
    with torch.no_grad():
        assert torch.equal(block(x), y.detach())


def test_op_dispatch_is_direct():
    """The ops' bodies sit on the CPU/CUDA keys and their autograd key is a fallthrough, so a
    call does not go through custom_op's Python autograd wrapper (the ~7 µs cut)."""
    for name in ("moe", "route", "experts"):
        op = f"moegen::{name}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "Autograd")
    spec = SPECS[0]
    block, _, _ = _block(spec)
    x = _x(spec, 2)
    y = torch.ops.moegen.moe(x, block.packed, block.router, None, block.handle)
    assert not y.requires_grad and torch.equal(y, block(x))


def test_a_deleted_block_frees_its_weights():
    """The ops' memo of validated weights keeps no tensor alive: deleting a block frees them."""
    import gc
    import weakref

    from moegen.torch import MoEBlock
    spec = MoESpec(4, 2, 32, 48, backend="c")
    rng = np.random.default_rng(3)
    w = {"router": rng.standard_normal((4, 32), dtype=np.float32),
         "w1": rng.standard_normal((4, 48, 32), dtype=np.float32) / 6,
         "w3": rng.standard_normal((4, 48, 32), dtype=np.float32) / 6,
         "w2": rng.standard_normal((4, 32, 48), dtype=np.float32) / 7}
    block = MoEBlock(spec, w)
    x = torch.from_numpy(rng.standard_normal((3, 32), dtype=np.float32))
    with torch.no_grad():
        block(x)
        torch.ops.moegen.moe(x, block.packed, block.router, None, block.handle)
    alive = [weakref.ref(t) for t in (block.packed, block.router)]
    del block
    gc.collect()
    assert all(r() is None for r in alive)
