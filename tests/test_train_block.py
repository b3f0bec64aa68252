"""MoEBlock(trainable=True): loss.backward() through a block on the CPU (c backend, fp32)
reaches every parameter and x, with the gradients of the float64 reference backward."""

import numpy as np
import pytest

from moegen import reference as ref
from moegen.reference_backward import moe_backward
from moegen.spec import MoESpec

torch = pytest.importorskip("torch")
from moegen.torch import MoEBlock  # noqa: E402

pytestmark = pytest.mark.usefixtures("module_cache")

SPEC = MoESpec(num_experts=6, top_k=2, hidden_dim=20, ffn_dim=12, num_shared_experts=1,
               bias=True, backend="c")
COEFFS = dict(balance_coeff=0.05, z_coeff=0.01)


def test_backward_through_a_block_matches_the_reference():
    x, w = ref.random_problem(SPEC, 13, seed=3)
    bias = np.random.default_rng(3).standard_normal(SPEC.num_experts).astype(np.float32) * 0.2
    block = MoEBlock(SPEC, ref.weight_kwargs(SPEC, w), router_bias=bias, trainable=True, **COEFFS)
    names = [n for n, _ in block.named_parameters()]
    assert names == ["router", "w1", "w3", "w2", "b1", "b3", "b2"]
    xt = torch.tensor(x, requires_grad=True)
    y = block(xt.reshape(1, 13, -1))                     # [..., H] in, same shape out
    assert y.shape == (1, 13, SPEC.hidden_dim)
    # the training op's forward is the same kernel as the inference block's
    inference = MoEBlock(SPEC, ref.weight_kwargs(SPEC, w), router_bias=bias)
    assert torch.equal(y.detach().reshape(13, -1), inference(torch.tensor(x)))
    dy = np.random.default_rng(4).standard_normal((13, SPEC.hidden_dim))
    loss = (y.reshape(13, -1) * torch.tensor(dy, dtype=torch.float32)).sum() + 0.5 * block.aux_loss
    loss.backward()
    want = moe_backward(SPEC, x, w, dy, bias, daux=0.5, **COEFFS)
    assert ref.rel_error(xt.grad.numpy(), want["x"]) < 2e-5
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert ref.rel_error(p.grad.numpy(), want[name]) < 2e-5, name


def test_a_few_sgd_steps_lower_the_loss():
    _, w = ref.random_problem(SPEC, 0, seed=5)
    block = MoEBlock(SPEC, ref.weight_kwargs(SPEC, w), trainable=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, SPEC.hidden_dim, generator=g)
    target = torch.randn(32, SPEC.hidden_dim, generator=g) * 0.1
    opt = torch.optim.SGD(block.parameters(), lr=0.05)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = ((block(x) - target) ** 2).mean() + block.aux_loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_frozen_block_needs_no_graph():
    _, w = ref.random_problem(SPEC, 0, seed=6)
    block = MoEBlock(SPEC, ref.weight_kwargs(SPEC, w), trainable=True).requires_grad_(False)
    y = block(torch.randn(4, SPEC.hidden_dim))
    assert not y.requires_grad


def test_trainable_refusals_are_one_line():
    with pytest.raises(ValueError, match="save_activations=True is not built on CUDA"):
        MoEBlock(SPEC.replace(backend="cuda", arch="sm_90", save_activations=True), trainable=True)
    with pytest.raises(ValueError, match="on the c backend needs spec.dtype 'float32'"):
        MoEBlock(SPEC.replace(dtype="bfloat16"), trainable=True)
    with pytest.raises(TypeError, match="trainable must be True or False"):
        MoEBlock(SPEC, trainable="yes")
    block = MoEBlock(SPEC, trainable=True)
    with pytest.raises(ValueError, match="MoEBlock.route is for inference blocks"):
        block.route(torch.randn(2, SPEC.hidden_dim))
