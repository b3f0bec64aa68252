"""The index arithmetic of the CUDA capacity path (templates/cuda/capacity.cu.jinja), emulated
exactly in NumPy and checked against `reference.apply_capacity`.  Runs without a GPU.

What is emulated, step for step: the first group pass's padded segments (scan_experts: every
expert padded to bm rows, in expert order, slots in slot order), moe_capacity_select (the
segment start recomputed from counts, "token": first cap of the segment, "weight": the 64-bit
keep key and the bit-by-bit search for the cap-th largest key), moe_capacity_renorm (fp32,
slot order) and the masked second pass (counts of kept slots).  The kernels themselves are
checked against the reference on a GPU by tests/test_cuda_gpu.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from moegen import reference
from moegen.spec import MoESpec


def keep_key(w: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """keep_key() of capacity.cu.jinja for float32 weights and int slots -> uint64 keys."""
    w = np.asarray(w, dtype=np.float32)
    w = np.where(w == 0, np.float32(0.0), w).astype(np.float32)     # -0 -> +0
    u = w.view(np.uint32).astype(np.uint64)
    u = np.where(u & 0x80000000, (~u) & 0xFFFFFFFF, u | 0x80000000)
    u = np.where(np.isnan(w), 0, u).astype(np.uint64)
    low = (0xFFFFFFFF - np.asarray(slot, dtype=np.uint64)) & 0xFFFFFFFF
    return (u << np.uint64(32)) | low


def cap_threshold(keys: np.ndarray, cap: int) -> np.uint64:
    """The kernel's search: the largest theta with at least cap keys >= theta."""
    theta = 0
    for bit in range(63, -1, -1):
        cand = theta | (1 << bit)
        if int(np.sum(keys >= np.uint64(cand))) >= cap:
            theta = cand
    return np.uint64(theta)


def first_pass(ids: np.ndarray, spec: MoESpec, bm: int):
    """counts [E] and padded sorted_rows of the ordinary group pass (slot = t*K_TOTAL + s)."""
    T, K = ids.shape
    S = spec.num_shared_experts
    kt = K + S
    slot_exp = np.concatenate([ids, np.broadcast_to(np.arange(S) + spec.num_experts, (T, S))],
                              axis=1).reshape(-1)
    rows = []
    counts = np.zeros(spec.num_experts + S, dtype=np.int64)
    for e in range(spec.num_experts + S):
        seg = np.nonzero(slot_exp == e)[0]
        counts[e] = len(seg)
        pad = -(-len(seg) // bm) * bm
        rows.append(np.concatenate([seg, -np.ones(pad - len(seg), dtype=np.int64)]))
    assert kt * T == int(counts.sum())
    return counts[:spec.num_experts], np.concatenate(rows) if rows else np.zeros(0, np.int64)


def emulate(spec: MoESpec, ids: np.ndarray, weights: np.ndarray, bm: int):
    """kept [T, K] bool, dropped [E], cap_weights [T, K] float32 (None without renormalize),
    second-pass counts [E] -- as the kernels compute them."""
    T, K = ids.shape
    kt = K + spec.num_shared_experts
    cap = min(reference.capacity(spec, T), T * K)
    counts, sorted_rows = first_pass(ids, spec, bm)
    kept = np.full(T * K, 255, dtype=np.uint8)          # poison: every slot must be written
    dropped = np.zeros(spec.num_experts, dtype=np.int64)
    flat_w = weights.reshape(-1).astype(np.float32)
    for e in range(spec.num_experts):                    # one block per routed expert
        n = int(counts[e])
        start = int(sum(-(-int(counts[j]) // bm) * bm for j in range(e)))
        dropped[e] = n - cap if n > cap else 0
        seg = sorted_rows[start:start + n]
        assert np.all(seg >= 0)
        routed = (seg // kt) * K + (seg % kt)            # routed_index()
        assert np.all(seg % kt < K)
        if spec.capacity_drop == "weight":
            keys = keep_key(flat_w[routed], seg)
            if n > cap and cap > 0:
                theta = cap_threshold(keys, cap)
                keep = keys >= theta
            else:
                keep = np.full(n, n <= cap)
        else:
            keep = np.arange(n) < cap
        kept[routed] = keep
    assert np.all(kept != 255), "a routed slot was in no segment"
    kept = kept.reshape(T, K).astype(bool)
    cap_w = None
    if spec.renormalize:
        w32 = weights.astype(np.float32)
        cap_w = np.zeros((T, K), dtype=np.float32)
        for t in range(T):
            before = np.float32(0)
            after = np.float32(0)
            for s in range(K):
                before = np.float32(before + w32[t, s])
                after = np.float32(after + (w32[t, s] if kept[t, s] else np.float32(0)))
            with np.errstate(divide="ignore", invalid="ignore"):
                scale = np.float32(before / after)
            for s in range(K):
                cap_w[t, s] = w32[t, s] * scale if (kept[t, s] and after > 0) else 0.0
    counts2 = np.bincount(ids[kept], minlength=spec.num_experts)
    return kept, dropped, cap_w, counts2


def skewed_routing(spec: MoESpec, T: int, seed: int, ties: bool):
    """Distinct ids per token with most tokens sending slot 0 to expert 0; weights in [0, 1)
    (coarsely quantised when ``ties``, so many compare equal)."""
    rng = np.random.default_rng(seed)
    E, K = spec.num_experts, spec.top_k
    ids = np.stack([rng.permutation(E)[:K] for _ in range(T)]).astype(np.int32) if T else \
        np.zeros((0, K), np.int32)
    hot = rng.random(T) < 0.8
    for t in np.nonzero(hot)[0]:
        row = ids[t]
        j = np.nonzero(row == 0)[0]
        if len(j):
            row[j[0]], row[0] = row[0], row[j[0]]
        else:
            row[0] = 0
    w = rng.random((T, K)).astype(np.float32)
    if ties:
        w = (np.floor(w * 4) / 4).astype(np.float32)
    w = -np.sort(-w, axis=1)                                # descending, as routing gives
    return ids, w.astype(np.float32)


SPECS = [
    MoESpec(8, 2, 64, 64, capacity_factor=1.0),
    MoESpec(8, 2, 64, 64, capacity_factor=1.0, capacity_drop="weight"),
    MoESpec(4, 1, 64, 64, capacity_factor=0.5, capacity_drop="weight", renormalize=False),
    MoESpec(16, 3, 64, 64, capacity_factor=1.25, num_shared_experts=2),
    MoESpec(16, 3, 64, 64, capacity_factor=0.75, capacity_drop="weight", num_shared_experts=1),
    MoESpec(64, 6, 64, 64, capacity_factor=2.0, capacity_drop="weight"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("T", [1, 2, 15, 16, 17, 63, 64, 65, 300])
@pytest.mark.parametrize("ties", [False, True])
def test_emulated_capacity_matches_reference(spec, T, ties):
    ids, w = skewed_routing(spec, T, seed=T * 7 + int(ties), ties=ties)
    for bm in (16, 64):
        kept, dropped, cap_w, counts = emulate(spec, ids, w, bm)
        ref_w, ref_kept, ref_dropped = reference.apply_capacity(spec, ids, w)
        np.testing.assert_array_equal(kept, ref_kept)
        assert int(dropped.sum()) == ref_dropped
        np.testing.assert_array_equal(counts, np.bincount(ids[ref_kept], minlength=spec.num_experts))
        if spec.renormalize:
            np.testing.assert_allclose(cap_w, ref_w, rtol=1e-6, atol=1e-7)


def test_skew_actually_drops():
    spec = MoESpec(8, 2, 64, 64, capacity_factor=1.0, capacity_drop="weight")
    ids, w = skewed_routing(spec, 300, seed=1, ties=True)
    _, dropped, _, _ = emulate(spec, ids, w, 64)
    assert dropped[0] > 100 and dropped.sum() == dropped[0]


def test_weight_key_orders_like_the_reference():
    """NaN below -inf, -0 tied with +0 (lower slot wins), negatives below positives."""
    w = np.array([np.nan, -np.inf, -1.0, -0.0, 0.0, 1e-30, 0.5, 0.5, np.inf, np.nan], np.float32)
    slots = np.arange(len(w))
    keys = keep_key(w, slots)
    order = sorted(range(len(w)), key=lambda i: int(keys[i]), reverse=True)
    ref = np.argsort(-w.astype(np.float64), kind="stable")
    assert list(order) == list(ref)
    for cap in range(1, len(w)):
        theta = cap_threshold(keys, cap)
        assert int(np.sum(keys >= theta)) == cap
        assert set(np.nonzero(keys >= theta)[0]) == set(ref[:cap])
