"""The cuda dispatch kernels and the expert-parallel layer on one GPU (NCCL, one rank).

Marked ``gpu``; skipped without CuPy, torch CUDA and a device.  The plan/pack/combine kernels
are checked element by element against NumPy; the one-rank layer against the float64 reference
within the cuda backend's tolerance, with its outputs NaN-poisoned first.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from moegen import MoESpec, reference as R  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("module_cache")]

if not torch.cuda.is_available():
    pytest.skip("needs torch with CUDA and a device", allow_module_level=True)
from moegen.backends import cuda_usable  # noqa: E402
if not cuda_usable():
    pytest.skip("needs CuPy and a CUDA device", allow_module_level=True)

import cupy  # noqa: E402

from moegen.distributed.dispatch import dispatch_kernels  # noqa: E402


def _spec(dtype, shared=0):
    return MoESpec(16, 4, 256, 512, dtype=dtype, num_shared_experts=shared, backend="cuda")


@pytest.mark.parametrize("ranks", [1, 2, 8])
@pytest.mark.parametrize("tokens", [0, 1, 37, 1000])
def test_plan_pack_combine_match_numpy(ranks, tokens):
    from moegen.jit import resolve
    spec = resolve(_spec("bfloat16", shared=1))
    k, H, E, S = spec.top_k, spec.hidden_dim, spec.num_experts, spec.num_shared_experts
    kern = dispatch_kernels(spec, ranks)
    rng = np.random.default_rng(tokens)
    ids = np.array([rng.permutation(E)[:k] for _ in range(tokens)], np.int32).reshape(tokens, k)
    w = rng.random((tokens, k), dtype=np.float32)
    dev = torch.device("cuda")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
    n = max(1, tokens * k)
    send_counts = torch.full((ranks,), -1, dtype=torch.int32, device=dev)
    expert_counts = torch.full((E,), -1, dtype=torch.int32, device=dev)
    pos, src, eid = (torch.full((n,), -1, dtype=torch.int32, device=dev) for _ in range(3))
    wout = torch.full((n,), float("nan"), device=dev)
    # Keep the device copies alive until the kernel has run: a temporary's block goes back to
    # torch's caching allocator at once, and the next copy would reuse (overwrite) it.
    ids_d, w_d = t(ids), t(w)
    kern.plan(ids_d.data_ptr(), w_d.data_ptr(), tokens, send_counts.data_ptr(),
              expert_counts.data_ptr(), pos.data_ptr(), src.data_ptr(), eid.data_ptr(),
              wout.data_ptr())
    flat = ids.reshape(-1)
    dest = flat // (E // ranks)
    order = np.argsort(dest, kind="stable")                 # send rows: by rank, slot order
    want_pos = np.empty_like(order)
    want_pos[order] = np.arange(order.size)
    torch.cuda.synchronize()
    assert send_counts.cpu().numpy().tolist() == np.bincount(dest, minlength=ranks).tolist()
    assert expert_counts.cpu().numpy().tolist() == np.bincount(flat, minlength=E).tolist()
    m = tokens * k
    assert np.array_equal(pos.cpu().numpy()[:m], want_pos)
    assert np.array_equal(src.cpu().numpy()[:m], order // k)
    assert np.array_equal(eid.cpu().numpy()[:m], flat[order] % (E // ranks))
    assert np.array_equal(wout.cpu().numpy()[:m], w.reshape(-1)[order])

    x = torch.randn(max(tokens, 1), H, device=dev).to(torch.bfloat16)
    rows = torch.full((n, H), float("nan"), device=dev).to(torch.bfloat16)
    kern.pack(x.data_ptr(), src.data_ptr(), m, rows.data_ptr())
    torch.cuda.synchronize()
    assert torch.equal(rows[:m], x[torch.from_numpy(order // k).to(dev).long()])

    ret = torch.randn(n, H, device=dev)
    shared = torch.randn(max(1, tokens * S), H, device=dev)
    out = torch.full((max(tokens, 1), H), float("nan"), device=dev).to(torch.bfloat16)
    kern.combine(ret.data_ptr(), pos.data_ptr(), shared.data_ptr(), tokens, out.data_ptr())
    torch.cuda.synchronize()
    if tokens:
        r = ret.cpu().numpy()[want_pos].reshape(tokens, k, H)
        acc = r[:, 0].copy()
        for s in range(1, k):
            acc += r[:, s]
        acc += shared.cpu().numpy()[:tokens]
        want = torch.from_numpy(acc).to(torch.bfloat16)
        assert torch.equal(out[:tokens].cpu(), want)


@pytest.mark.parametrize("dtype,shared,chunks", [("bfloat16", 0, 1), ("bfloat16", 1, 2),
                                                 ("float32", 1, 1)])
@pytest.mark.parametrize("tokens", [1, 63, 300])
def test_one_rank_layer_matches_reference(dtype, shared, chunks, tokens):
    from moegen.distributed.launch import launch
    res = launch(_one_rank, 1, args=(_spec(dtype, shared), tokens, chunks), backend="nccl")[0]
    assert res["finite"] and res["vs_single"] <= res["tol"] and res["vs_ref"] <= res["tol"], res


def _one_rank(rank, spec, tokens, chunks):
    """One NCCL rank: the EP layer against the single-GPU layer (same routing kernel) and the
    float64 reference, as relative errors."""
    import moegen
    from moegen.distributed import ExpertParallelMoE
    x, w = R.random_problem(spec, tokens, seed=3)
    kw = R.weight_kwargs(spec, w)
    layer = ExpertParallelMoE(spec, max_tokens=4, chunks=chunks, **kw)
    xn = np.ascontiguousarray(x)
    bits = xn.view(np.int16) if xn.dtype.itemsize == 2 else xn
    y = layer(torch.from_numpy(bits).view(layer.torch_dtype).cuda()).float().cpu().numpy()
    kernel = moegen.compile(spec)
    single = kernel.to_host(kernel(cupy.asarray(xn.view(np.uint16) if xn.dtype.itemsize == 2 else xn),
                                   kernel.pack(**kw))).astype(np.float32)
    ref, _ = R.moe(spec, x, w)
    return {"finite": bool(np.isfinite(y).all()), "vs_single": R.rel_error(y, single),
            "vs_ref": R.rel_error(y, ref), "tol": spec.dt.tolerance}


def _nccl_ranks(rank, spec, tokens):
    """One rank of an NCCL group: its slice of the EP output, the single-GPU layer's slice on
    the concatenated tokens, whether they are bitwise equal, and the relative error."""
    import moegen
    from moegen.distributed import ExpertParallelMoE
    ranks = torch.distributed.get_world_size()
    x, w = R.random_problem(spec, tokens * ranks, seed=5)
    kw = R.weight_kwargs(spec, w)
    layer = ExpertParallelMoE(spec, max_tokens=tokens, **kw)
    xn = np.ascontiguousarray(x)
    bits = xn.view(np.int16) if xn.dtype.itemsize == 2 else xn
    mine = torch.from_numpy(bits[rank * tokens:(rank + 1) * tokens].copy())
    y, st = layer(mine.view(layer.torch_dtype).cuda(), return_stats=True)
    y = y.float().cpu().numpy()
    kernel = moegen.compile(spec)
    single, sst = kernel(cupy.asarray(xn.view(np.uint16) if xn.dtype.itemsize == 2 else xn),
                         kernel.pack(**kw), return_stats=True)
    single = kernel.to_host(single).astype(np.float32)[rank * tokens:(rank + 1) * tokens]
    return {"bitwise": bool(np.array_equal(y, single)), "rel": R.rel_error(y, single),
            "tol": spec.dt.tolerance,
            "counts_equal": st.tokens_per_expert.tolist() == sst.tokens_per_expert.tolist()}


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize("tokens", [128, 1024])
def test_nccl_ranks_match_single_gpu(ranks, tokens):
    """Several GPUs (skipped with fewer): the EP layer over NCCL against the single-GPU layer.
    Bitwise equality is reported, not required (the cuda GEMMs' tiles and split-K depend on the
    token count); the error must be within the dtype's tolerance."""
    if torch.cuda.device_count() < ranks:
        pytest.skip(f"needs {ranks} GPUs, {torch.cuda.device_count()} visible")
    from moegen.distributed.dispatch import prebuild
    from moegen.distributed.launch import launch
    spec = MoESpec(64, 8, 1024, 512, dtype="bfloat16", num_shared_experts=1, backend="cuda")
    prebuild(spec, ranks)
    res = launch(_nccl_ranks, ranks, args=(spec, tokens), backend="nccl")
    print(f"ranks={ranks} tokens={tokens}: bitwise {[r['bitwise'] for r in res]}, "
          f"rel {[round(r['rel'], 6) for r in res]}")
    for r in res:
        assert r["counts_equal"] and r["rel"] <= r["tol"], r
