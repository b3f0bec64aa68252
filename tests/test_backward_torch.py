"""torch.autograd through the moegen_train custom ops.

What is checked: torch.autograd.gradcheck in float64 (the ops' reference-backed path: the
float64 reference forward and reference backward) on small shapes, for every output (y and the
aux loss) and every input (x, each parameter, the router bias); the float32 path (compiled
forward kernel + generated backward kernels) against the float64 path's gradients; opcheck of
both ops; torch.compile(fullgraph=True) of a loss through the op, backward included."""

import numpy as np
import pytest

from moegen import reference as ref
from moegen.spec import MoESpec

torch = pytest.importorskip("torch")
from moegen.torch.autograd import (_backward_op, _forward, moe_train, param_names,  # noqa: E402
                                    spec_handle)

COEFFS = dict(balance_coeff=0.1, z_coeff=0.01)

SPECS = [
    dict(num_experts=4, top_k=2, hidden_dim=6, ffn_dim=5, bias=True),
    dict(num_experts=5, top_k=2, hidden_dim=4, ffn_dim=3, activation="gelu", routing="topk_softmax"),
    dict(num_experts=8, top_k=2, hidden_dim=5, ffn_dim=3, activation="geglu", routing="sigmoid_topk",
         n_group=4, topk_group=2, routed_scaling_factor=2.5, num_shared_experts=1),
    dict(num_experts=4, top_k=2, hidden_dim=5, ffn_dim=4, activation="silu", capacity_factor=0.6),
]


def tensors(spec, T, dtype, seed=1):
    x, w = ref.random_problem(spec, T, seed=seed)
    ps = [torch.tensor(ref.f64(w[n]), dtype=dtype, requires_grad=True) for n in param_names(spec)]
    xt = torch.tensor(ref.f64(x), dtype=dtype, requires_grad=True)
    b = torch.tensor(np.random.default_rng(seed).standard_normal(spec.num_experts) * 0.2, dtype=dtype,
                     requires_grad=True)
    return xt, b, ps


@pytest.mark.parametrize("kw", SPECS, ids=lambda kw: MoESpec(**kw).name)
def test_gradcheck_float64_and_fp32_kernels_agree(kw):
    spec = MoESpec(backend="c", **kw)
    xt, b, ps = tensors(spec, 7, torch.float64)

    def f(x, b, *ps):
        return moe_train(spec, x, ps, b, **COEFFS)

    assert torch.autograd.gradcheck(f, (xt, b, *ps), eps=1e-6, atol=1e-6)
    dy = torch.randn(7, spec.hidden_dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y, aux = f(xt, b, *ps)
    g64 = torch.autograd.grad((y * dy).sum() + 0.5 * aux, [xt, b, *ps])
    x32, b32 = xt.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    p32 = [p.detach().float().requires_grad_() for p in ps]
    y32, aux32 = f(x32, b32, *p32)
    assert ref.rel_error(y32.detach().numpy(), y.detach().numpy()) < 1e-5
    assert abs(aux32.item() - aux.item()) < 1e-5 * max(1.0, abs(aux.item()))
    g32 = torch.autograd.grad((y32 * dy.float()).sum() + 0.5 * aux32, [x32, b32, *p32])
    for name, a, c in zip(["x", "router_bias", *param_names(spec)], g64, g32):
        assert c.dtype == torch.float32
        if spec.routing == "sigmoid_topk" and name == "router_bias":
            assert not a.any() and not c.any()      # a selection bias: no gradient
            continue
        assert ref.rel_error(c.numpy(), a.numpy()) < 1e-5, name


def test_no_router_bias_gets_none():
    spec = MoESpec(backend="c", **SPECS[0])
    xt, _, ps = tensors(spec, 5, torch.float32)
    y, aux = moe_train(spec, xt, ps, None, **COEFFS)
    (y.sum() + aux).backward()
    assert xt.grad is not None and all(p.grad is not None for p in ps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    spec = MoESpec(backend="c", **SPECS[0])
    xt, b, ps = tensors(spec, 6, dtype)
    h = spec_handle(spec)
    torch.library.opcheck(_forward, (xt, ps, b, h, 0.1, 0.01, True))
    torch.library.opcheck(_forward, (xt, ps, None, h, 0.1, 0.0, False))
    dy = torch.randn(6, spec.hidden_dim, dtype=dtype)
    gu = torch.empty((0, 2 * spec.ffn_dim), dtype=torch.float32)
    torch.library.opcheck(_backward_op, (dy, torch.tensor(1.0, dtype=dtype), xt.detach(),
                                         [p.detach() for p in ps], b.detach(), gu, h, 0.1, 0.01,
                                         True))


def test_save_activations_keeps_gate_up_and_gives_the_same_bits():
    spec = MoESpec(backend="c", **SPECS[3])             # capacity: fewer kept rows than T*(k+S)
    saved = spec.replace(save_activations=True)
    grads = []
    for s in (spec, saved):
        xt, b, ps = tensors(s, 9, torch.float32)
        y, aux, gu = _forward(xt, ps, b, spec_handle(s), 0.1, 0.01, True)
        G = s.ffn_dim * (2 if s.gated else 1)
        assert gu.shape == ((9 * s.top_k if s.save_activations else 0), G)
        if s.save_activations:
            assert gu.abs().sum() > 0
            torch.library.opcheck(_forward, (xt, ps, b, spec_handle(s), 0.1, 0.01, True))
            # the backward reads the kept values: other values, other gradients
            args = (torch.ones_like(y), torch.tensor(1.0), xt.detach(), [p.detach() for p in ps],
                    b.detach())
            rest = (spec_handle(s), 0.1, 0.01, True)
            dx_kept = _backward_op(*args, gu, *rest)[0]
            dx_other = _backward_op(*args, gu * 1.5, *rest)[0]
            assert not torch.equal(dx_kept, dx_other)
        y, aux = moe_train(s, xt, ps, b, **COEFFS)
        grads.append(torch.autograd.grad((y * y).sum() + aux, [xt, b, *ps]))
    for a, c in zip(*grads):
        assert torch.equal(a, c)


class OnGpu(torch.Tensor):                      # no GPU here: a CPU tensor that says it is one
    @property
    def is_cuda(self):
        return True


def test_what_cuda_lacks_is_refused_in_one_line_before_any_launch():
    spec = MoESpec(backend="c", **SPECS[0])
    xt, b, ps = tensors(spec, 4, torch.float32)
    xg = xt.detach().as_subclass(OnGpu)
    with pytest.raises(ValueError, match="save_activations=True is not built on CUDA"):
        moe_train(spec.replace(save_activations=True), xg, ps, b)
    with pytest.raises(TypeError, match="x on CUDA must have the spec's dtype bfloat16.*got torch.float32"):
        moe_train(spec.replace(dtype="bfloat16"), xg, ps, b)
    with pytest.raises(TypeError, match="x on CUDA must have the spec's dtype float32.*got torch.float64"):
        moe_train(spec, xt.detach().double().as_subclass(OnGpu), ps, b)


# torch 2.11's dynamo cannot hand the frozen MoESpec to spec_handle's assume_constant_result
# ("can't reconstruct arbitrary frozen dataclass instances", seen on the H200 image); 2.13 can.
@pytest.mark.skipif(tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13),
                    reason="torch.compile of moe_train(spec, ...) needs torch >= 2.13")
def test_compile_fullgraph_traces_forward_and_backward():
    spec = MoESpec(backend="c", **SPECS[0])
    xt, b, ps = tensors(spec, 6, torch.float32)

    def loss(x, b, *ps):
        y, aux = moe_train(spec, x, ps, b, **COEFFS)
        return (y * y).sum() + aux

    eager = torch.autograd.grad(loss(xt, b, *ps), [xt, b, *ps])
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(xt, b, *ps), [xt, b, *ps])
    for e, g in zip(eager, got):
        assert torch.equal(e, g)


def test_bad_arguments_are_one_clear_error():
    spec = MoESpec(backend="c", **SPECS[0])
    xt, b, ps = tensors(spec, 4, torch.float32)
    with pytest.raises(TypeError, match="x must be float32"):
        moe_train(spec, xt.half(), ps, b)
    with pytest.raises(ValueError, match=r"x must have shape \[T, 6\]"):
        moe_train(spec, xt[:, :3], ps, b)
    with pytest.raises(ValueError, match="params must be the 7 tensors"):
        moe_train(spec, xt, ps[:2], b)
    with pytest.raises(ValueError, match=r"params\['w2'\] must be torch.float32 of shape"):
        moe_train(spec, xt, [p.double() if i == 3 else p for i, p in enumerate(ps)], b)
    with pytest.raises(ValueError, match=r"router_bias must have shape \(4,\)"):
        moe_train(spec, xt, ps, b[:2])


def test_a_layer_with_as_many_experts_as_hidden_units_trains():
    """E == H: the training op packs its [E, H] router saying so (an [E, H] and an [H, E] router
    look alike then); it raised ValueError before."""
    spec = MoESpec(num_experts=16, top_k=2, hidden_dim=16, ffn_dim=8, backend="c")
    xt, b, ps = tensors(spec, 5, torch.float32)
    y, aux = moe_train(spec, xt, ps, b, **COEFFS)
    grads = torch.autograd.grad((y * y).sum() + aux, [xt, *ps])
    assert all(torch.isfinite(g).all() for g in grads) and grads[0].abs().sum() > 0
