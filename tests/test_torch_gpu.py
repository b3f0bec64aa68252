"""moegen.torch on a GPU: ops on CUDA tensors (bf16, fp16) against the reference, packing on the
device (bytes equal to the host packer, no host copy), torch.compile, CUDA-graph capture with
no synchronisation, the device-index check, and examples/decode_graph.py.  Marked ``gpu``."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs torch with a CUDA device", allow_module_level=True)
pytest.importorskip("cupy")

import moegen  # noqa: E402
from moegen import MoESpec  # noqa: E402
from moegen import reference as R  # noqa: E402
from moegen.layout import pack_host, logical_weights  # noqa: E402
from moegen.torch import MoEBlock  # noqa: E402

SPECS = [MoESpec(8, 2, 256, 512, dtype="bfloat16", backend="cuda"),
         MoESpec(16, 4, 128, 96, dtype="float16", activation="geglu", num_shared_experts=1,
                 backend="cuda")]


def _cuda_weights(spec, seed=0):
    _, w = R.random_problem(spec, 0, seed)
    kw = {k: torch.from_numpy(R.f64(v).astype(np.float32)).cuda() for k, v in R.weight_kwargs(spec, w).items()}
    return w, kw


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_pack_on_device_equals_host_pack(spec):
    k = moegen.compile(spec)
    w, kw = _cuda_weights(spec)
    packed = k.pack(**kw)
    assert isinstance(packed.buffer, torch.Tensor) and packed.buffer.is_cuda
    want_buf, want_router = pack_host(k.layout, logical_weights(spec, **R.weight_kwargs(spec, w)))
    got = packed.buffer.view(torch.int16).cpu().numpy()
    np.testing.assert_array_equal(got, want_buf.view(np.int16))
    np.testing.assert_array_equal(packed.router.view(torch.int16).cpu().numpy(), want_router.view(np.int16))
    import cupy
    cp_kw = {k_: cupy.asarray(v.cpu().numpy()) for k_, v in kw.items()}
    cp_packed = k.pack(**cp_kw)                              # CuPy in: packed by CuPy, fp32 -> bits
    np.testing.assert_array_equal(cupy.asnumpy(cp_packed.buffer).view(np.int16), want_buf.view(np.int16))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("T", [1, 7, 300])
def test_block_on_cuda_matches_reference(spec, T):
    w, kw = _cuda_weights(spec)
    block = MoEBlock(spec, kw)
    x, _ = R.random_problem(spec, T, seed=1)
    xt = torch.from_numpy(R.f64(x).astype(np.float32)).to(getattr(torch, spec.dtype)).cuda()
    y = block(xt)
    y2 = torch.ops.moegen.moe(xt, block.packed, block.router, None, block.handle)
    ref, _ = R.moe(spec, x, w)
    assert R.rel_error(y.float().cpu().numpy(), ref) <= spec.dt.tolerance
    assert torch.equal(y, y2)


def test_graph_capture_compile_and_no_sync():
    spec = SPECS[0]
    _, kw = _cuda_weights(spec)
    block = MoEBlock(spec, kw)
    x = torch.randn(5, spec.hidden_dim, device="cuda", dtype=torch.bfloat16)
    want = block(x)
    torch.cuda.set_sync_debug_mode("error")
    try:
        block(x)
        torch.ops.moegen.route(x, block.packed, block.router, None, block.handle)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    compiled = torch.compile(block, fullgraph=True)
    assert torch.equal(compiled(x), want)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        block(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = block(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensor_on_another_device_is_refused():
    spec = SPECS[0]
    _, kw = _cuda_weights(spec)
    block = MoEBlock(spec, kw)
    other = 1 if block.kernel.device_index == 0 else 0
    x = torch.randn(3, spec.hidden_dim, device=f"cuda:{other}", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"must be on cuda:{block.kernel.device_index}"):
        block(x)


def test_decode_graph_example_runs():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "examples" / "decode_graph.py"), "--steps", "20"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0 and "replay == eager: OK" in proc.stdout, proc.stdout + proc.stderr


def test_launches_follow_the_current_torch_stream():
    """x is written on a side stream behind a long sleep; the block and the op called on that
    stream must run after the write (on torch's current stream), so both see the new x."""
    spec = SPECS[0]
    w, kw = _cuda_weights(spec)
    block = MoEBlock(spec, kw)
    x1, _ = R.random_problem(spec, 3, seed=11)
    x2, _ = R.random_problem(spec, 3, seed=12)
    dev = lambda a: torch.from_numpy(R.f64(a).astype(np.float32)).to(torch.bfloat16).cuda()  # noqa: E731
    xs, new = dev(x1), dev(x2)
    block(xs)                                       # recorded on the default stream
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)              # ~50 ms of GPU time ahead of the write
        xs.copy_(new)
        y = block(xs)
        y2 = torch.ops.moegen.moe(xs, block.packed, block.router, None, block.handle)
    torch.cuda.synchronize()
    ref, _ = R.moe(spec, x2, w)
    assert R.rel_error(y.float().cpu().numpy(), ref) <= spec.dt.tolerance
    assert torch.equal(y, y2)


def test_op_host_time_is_near_the_raw_call():
    """The torch op's host time over the raw callable's, both replaying recorded launches
    (a loose bound for a shared machine; benchmarks/torch_overhead.py measures it)."""
    import time
    from moegen.torch.ops import packed_weights
    spec = SPECS[0]
    _, kw = _cuda_weights(spec)
    block = MoEBlock(spec, kw)
    x = torch.randn(1, spec.hidden_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    k, op = block.kernel, torch.ops.moegen.moe
    packed = packed_weights(k, block.handle, block.packed, block.router)

    def best(fn, n=200, rounds=15):
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t) / n)
            torch.cuda.synchronize()
        return min(times) * 1e6
    with torch.no_grad():
        raw = best(lambda: k(x, packed, out=out))
        via_op = best(lambda: op(x, block.packed, block.router, None, block.handle))
    assert via_op - raw < 15, (raw, via_op)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_call_with_another_device_current_runs_on_the_kernels_device():
    """Tensors on the kernel's device while another device is current: the launches go to
    the kernel's device (and torch's stream there)."""
    spec = SPECS[0]
    w, kw = _cuda_weights(spec)
    block = MoEBlock(spec, kw)
    x, _ = R.random_problem(spec, 5, seed=13)
    xt = torch.from_numpy(R.f64(x).astype(np.float32)).to(torch.bfloat16).to(block.packed.device)
    want = block(xt)
    other = 1 if block.kernel.device_index == 0 else 0
    with torch.cuda.device(other):
        y = block(xt)
    torch.cuda.synchronize()
    assert torch.equal(y, want)


def test_trainable_block_on_cuda_trains_with_the_training_ops_gradients():
    """MoEBlock(trainable=True) on the cuda backend: bf16 parameters on the GPU, the same
    output, aux loss and gradients (bitwise) as moegen.torch.autograd.moe_train on the same
    tensors, and a few SGD steps lower the loss."""
    from moegen.torch.autograd import moe_train
    spec = MoESpec(8, 2, 256, 128, dtype="bfloat16", backend="cuda")
    _, kw = _cuda_weights(spec, seed=4)
    block = MoEBlock(spec, kw, trainable=True)
    params = list(block.parameters())
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in params)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(40, 256, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(40, 256, device="cuda", generator=g)
    y = block(x)
    (y.float() * dy).sum().add(0.5 * block.aux_loss.float()).backward()
    x2 = x.detach().clone().requires_grad_()
    p2 = [p.detach().clone().requires_grad_() for p in params]
    y2, aux2 = moe_train(block.spec, x2, p2)
    (y2.float() * dy).sum().add(0.5 * aux2.float()).backward()
    assert torch.equal(y, y2) and torch.equal(block.aux_loss, aux2)
    assert torch.equal(x.grad, x2.grad)
    for (name, p), q in zip(block.named_parameters(), p2):
        assert p.grad is not None and torch.equal(p.grad, q.grad), name
    target = torch.randn(64, 256, device="cuda", generator=g).to(torch.bfloat16) * 0.1
    xs = torch.randn(64, 256, device="cuda", generator=g).to(torch.bfloat16)
    opt = torch.optim.SGD(block.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((block(xs).float() - target.float()) ** 2).mean() + block.aux_loss.float()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
