"""moegen.torch.from_hf / patch_model against the real transformers modules (tiny random configs,
no downloads, fp32 on the CPU): the same expert ids and outputs within the dtype tolerance, for
the 5.x fused layout of the live module, its state dict, and the 4.5x per-expert layout; the
blocks that need semantics the kernels lack are refused with one line naming it."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is in the test extra: install '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is in the test extra")

from moegen import reference as R  # noqa: E402
from moegen.torch import MoEBlock, Unsupported, from_hf, patch_model  # noqa: E402
from moegen.torch.hf import spec_from_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("module_cache")

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=64, max_position_embeddings=64)


_MLA = dict(_SMALL, num_key_value_heads=4)       # DeepSeek's attention has no grouped KV


def _configs():
    from transformers import (DeepseekV2Config, DeepseekV3Config, GptOssConfig, MixtralConfig,
                              OlmoeConfig, Qwen2MoeConfig, Qwen3MoeConfig)
    return {
        # shared expert 48 wide = 2 experts of the routed width 24, scaled by its sigmoid gate
        "qwen2_moe": Qwen2MoeConfig(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                    shared_expert_intermediate_size=48, norm_topk_prob=False,
                                    **_SMALL),
        "mixtral": MixtralConfig(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, **_SMALL),
        "qwen3_moe": Qwen3MoeConfig(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=True, head_dim=8, **_SMALL),
        "qwen3_moe-raw": Qwen3MoeConfig(moe_intermediate_size=24, num_experts=6, num_experts_per_tok=3,
                                        norm_topk_prob=False, head_dim=8, **_SMALL),
        "olmoe": OlmoeConfig(intermediate_size=24, num_experts=8, num_experts_per_tok=2, **_SMALL),
        "deepseek_v2": DeepseekV2Config(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                                        n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.5,
                                        q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                        qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                                        intermediate_size=40, **_MLA),
        "deepseek_v2-grouped": DeepseekV2Config(moe_intermediate_size=24, n_routed_experts=16,
                                                num_experts_per_tok=3, n_shared_experts=1,
                                                topk_method="group_limited_greedy", n_group=4,
                                                topk_group=2, routed_scaling_factor=1.5,
                                                q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                                qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1,
                                                intermediate_size=40, **_MLA),
        "gpt_oss": GptOssConfig(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                                head_dim=8, **_SMALL),
        "deepseek_v3": DeepseekV3Config(moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                                        n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                                        routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=16,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                        first_k_dense_replace=1, intermediate_size=40, **_MLA),
    }


def _block_class(mt):
    import importlib
    mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
    name = {"mixtral": "MixtralSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
            "olmoe": "OlmoeSparseMoeBlock", "deepseek_v2": "DeepseekV2Moe",
            "deepseek_v3": "DeepseekV3MoE", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
            "gpt_oss": "GptOssMLP"}[mt]
    return getattr(mod, name)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights (N(0, 1/fan_in), router 2/sqrt(H)) and correction biases; never zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            scale = 0.1 if p.dim() == 1 else 1.0 / math.sqrt(fan_in)
            if name.endswith("gate.weight") or name.endswith("router.weight"):
                scale = 2.0 / math.sqrt(fan_in)
            if name.endswith("gate_up_proj"):
                scale = 6.0 / math.sqrt(p.shape[-2])      # GPT-OSS [E, H, 2F]: past the clamp
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def _hf_ids(block, x2):
    gate = block.gate if hasattr(block, "gate") else block.router
    out = gate(x2)
    return out[2] if len(out) == 3 else out[1]


def _check(hf_block, ours, T=13, seed=1, dtype=torch.float32, tol=1e-5):
    H = ours.spec.hidden_dim
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        want = hf_block(x)
        got = ours(x)
        if isinstance(want, tuple):              # GPT-OSS: (hidden states, router scores)
            assert isinstance(got, tuple) and got[1] is None
            want, got = want[0], got[0]
        ids, _ = ours.route(x)
        hf_ids = _hf_ids(hf_block, x.view(-1, H))
    np.testing.assert_array_equal(np.sort(ids.numpy(), 1), np.sort(hf_ids.numpy(), 1))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert R.rel_error(got.float().numpy(), want.float().numpy().astype(np.float64)) <= tol


def _as_45(sd: dict, mt: str) -> dict:
    """A 5.x block state dict rewritten in the transformers 4.5x per-expert key layout."""
    out = {k: v for k, v in sd.items() if not k.startswith("experts.")}
    gu, down = sd["experts.gate_up_proj"], sd["experts.down_proj"]
    F = gu.shape[1] // 2
    names = ("w1", "w3", "w2") if mt == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for e in range(gu.shape[0]):
        out[f"experts.{e}.{names[0]}.weight"] = gu[e, :F].clone()
        out[f"experts.{e}.{names[1]}.weight"] = gu[e, F:].clone()
        out[f"experts.{e}.{names[2]}.weight"] = down[e].clone()
    return out


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe-raw", "olmoe",
                                  "deepseek_v2", "deepseek_v2-grouped", "deepseek_v3"])
def test_block_matches_transformers(name):
    cfg = _configs()[name]
    mt = cfg.model_type
    hf = randomize(_block_class(mt)(cfg).eval(), seed=3)
    _check(hf, from_hf(hf))                                  # live 5.x module, no config
    sd = hf.state_dict()
    _check(hf, from_hf(sd, cfg))                             # 5.x state dict
    _check(hf, from_hf(_as_45(sd, mt), cfg))                 # 4.5x per-expert state dict
    _check(hf, MoEBlock.from_config(cfg, _as_45(sd, mt)))


def test_gpt_oss_matches_transformers():
    """Clamped SwiGLU (gate_up weights scaled so the clamps act), interleaved gate/up columns,
    expert biases and the router bias, from the live module and its state dict."""
    cfg = _configs()["gpt_oss"]
    hf = randomize(_block_class("gpt_oss")(cfg).eval(), seed=3)
    x = torch.randn(40, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gu = x @ hf.experts.gate_up_proj[0] + hf.experts.gate_up_proj_bias[0]
    assert (gu[:, 0::2] > 7).any() and (gu[:, 1::2].abs() > 7).any()    # both clamps act
    ours = from_hf(hf)
    assert ours.spec.activation == "swiglu_clamped" and ours.spec.routing == "topk_softmax"
    assert ours.spec.bias and ours.router_bias is not None
    _check(hf, ours, T=29)
    _check(hf, from_hf(hf.state_dict(), cfg), T=7)


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v2-grouped"])
def test_float32_router_beside_bf16_experts_matches_transformers(name):
    """transformers keeps DeepSeek's router in float32 while the experts are bf16; the moegen
    block does too (spec.router_dtype) and picks the same experts."""
    cfg = _configs()[name]
    hf = randomize(_block_class(cfg.model_type)(cfg).eval(), seed=4).to(torch.bfloat16)
    hf.gate.weight.data = hf.gate.weight.data.float()
    if hasattr(hf.gate, "e_score_correction_bias"):
        hf.gate.e_score_correction_bias.data = hf.gate.e_score_correction_bias.data.float()
    ours = from_hf(hf)
    assert ours.spec.dtype == "bfloat16" and ours.spec.router_dtype == "float32"
    assert ours.router.dtype == torch.float32
    _check(hf, ours, T=21, dtype=torch.bfloat16, tol=ours.spec.dt.tolerance)
    sd = hf.state_dict()
    assert from_hf(sd, cfg).spec == ours.spec


def test_qwen2_shared_expert_of_another_width_is_refused_in_one_line():
    from transformers import Qwen2MoeConfig
    cfg = Qwen2MoeConfig(moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
                         shared_expert_intermediate_size=36, **_SMALL)
    hf = _block_class("qwen2_moe")(cfg)
    for args in ((hf,), (hf.state_dict(), cfg)):
        with pytest.raises(Unsupported, match="shared_expert_intermediate_size must be a multiple "
                                              "of moe_intermediate_size=24.*got 36") as info:
            from_hf(*args)
        assert "\n" not in str(info.value)


def test_unknown_topk_method_and_a_float32_router_the_spec_lacks_are_refused():
    cfg = _configs()["deepseek_v2"]
    cfg.topk_method = "noaux_tc"
    with pytest.raises(Unsupported, match="topk_method must be one of"):
        spec_from_config(cfg)
    cfg = _configs()["mixtral"]
    hf = randomize(_block_class("mixtral")(cfg))
    sd = {k: (v if k.startswith("gate.") else v.to(torch.bfloat16)) for k, v in hf.state_dict().items()}
    spec = spec_from_config(cfg, dtype="bfloat16")
    from moegen.torch.hf import block_weights
    with pytest.raises(Unsupported, match="router_dtype must be 'float32'") as info:
        block_weights(spec, cfg, sd)
    assert "\n" not in str(info.value)
    assert from_hf(sd, cfg).spec.router_dtype == "float32"     # from_hf reads it off the tensors


def test_patch_model_swaps_supported_blocks_and_reports_the_rest():
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig
    cfg = _configs()["deepseek_v3"]
    model = randomize(AutoModelForCausalLM.from_config(cfg).eval(), seed=5)
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    report = patch_model(model)
    assert [p for p, _, _ in report.swapped] == ["model.layers.1.mlp"]   # layer 0 is dense
    assert report.left == [] and "swapped 1 block(s)" in str(report)
    assert isinstance(model.model.layers[1].mlp, MoEBlock)
    with torch.no_grad():
        got = model(ids).logits
    assert R.rel_error(got.numpy(), want.numpy().astype(np.float64)) <= 1e-4

    q2 = AutoModelForCausalLM.from_config(Qwen2MoeConfig(moe_intermediate_size=24, num_experts=8,
                                                          num_experts_per_tok=2,
                                                          shared_expert_intermediate_size=36, **_SMALL))
    report = patch_model(q2)
    assert report.swapped == [] and len(report.left) == 2
    assert all("got 36" in reason for _, _, reason in report.left)
    for name, left in (("qwen2_moe", 0), ("gpt_oss", 0)):
        model = randomize(AutoModelForCausalLM.from_config(_configs()[name]).eval(), seed=6)
        with torch.no_grad():
            want = model(ids).logits
        report = patch_model(model)
        assert len(report.swapped) == 2 and len(report.left) == left, str(report)
        with torch.no_grad():
            got = model(ids).logits
        assert R.rel_error(got.numpy(), want.numpy().astype(np.float64)) <= 1e-4, name


def test_auto_backend_follows_the_blocks_device(monkeypatch):
    """On a machine with a GPU, a model on the CPU is patched onto the c backend (the weights'
    device decides), not onto cuda where its CPU tensors would be refused."""
    import moegen.jit
    monkeypatch.setattr(moegen.jit, "cuda_usable", lambda: True)     # as on a GPU machine
    cfg = _configs()["mixtral"]
    hf = randomize(_block_class(cfg.model_type)(cfg).eval(), seed=3)
    ours = from_hf(hf)
    assert ours.kernel.backend == "c"
    _check(hf, ours)
