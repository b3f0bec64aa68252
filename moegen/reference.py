"""A float64 NumPy reference of every stage of the layer.

Readable first, fast second.  Inputs may be any float dtype (bf16 via ml_dtypes); everything is
computed in float64 from the stored values.  Expert weights are the *logical* ones of
`moegen.layout.logical_weights` (nn.Linear orientation): router [E, H], w1/w3 [E(+S), F, H],
w2 [E(+S), H, F], biases [E(+S), F] / [E(+S), H].
"""

from __future__ import annotations

import math

import numpy as np

from .spec import MoESpec

_erf = np.vectorize(math.erf, otypes=[np.float64])


def f64(a) -> np.ndarray:
    return None if a is None else np.asarray(a).astype(np.float64)


# -- activations ---------------------------------------------------------------------------
def silu(g):
    return g / (1.0 + np.exp(-g))


def gelu(g):
    """Exact (erf) GELU, as torch.nn.functional.gelu's default."""
    return 0.5 * g * (1.0 + _erf(g / math.sqrt(2.0)))


def relu(g):
    return np.maximum(g, 0.0)


ACT_FN = {"silu": silu, "gelu": gelu, "relu": relu}


def clamped_swiglu(g, u, alpha: float, limit: float):
    """GPT-OSS's gated activation: g' = min(g, limit), u' = clamp(u, -limit, limit),
    g'·sigmoid(alpha·g')·(u' + 1).  NaN passes through (np.minimum/np.clip keep it)."""
    g = np.minimum(g, limit)
    u = np.clip(u, -limit, limit)
    return g / (1.0 + np.exp(-alpha * g)) * (u + 1.0)


# -- route -----------------------------------------------------------------------------------
def router_logits(x, router, router_bias=None) -> np.ndarray:
    """[T, E] = x · routerᵀ (+ bias)."""
    logits = f64(x) @ f64(router).T
    if router_bias is not None:
        logits = logits + f64(router_bias)
    return logits


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=-1, keepdims=True)


def topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first; ties go to the lower index and
    NaN ranks below every number, so the ids are always valid."""
    key = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-key, axis=-1, kind="stable")[:, :k]


def route(spec: MoESpec, x, router, router_bias=None, selection_bias=None):
    """Routing for ``spec.routing``.

    Returns (topk_ids [T, k] int32, topk_weights [T, k] float64, probs [T, E] float64,
    logits [T, E] float64).  ``probs`` are the scores the auxiliary loss uses.
    ``selection_bias`` [E] (sigmoid_topk) changes which experts are picked, not their weights.
    """
    k = spec.top_k
    logits = router_logits(x, router, router_bias)
    T, E = logits.shape
    if spec.routing == "softmax_topk":
        probs = softmax(logits)
        choice = probs
        if spec.n_group > 1:        # DeepSeek-V2's group_limited_greedy: a group's best score
            choice = _keep_groups(spec, probs, lambda g: g[..., 0])
        ids = topk(choice, k)
        w = np.take_along_axis(probs, ids, axis=1)
    elif spec.routing == "topk_softmax":
        probs = softmax(logits)
        ids = topk(logits, k)
        w = softmax(np.take_along_axis(logits, ids, axis=1))
    elif spec.routing == "sigmoid_topk":
        probs = 1.0 / (1.0 + np.exp(-logits))
        choice = probs + (f64(selection_bias) if selection_bias is not None else 0.0)
        if spec.n_group > 1:        # DeepSeek-V3: the sum of a group's two best choices
            choice = _keep_groups(spec, choice, lambda g: g[..., :2].sum(axis=-1))
        ids = topk(choice, k)
        w = np.take_along_axis(probs, ids, axis=1)
    else:  # pragma: no cover - the spec validates routing
        raise ValueError(f"unknown routing {spec.routing!r}")
    if spec.renormalize and spec.routing != "topk_softmax":
        w = w / np.sum(w, axis=1, keepdims=True)
    w = w * spec.routed_scaling_factor
    return ids.astype(np.int32), w, probs, logits


def _keep_groups(spec: MoESpec, choice, group_score):
    """``choice`` [T, E] with the experts outside each row's ``topk_group`` best groups set to
    -inf.  ``group_score`` maps a group's choices sorted best first [T, G, E/G] to [T, G]."""
    T, E = choice.shape
    per = E // spec.n_group
    grouped = np.where(np.isnan(choice), -np.inf, choice).reshape(T, spec.n_group, per)
    keep = topk(group_score(-np.sort(-grouped, axis=-1)), spec.topk_group)
    mask = np.zeros((T, spec.n_group), dtype=bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return np.where(np.repeat(mask, per, axis=1), choice, -np.inf)


# -- group -----------------------------------------------------------------------------------
def group(topk_ids, num_experts: int):
    """counts [E], offsets [E+1] and the flat slot indices ``t*k + s`` sorted by expert
    (stable, so within an expert by token then slot)."""
    ids = np.asarray(topk_ids).reshape(-1)
    counts = np.bincount(ids, minlength=num_experts).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    order = np.argsort(ids, kind="stable")
    return counts, offsets, order


# -- capacity --------------------------------------------------------------------------------
def capacity(spec: MoESpec, tokens: int) -> int | None:
    """Slots an expert keeps: ceil(capacity_factor · T · k / E), or None when dropless."""
    if spec.capacity_factor is None:
        return None
    return int(math.ceil(spec.capacity_factor * tokens * spec.top_k / spec.num_experts))


def apply_capacity(spec: MoESpec, topk_ids, topk_weights):
    """Drop the slots beyond each expert's capacity, deterministically.

    ``capacity_drop="token"`` keeps an expert's slots in slot order (t·k + s ascending);
    ``"weight"`` keeps its largest routing weights (ties: lower slot index).  A dropped slot
    contributes nothing; with ``renormalize`` the token's kept weights are rescaled to the sum
    its weights had before dropping.  Returns (weights [T, k], kept [T, k] bool, dropped).
    """
    ids = np.asarray(topk_ids)
    w = f64(topk_weights).copy()
    T, k = ids.shape
    cap = capacity(spec, T)
    kept = np.ones((T, k), dtype=bool)
    if cap is None:
        return w, kept, 0
    flat_ids, flat_w = ids.reshape(-1), w.reshape(-1)
    for e in range(spec.num_experts):
        slots = np.nonzero(flat_ids == e)[0]                     # ascending slot index
        if len(slots) <= cap:
            continue
        if spec.capacity_drop == "weight":
            slots = slots[np.argsort(-flat_w[slots], kind="stable")]
        kept.reshape(-1)[slots[cap:]] = False
    before = w.sum(axis=1, keepdims=True)
    w = np.where(kept, w, 0.0)
    if spec.renormalize:
        after = w.sum(axis=1, keepdims=True)
        w = np.where(after > 0, w * (before / np.where(after > 0, after, 1.0)), 0.0)
    return w, kept, int((~kept).sum())


# -- experts ---------------------------------------------------------------------------------
def expert_ffn(spec: MoESpec, rows, w, e: int) -> np.ndarray:
    """One expert's FFN on rows [n, H] -> [n, H] (unweighted)."""
    g = f64(rows) @ f64(w["w1"][e]).T
    if w.get("b1") is not None:
        g = g + f64(w["b1"][e])
    if spec.gated:
        u = f64(rows) @ f64(w["w3"][e]).T
        if w.get("b3") is not None:
            u = u + f64(w["b3"][e])
    if spec.activation == "swiglu_clamped":
        h = clamped_swiglu(g, u, spec.swiglu_alpha, spec.swiglu_limit)
    else:
        h = ACT_FN[spec.act.fn](g)
        if spec.gated:
            h = h * u
    y = h @ f64(w["w2"][e]).T
    if w.get("b2") is not None:
        y = y + f64(w["b2"][e])
    return y


def experts(spec: MoESpec, x, w, topk_ids, topk_weights) -> np.ndarray:
    """Expert FFNs and the weighted combine given a routing: y [T, H] float64.

    Slots are summed in slot order per token, then the shared experts (weight 1, or the
    shared gate's sigmoid(x·g) with ``spec.shared_expert_gate``) after them.
    """
    x = f64(x)
    T, H = x.shape
    k = spec.top_k
    ids = np.asarray(topk_ids).reshape(T, k)
    wts = f64(topk_weights).reshape(T, k)
    slot_out = np.zeros((T, k, H))
    for e in np.unique(ids):
        t, s = np.nonzero(ids == e)
        slot_out[t, s] = expert_ffn(spec, x[t], w, int(e))
    y = np.zeros((T, H))
    for s in range(k):
        y += wts[:, s:s + 1] * slot_out[:, s]
    shared = np.zeros((T, H))
    for j in range(spec.num_shared_experts):
        shared += expert_ffn(spec, x, w, spec.num_experts + j)
    if spec.shared_expert_gate:          # Qwen2-MoE: sigmoid(x·g) scales the shared experts
        shared *= 1.0 / (1.0 + np.exp(-(x @ f64(w["shared_gate"]).reshape(H, 1))))
    return y + shared


# -- stats -----------------------------------------------------------------------------------
def stats(spec: MoESpec, counts, probs=None, logits=None, base_coeff: float = 0.01,
          dropped: int = 0) -> dict:
    """Load-balancing statistics from per-expert slot counts.

    usage f_e = counts_e / Σcounts; P_e = mean router probability of e;
    aux_loss = E · Σ f_e·P_e (Switch Transformer); variance and cv of f;
    adaptive_coeff = base · (1 + variance) (the seed's adaptive coefficient);
    z_loss = mean(logsumexp(logits)²).
    """
    counts = np.asarray(counts, dtype=np.float64)
    E = spec.num_experts
    total = counts.sum()
    usage = counts / total if total > 0 else np.zeros(E)
    var = float(np.var(usage))
    mean = float(np.mean(usage))
    out = {
        "tokens_per_expert": counts.astype(np.int64),
        "usage": usage,
        "usage_variance": var,
        "usage_cv": float(np.sqrt(var) / mean) if mean > 0 else 0.0,
        "max_over_mean_load": float(counts.max() / counts.mean()) if total > 0 else 0.0,
        "adaptive_coeff": base_coeff * (1.0 + var),
        "dropped": int(dropped),
    }
    if probs is not None:
        p = np.asarray(probs, dtype=np.float64)
        pmean = p.mean(axis=0) if len(p) else np.zeros(E)
        out["router_prob_mean"] = pmean
        out["aux_loss"] = float(E * np.sum(usage * pmean))
    if logits is not None:
        z = np.asarray(logits, dtype=np.float64)
        if len(z):
            m = z.max(axis=1, keepdims=True)
            lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
            out["z_loss"] = float(np.mean(lse ** 2))
        else:
            out["z_loss"] = 0.0
    return out


# -- the whole layer -------------------------------------------------------------------------
def moe(spec: MoESpec, x, w, router_bias=None, topk_ids=None, topk_weights=None):
    """The whole layer in float64.  ``x`` [..., H]; ``w`` logical weights.

    Returns (y [..., H] float64, info) where info holds topk_ids, topk_weights, probs, logits,
    counts (kept slots per expert), kept, dropped.  Pass ``topk_ids``/``topk_weights`` to use
    a given routing instead of routing here.  ``router_bias`` is added to the logits for the
    softmax routings and is the selection bias for ``sigmoid_topk`` (as in the kernels).
    """
    x = np.asarray(x)
    lead, H = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, H)
    probs = logits = None
    if topk_ids is None:
        bias = selection = None
        if spec.routing == "sigmoid_topk":
            selection = router_bias
        else:
            bias = router_bias
        topk_ids, topk_weights, probs, logits = route(spec, x2, w["router"], bias, selection)
    weights, kept, dropped = apply_capacity(spec, topk_ids, topk_weights)
    counts = np.bincount(np.asarray(topk_ids)[kept], minlength=spec.num_experts)
    y = experts(spec, x2, w, topk_ids, weights)
    info = {"topk_ids": topk_ids, "topk_weights": topk_weights, "probs": probs,
            "logits": logits, "counts": counts, "kept": kept, "dropped": dropped,
            "weights_after_capacity": weights}
    return y.reshape(*lead, H), info


def rel_error(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; inf when out has a NaN/inf that ref lacks."""
    o, r = f64(out), f64(ref)
    if o.shape != r.shape:
        raise ValueError(f"shapes differ: out {o.shape} vs ref {r.shape}")
    if not np.all(np.isfinite(o) == np.isfinite(r)):
        return math.inf
    denom = np.linalg.norm(r)
    num = np.linalg.norm(np.nan_to_num(o - r))
    return float(num / denom) if denom > 0 else float(num)


def near_ties(scores, k: int, tol: float = 1e-5) -> np.ndarray:
    """Rows whose k-th and (k+1)-th best scores are within ``tol`` (relative): there a float32
    kernel may legitimately pick a different expert than the float64 reference."""
    s = np.sort(np.where(np.isnan(scores), -np.inf, scores), axis=1)[:, ::-1]
    if s.shape[1] <= k:
        return np.zeros(len(s), dtype=bool)
    a, b = s[:, k - 1], s[:, k]
    return np.abs(a - b) <= tol * np.maximum(np.abs(a), 1e-30)


# -- random problems for tests, examples and benchmarks --------------------------------------
def random_problem(spec: MoESpec, tokens: int, seed: int = 0):
    """Random input x [T, H] and logical weights in the spec's dtype (never zeros).

    Scales keep activations O(1): x ~ N(0, 1), W ~ N(0, 1/fan_in), router ~ N(0, 1/√H)·2.
    """
    rng = np.random.default_rng(seed)
    E, H, F, S = spec.num_experts, spec.hidden_dim, spec.ffn_dim, spec.num_shared_experts
    n = E + S
    dt = spec.dt.numpy
    cast = lambda a: np.asarray(a, dtype=np.float32).astype(dt)  # noqa: E731
    w = {
        "router": (rng.standard_normal((E, H)) * (2.0 / math.sqrt(H))).astype(np.float32)
        .astype(spec.router_dt.numpy),
        "w1": cast(rng.standard_normal((n, F, H)) / math.sqrt(H)),
        "w3": cast(rng.standard_normal((n, F, H)) / math.sqrt(H)) if spec.gated else None,
        "w2": cast(rng.standard_normal((n, H, F)) / math.sqrt(F)),
        "b1": None, "b3": None, "b2": None,
    }
    if spec.shared_expert_gate:
        w["shared_gate"] = cast(rng.standard_normal(H) * (2.0 / math.sqrt(H)))
    if spec.bias:
        w["b1"] = cast(rng.standard_normal((n, F)) * 0.1)
        w["b3"] = cast(rng.standard_normal((n, F)) * 0.1) if spec.gated else None
        w["b2"] = cast(rng.standard_normal((n, H)) * 0.1)
    x = cast(rng.standard_normal((tokens, H)))
    return x, w


def weight_kwargs(spec: MoESpec, w: dict) -> dict:
    """Logical weights (as `random_problem` makes them) as keyword arguments of ``pack()``."""
    E = spec.num_experts
    kw = {"router": w["router"], "w1": w["w1"][:E], "w2": w["w2"][:E]}
    if spec.gated:
        kw["w3"] = w["w3"][:E]
    if spec.bias:
        kw.update(b1=w["b1"][:E], b2=w["b2"][:E])
        if spec.gated:
            kw["b3"] = w["b3"][:E]
    if spec.num_shared_experts:
        kw.update(shared_w1=w["w1"][E:], shared_w2=w["w2"][E:])
        if spec.gated:
            kw["shared_w3"] = w["w3"][E:]
        if spec.bias:
            kw.update(shared_b1=w["b1"][E:], shared_b2=w["b2"][E:])
            if spec.gated:
                kw["shared_b3"] = w["b3"][E:]
        if spec.shared_expert_gate:
            kw["shared_gate"] = w["shared_gate"]
    return kw


def pack_kwargs(spec: MoESpec, w: dict) -> dict:
    """`weight_kwargs` with the router's layout said ([E, H]), so that a layer with E == H, whose
    [E, H] and [H, E] routers look alike, packs too: the keywords the training ops pass to
    ``pack()``."""
    return {**weight_kwargs(spec, w), "router_layout": "eh"}
