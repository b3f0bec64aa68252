"""Patch a transformers MoE model with moegen and check it computes the same thing.

Builds a tiny random model from a config (no download), runs it, swaps its MoE blocks for
moegen ones (`moegen.torch.patch_model`), and checks that the logits match within the dtype
tolerance and that greedy generation gives identical tokens: fp32 on the CPU, and bf16 on the
GPU when one is present.  Exits non-zero on a mismatch.

    python examples/hf_model.py [--model mixtral|qwen3_moe|olmoe|deepseek_v3] [--tokens 12]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from moegen import reference
from moegen.torch import patch_model

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             vocab_size=128, max_position_embeddings=128)


def make_config(name: str):
    import transformers as tf
    if name == "mixtral":
        return tf.MixtralConfig(intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **SMALL)
    if name == "qwen3_moe":
        return tf.Qwen3MoeConfig(moe_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                                 norm_topk_prob=True, head_dim=16, **SMALL)
    if name == "olmoe":
        return tf.OlmoeConfig(intermediate_size=48, num_experts=8, num_experts_per_tok=2, **SMALL)
    return tf.DeepseekV3Config(moe_intermediate_size=48, n_routed_experts=8, num_experts_per_tok=2,
                               n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True,
                               routed_scaling_factor=2.5, q_lora_rank=None, kv_lora_rank=32,
                               qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                               first_k_dense_replace=1, intermediate_size=96, **SMALL)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """N(0, 1/fan_in) weights (routers 2/sqrt(H)), so routing is not a tie everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point() or "norm" in name or "inv_freq" in name:
                continue
            fan_in = p.shape[-1] if p.dim() > 1 else 1
            scale = 0.1 if p.dim() == 1 else (2.0 if name.endswith("gate.weight") else 1.0) / math.sqrt(fan_in)
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def check(name: str, device: str, dtype: torch.dtype, tokens: int, new_tokens: int) -> bool:
    from transformers import AutoModelForCausalLM
    cfg = make_config(name)
    model = AutoModelForCausalLM.from_config(cfg)
    randomize(model, seed=0)
    model = model.to(device=device, dtype=dtype).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    gen = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = model(ids).logits.float()
        want_tokens = model.generate(ids, **gen)
    report = patch_model(model)
    print(report)
    with torch.no_grad():
        got = model(ids).logits.float()
        got_tokens = model.generate(ids, **gen)
    err = reference.rel_error(got.cpu().numpy(), want.cpu().double().numpy())
    tol = 1e-5 if dtype == torch.float32 else 5e-2      # whole-model logits, bf16 rounding per layer
    same = torch.equal(got_tokens, want_tokens)
    ok = bool(report.swapped) and err <= tol and same
    print(f"{name} {device} {str(dtype).replace('torch.', '')}: logits rel error {err:.2e} "
          f"(tolerance {tol:g}), generated tokens {'identical' if same else 'DIFFER'}: "
          f"{'OK' if ok else 'FAILED'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description="patch a tiny transformers MoE model with moegen")
    ap.add_argument("--model", default="mixtral", choices=["mixtral", "qwen3_moe", "olmoe", "deepseek_v3"])
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    ok = check(args.model, "cpu", torch.float32, args.tokens, args.new_tokens)
    if torch.cuda.is_available():
        ok = check(args.model, "cuda", torch.bfloat16, args.tokens, args.new_tokens) and ok
    else:
        print("no usable CUDA device: bf16 GPU check skipped")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
