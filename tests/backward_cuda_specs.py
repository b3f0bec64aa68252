"""The specs the CUDA backward's tests cover (NVRTC compile and GPU runs): every dtype,
activation and routing, grouped selection, routed scaling, no renormalisation, biases, shared
experts, capacity with and without renormalisation, E from 2 to 1024, odd H/F."""

from moegen.spec import MoESpec

SPECS = {
    "e8-k2-h512-f2048-bf16-swiglu": MoESpec(8, 2, 512, 2048, dtype="bfloat16"),
    "e2-k1-h100-f1000-fp32-relu": MoESpec(2, 1, 100, 1000, dtype="float32", activation="relu"),
    "e64-k6-h1000-f1408-fp16-geglu-topksm-bias": MoESpec(
        64, 6, 1000, 1408, dtype="float16", activation="geglu", routing="topk_softmax", bias=True),
    "e128-k8-h1408-f100-bf16-silu-raw-rs2.5": MoESpec(
        128, 8, 1408, 100, dtype="bfloat16", activation="silu", renormalize=False,
        routed_scaling_factor=2.5),
    "e256-k8-h256-f128-bf16-sigmoid-g8-tg4-sh1": MoESpec(
        256, 8, 256, 128, dtype="bfloat16", routing="sigmoid_topk", n_group=8, topk_group=4,
        routed_scaling_factor=2.5, num_shared_experts=1),
    "e8-k2-h100-f100-fp32-gelu-bias-cap": MoESpec(
        8, 2, 100, 100, dtype="float32", activation="gelu", bias=True, capacity_factor=1.0),
    "e16-k4-h256-f128-bf16-gelu-cap0.75-raw": MoESpec(
        16, 4, 256, 128, dtype="bfloat16", activation="gelu", capacity_factor=0.75,
        renormalize=False),
    "e16-k2-h64-f64-fp16-sigmoid-sh2": MoESpec(16, 2, 64, 64, dtype="float16",
                                               routing="sigmoid_topk", num_shared_experts=2),
    "e1024-k16-h100-f100-fp16-silu-sigmoid-g32": MoESpec(
        1024, 16, 100, 100, dtype="float16", activation="silu", routing="sigmoid_topk",
        n_group=32, topk_group=4),
}
