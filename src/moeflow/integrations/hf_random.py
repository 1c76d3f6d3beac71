"""Small random transformers MoE models of every family :mod:`moeflow.integrations.hf` supports.

For trying :func:`~moeflow.integrations.hf.expert_parallelize` without downloading a checkpoint,
and the one place the tests, the benchmarks and the example build such models from:

    model = random_model("qwen3_moe", num_experts=8)          # a Qwen3MoeForCausalLM, fp32, train mode

Each family's config sets only the sizes below (and what the family needs to run on a CPU with
a short sequence); the rest are the config class's defaults, chosen to exercise the family's
routing options (groups, selection bias, shared experts, scaled weights) where it has them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FAMILY_CONFIGS", "random_config", "random_model"]


def _sizes(D: int, F: int, E: int, K: int, L: int, V: int) -> dict:
    return dict(vocab_size=V, hidden_size=D, intermediate_size=2 * F, num_hidden_layers=L, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=K)


def _deepseek_v3_like(D, F, E, K, L, V, **extra):
    # 4 groups, top-2 groups (with 8 experts: group-limited top-k matters), one shared expert
    return dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, n_routed_experts=E, n_shared_experts=1,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, **extra)


def _mla(D):
    return dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                num_key_value_heads=4)


#: model_type -> (config class, causal-LM class, ``(D, F, E, K, L, V) -> config kwargs``)
FAMILY_CONFIGS: dict[str, tuple[str, str, Any]] = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    lambda D, F, E, K, L, V: dict(_deepseek_v3_like(D, F, E, K, L, V), **_mla(D),
                                                  first_k_dense_replace=0)),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 lambda D, F, E, K, L, V: dict(_deepseek_v3_like(D, F, E, K, L, V), first_k_dense_replace=0,
                                               head_dim=16)),
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                      lambda D, F, E, K, L, V: dict(_deepseek_v3_like(D, F, E, K, L, V), **_mla(D),
                                                    first_k_dense_replace=0)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              lambda D, F, E, K, L, V: dict(_deepseek_v3_like(D, F, E, K, L, V), first_k_dense_replace=0,
                                            head_dim=16, max_window_layers=L)),
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM",
                   lambda D, F, E, K, L, V: dict(_deepseek_v3_like(D, F, E, K, L, V), head_dim=16)),
    "exaone_moe": ("ExaoneMoeConfig", "ExaoneMoeForCausalLM",
                   lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, num_experts=E,
                                                 num_shared_experts=1, n_group=4, topk_group=2, first_k_dense_replace=0,
                                                 routed_scaling_factor=2.5, head_dim=16, sliding_window_pattern=2,
                                                 sliding_window=16)),
    "mimo_v2_flash": ("MiMoV2FlashConfig", "MiMoV2FlashForCausalLM",
                      lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, n_routed_experts=E,
                                                    n_group=4, topk_group=2, head_dim=16, v_head_dim=16,
                                                    swa_head_dim=16, swa_v_head_dim=16, moe_layer_freq=[1] * L,
                                                    layer_types=["full_attention"] * L)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  # top-k weights not renormalised (Qwen3-MoE's default; other families renormalise)
                  lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, num_experts=E,
                                                norm_topk_prob=False, head_dim=16)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, num_experts=E,
                                                shared_expert_intermediate_size=2 * F, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_experts=E, intermediate_size=F)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_experts=E, intermediate_size=F,
                                                pad_token_id=0, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_local_experts=E, intermediate_size=F)),
    "minimax": ("MiniMaxConfig", "MiniMaxForCausalLM",
                lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_local_experts=E, intermediate_size=F,
                                              head_dim=16, layer_types=["full_attention"] * L)),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              # every layer attention (Jamba's Mamba layers are not what is tested), every layer MoE
              lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_experts=E, intermediate_size=F,
                                            attn_layer_period=1, attn_layer_offset=0, expert_layer_period=1,
                                            expert_layer_offset=0, use_mamba_kernels=False)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM",
                   lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_local_experts=E, intermediate_size=F)),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_local_experts=E,
                                                       intermediate_size=F, shared_intermediate_size=2 * F)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    # group-limited greedy: a group scores its best expert (not its top-2 sum)
                    lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), **_mla(D), moe_intermediate_size=F,
                                                  n_routed_experts=E, n_shared_experts=1, n_group=4, topk_group=2,
                                                  topk_method="group_limited_greedy", routed_scaling_factor=2.0,
                                                  first_k_dense_replace=0, head_dim=16)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM",
               lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_local_experts=E, intermediate_size=F)),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM",
                     lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, moe_num_experts=E,
                                                   moe_k=K, moe_num_shared_experts=1, moe_layer_start_index=0,
                                                   moe_layer_end_index=L - 1)),
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM",
                       lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_experts=E, moe_topk=K,
                                                     intermediate_size=F, head_dim=16)),
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM",
                 lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, num_experts=E,
                                               num_dense_layers=0, layer_types=["full_attention"] * L)),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM",
                   lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_local_experts=E, intermediate_size=F,
                                                 head_dim=16)),
    "afmoe": ("AfmoeConfig", "AfmoeForCausalLM",
              lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, num_experts=E,
                                            num_shared_experts=1, num_dense_layers=0, head_dim=16,
                                            global_attn_every_n_layers=1)),
    "laguna": ("LagunaConfig", "LagunaForCausalLM",
               lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), moe_intermediate_size=F, num_experts=E,
                                             shared_expert_intermediate_size=F, head_dim=16,
                                             moe_routed_scaling_factor=1.5, mlp_layer_types=["sparse"] * L,
                                             layer_types=["full_attention"] * L)),
    "cohere2_moe": ("Cohere2MoeConfig", "Cohere2MoeForCausalLM",
                    # shared experts averaged with the routed output (the config's default strategy)
                    lambda D, F, E, K, L, V: dict(_sizes(D, F, E, K, L, V), num_experts=E, intermediate_size=F,
                                                  num_shared_experts=1, head_dim=16, sliding_window_pattern=2,
                                                  sliding_window=16, prefix_dense_sliding_window_pattern=0)),
}


def random_config(model_type: str, *, hidden: int = 64, ffn_hidden: int = 32, num_experts: int = 8,
                  num_topk: int = 2, num_layers: int = 2, vocab: int = 96, **overrides: Any):
    """A transformers config of ``model_type`` (a key of :data:`FAMILY_CONFIGS`) with these sizes;
    ``overrides`` replace any config field."""
    import transformers

    if model_type not in FAMILY_CONFIGS:
        raise ValueError(f"random_config: unknown model_type {model_type!r}; known: {sorted(FAMILY_CONFIGS)}")
    config_cls, _, make = FAMILY_CONFIGS[model_type]
    kwargs = make(hidden, ffn_hidden, num_experts, num_topk, num_layers, vocab)
    kwargs.update(overrides)
    return getattr(transformers, config_cls)(**kwargs)


def random_model(model_type: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **sizes: Any) -> nn.Module:
    """A random causal LM of ``model_type`` (see :func:`random_config` for ``sizes``), the same
    for the same seed on every rank, in ``dtype``, in train mode."""
    import transformers

    config = random_config(model_type, **sizes)
    torch.manual_seed(seed)
    return getattr(transformers, FAMILY_CONFIGS[model_type][1])(config).to(dtype).train()
