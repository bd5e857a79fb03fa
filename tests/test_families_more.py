"""More transformers MoE families against transformers itself (the helpers and the README table: test_families.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers

from tests.test_families import (
    DSV3_MOE, GRANITE, MLA, REPO, SLIDING3, _assert_matches, make_family_checkpoint, trivial_tensors,
)

MISTRAL4_YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=4,
                     beta_fast=32.0, beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0,
                     llama_4_scaling_beta=0.1)  # queries scaled up every 4 positions
# rotary per layer type: full layers rotate half of each head on another base than the sliding ones
TYPED_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
TYPED_BASES = {t: {"rope_type": "default", "rope_theta": p["rope_theta"]} for t, p in TYPED_ROPE.items()}  # Mellum

QWEN3_5_TEXT = dict(moe_intermediate_size=64, num_experts=8, shared_expert_intermediate_size=64, head_dim=16,
                    linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                    linear_conv_kernel_dim=4, layer_types=["linear_attention", "full_attention", "linear_attention"],
                    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                         mrope_section=[2, 1, 1], mrope_interleaved=True))
# LFM2-MoE: short-conv layers around a full-attention one, a dense first layer, routed scaling
LFM2 = dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_dense_layers=1, conv_L_cache=3,
            layer_types=["conv", "full_attention", "conv"], routed_scaling_factor=1.5)
# GraniteMoeHybrid: Mamba2 layers (8 heads in 2 groups, 16-wide state, 4-tap conv with bias) around a NoPE attention
# layer; the hub's layer names (mamba / attention), which transformers renames
GRANITE_HYBRID = dict(**GRANITE, shared_intermediate_size=64, layer_types=["mamba", "attention", "mamba"],
                      mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_head=16, mamba_d_conv=4,
                      mamba_chunk_size=16, position_embedding_type="nope")
# Jamba: Mamba layers (inner 128, 16-wide state, dt rank 4, 4-tap conv with bias) around an attention layer without
# rotary; MoE on the Mamba layers 0 and 2, a dense MLP on the attention layer
JAMBA = dict(intermediate_size=48, num_experts=8, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
             expert_layer_offset=0)
# MiniMax: lightning layers around a full-attention one, blocks of 8 tokens (prompts cross several), residual factors
# other than 1 for each sublayer kind
MINIMAX = dict(intermediate_size=48, num_local_experts=8, head_dim=16, block_size=8,
               layer_types=["linear_attention", "full_attention", "linear_attention"], full_attn_alpha_factor=0.8,
               full_attn_beta_factor=1.25, linear_attn_alpha_factor=1.5, linear_attn_beta_factor=0.75,
               mlp_alpha_factor=0.9, mlp_beta_factor=1.1)
# JetMoE: attention experts of 2 KV heads of 24 dims (hidden 64), a final norm eps its layer norms do not share
JETMOE = dict(intermediate_size=48, num_local_experts=8, kv_channels=24, rms_norm_eps=0.05)
# Kimi-Linear: KDA layers (4 heads of 16, a 4-tap conv) around an MLA layer without rotary (q_proj, no q_lora_rank),
# a dense first layer, DeepSeek-V3's sigmoid router over 2 groups of 4 experts, routed scaling
KIMI = dict(intermediate_size=128, moe_intermediate_size=64, num_local_experts=8, n_shared_experts=1,
            num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, num_key_value_heads=4, n_group=2, topk_group=1, routed_scaling_factor=1.5,
            linear_head_dim=16, linear_num_heads=4, linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "full_attention", "linear_attention"],
            mlp_layer_types=["dense", "sparse", "sparse"])
TINY_TEXT = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                 num_experts_per_tok=2, max_position_embeddings=2048, initializer_range=0.15, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0)  # make_family_checkpoint's fields and tokenizer ids, in text_config
TINY_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   num_position_embeddings=16)
# Step-3.7: sliding layer 1 with 8 query heads, rotary per layer type, clamps on layer 2's experts (routed) and
# layer 1's shared expert; its vision encoder tiny (unused on text)
STEP3P5_TEXT = dict(intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, share_expert_dim=48,
                    head_dim=16, num_sliding_attention_heads=8, sliding_window=4,
                    layer_types=["full_attention", "sliding_attention", "full_attention"],
                    mlp_layer_types=["dense", "sparse", "sparse"], rope_theta=[10000.0, 500.0, 10000.0],
                    partial_rotary_factors=[0.5, 1.0, 0.5], swiglu_limits=[0, 0, 0.05],
                    swiglu_limits_shared=[0, 0.05, 0], moe_router_scaling_factor=2.5)
STEP_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
                   patch_size=14)
# Qwen3-VL-MoE: a dense first layer, experts' down_proj [E, H, I] not square; M-RoPE sections over 8 frequencies
QWEN3_VL_TEXT = dict(intermediate_size=128, moe_intermediate_size=48, num_experts=8, head_dim=16, mlp_only_layers=[0],
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                          mrope_interleaved=True))
# Qwen3-Omni's thinker: Qwen3-VL-MoE's text layers with norm_topk_prob read (false here), an audio encoder beside;
# the hub's token ids that transformers' generate reads (vision_start_token_id)
QWEN3_OMNI_TEXT = dict(QWEN3_VL_TEXT, norm_topk_prob=False,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                            interleaved=True))
TINY_AUDIO = dict(num_hidden_layers=1, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
                  num_mel_bins=16, downsample_hidden_size=8)
# GLM-4.5V: M-RoPE sections over the 4 frequencies of a half-rotated head
GLM4V_TEXT = dict(DSV3_MOE, intermediate_size=128, head_dim=16, n_group=2, topk_group=1, routed_scaling_factor=1.5,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                       mrope_section=[2, 1, 1]))
# DeepSeek sparse attention: each query attends to its 8 best keys (the prompt has 32 tokens), picked by 8 index heads
DSA = dict(**DSV3_MOE, **MLA, mlp_layer_types=["dense", "sparse", "sparse"], n_group=2, topk_group=1,
           routed_scaling_factor=1.5, index_topk=8, index_head_dim=16, index_n_heads=8)
GEMMA4 = dict(intermediate_size=96, num_hidden_layers=6, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, sliding_window=8, layer_types=["sliding_attention", "sliding_attention",
                                                                    "full_attention"] * 2,
              num_kv_shared_layers=2, num_experts=8, top_k_experts=2, moe_intermediate_size=48, enable_moe_block=True,
              hidden_size_per_layer_input=16, vocab_size_per_layer_input=512, final_logit_softcapping=30.0,
              use_double_wide_mlp=True)  # layers 4 and 5 read layers 3's and 2's keys and values
# MiMo-V2-Flash: sliding layers (1, 2) with 2 KV heads and sinks, full ones with 1 and none; values 16 wide against
# q/k heads of 24, rescaled by 0.5; full layers rotate half of each head, sliding ones 8 dims (the family's 0.334)
MIMO = dict(intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8, num_hidden_layers=4,
            num_key_value_heads=1, head_dim=24, v_head_dim=16, attention_value_scale=0.5, n_group=2, topk_group=1,
            routed_scaling_factor=1.5, sliding_window=8,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0,
                                                "partial_rotary_factor": 0.5},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
# Gemma 4 with tiny vision and audio encoders (their weights unread on text); its image / video / audio placeholder
# ids are tokens of PROMPT (225 three times, 83, 92 twice), which transformers embeds as the pad token
GEMMA4_MM = dict(text_config={**TINY_TEXT, **GEMMA4, "use_bidirectional_attention": "vision"},
                 tie_word_embeddings=False, image_token_id=225, video_token_id=83, audio_token_id=92,
                 vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, head_dim=16, position_embedding_size=64),
                 audio_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   subsampling_conv_channels=[8, 4], output_proj_dims=32))

# model_type -> (transformers config class, tiny fields, what the family exercises); in the README table too.
MORE_CASES: dict[str, tuple[str, dict, str]] = {
    "granitemoe_swa": ("GraniteMoeSWAConfig", dict(**GRANITE, shared_intermediate_size=64, head_dim=16,
                                                  layer_rope_theta=[10000.0, 0, 10000.0], **SLIDING3),
                       "attention sinks (sigmoid of log-sum-exp form), alternating sliding window, NoPE layers "
                       "(layer_rope_theta 0), Granite multipliers, packed shared MLP"),
    "dbrx": ("DbrxConfig", dict(attn_config=dict(kv_n_heads=2, clip_qkv=0.6, rope_theta=10000.0),
                                ffn_config=dict(ffn_hidden_size=64, moe_num_experts=8, moe_top_k=2)),
             "fused Wqkv with q/k/v clipping, bias-free LayerNorm, experts flattened [E * I, H], L1-normalised "
             "top-k softmax"),
    "llama4_text": ("Llama4TextConfig", dict(intermediate_size=48, intermediate_size_mlp=128, num_local_experts=8,
                                             head_dim=16, moe_layers=[1, 2], no_rope_layers=[1, 0, 1],
                                             attention_chunk_size=8, floor_scale=4, attn_scale=0.1),
                    "sigmoid router weights scaling the experts' inputs, shared expert, dense first layer, chunked "
                    "attention, complex rotary, L2 q/k norms, NoPE layer with temperature tuning"),
    "solar_open": ("SolarOpenConfig", dict(moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1,
                                           head_dim=16, routed_scaling_factor=1.5),
                   "sigmoid routing with correction bias, shared expert, routed scaling"),
    "longcat_flash": ("LongcatFlashConfig", dict(num_layers=2, ffn_hidden_size=96, expert_ffn_hidden_size=48,
                                                 n_routed_experts=8, zero_expert_num=2, moe_topk=2, q_lora_rank=32,
                                                 kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                                 v_head_dim=16, head_dim=8, num_key_value_heads=4,
                                                 routed_scaling_factor=1.5),
                      "identity (zero-computation) experts, a shortcut MoE beside two MLA + dense-MLP sublayers per "
                      "layer, MLA LoRA scales, softmax routing with correction bias"),
    "mistral4": ("Mistral4Config", dict(kv_lora_rank=16, q_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                        v_head_dim=16, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=64,
                                        intermediate_size=128, first_k_dense_replace=1, n_group=2, topk_group=1,
                                        routed_scaling_factor=1.5, num_key_value_heads=4,
                                        rope_parameters=MISTRAL4_YARN),
                 "MLA with pairwise YaRN rotary, position-dependent query scaling (llama_4_scaling_beta), softmax "
                 "group-limited routing, shared expert, dense first layer"),
    "hy_v3": ("HYV3Config", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, num_shared_experts=1,
                                 head_dim=16, router_scaling_factor=1.5, mlp_layer_types=["dense", "sparse", "sparse"]),
              "per-head q/k norm, sigmoid routing with correction bias, routed scaling, shared MLP, dense first layer"),
    "flint": ("FlintConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                  shared_expert_intermediate_size=64, head_dim=16, mlp_only_layers=[0], **SLIDING3),
              "attention sinks, per-head q/k norms, rotary on sliding layers only, sigmoid top-k routing, ungated "
              "shared expert, dense first layer"),
    "aria_text": ("AriaTextConfig", dict(intermediate_size=48, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=2,
                                         head_dim=16),
                  "softmax over the top-k logits, experts stored [E, H, 2I] (transposed), two shared experts"),
    "jetmoe": ("JetMoeConfig", JETMOE,
               "mixture-of-attention heads (routed query / output projections over shared keys and values, an output "
               "bias), softmax over the top-k router logits, packed experts with an output bias, layer norms at "
               "their own eps; chunked prefill, batches and retries in tests/test_families_moa.py"),
    "axk1": ("AXK1Config", dict(**DSV3_MOE, **MLA, mlp_layer_types=["dense", "sparse", "sparse"], n_group=2,
                                topk_group=1, routed_scaling_factor=1.5),
             "MLA, sigmoid routing with correction bias, an RMSNorm on the MoE output, dense first layer"),
    "qwen3_next": ("Qwen3NextConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                           shared_expert_intermediate_size=64, head_dim=16, mlp_only_layers=[0],
                                           linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
                                           linear_num_value_heads=4, linear_conv_kernel_dim=4,
                                           layer_types=["linear_attention", "full_attention", "linear_attention"]),
                   "Gated DeltaNet layers (conv and recurrent state per slot) beside gated full attention, "
                   "zero-centred RMSNorms, partial rotary, shared expert with a sigmoid gate, dense first layer; "
                   "chunked prefill, batches and retries in tests/test_families_linear.py"),
    "lfm2_moe": ("Lfm2MoeConfig", LFM2,
                 "short-convolution layers (their conv window per slot) beside full attention with per-head q/k "
                 "norms, sigmoid routing with expert bias, top-k sum + 1e-6, routed scaling, dense first layer; "
                 "chunked prefill, batches and retries in tests/test_families_conv.py"),
    "granitemoehybrid": ("GraniteMoeHybridConfig", GRANITE_HYBRID,
                         "Mamba2 layers (conv window and scan state per slot, grouped B / C, gated group RMSNorm) "
                         "beside NoPE attention, Granite multipliers, packed shared MLP; chunked prefill, batches "
                         "and retries in tests/test_families_mamba.py"),
    "jamba": ("JambaConfig", JAMBA,
              "Mamba (v1) layers (conv window and selective-scan state per slot, RMSNorms of dt / B / C) beside "
              "attention without rotary, softmax top-k unnormalised on every other layer, dense MLP on the rest; "
              "chunked prefill, batches and retries in tests/test_families_mamba1.py"),
    "minimax": ("MiniMaxConfig", MINIMAX,
                "lightning (linear) attention layers (their recurrent state per slot, blocks of 8 tokens) beside "
                "full attention, residual adds of the normed input scaled per sublayer kind, softmax top-k; chunked "
                "prefill, batches and retries in tests/test_families_lightning.py"),
    "kimi_linear": ("KimiLinearConfig", KIMI,
                    "Kimi Delta Attention layers (per-channel gated delta rule, conv and recurrent state per slot) "
                    "beside MLA layers without rotary, sigmoid routing with correction bias over expert groups, "
                    "shared expert, dense first layer; chunked prefill, batches and retries in "
                    "tests/test_families_kda.py"),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", QWEN3_5_TEXT,
                         "Qwen3-Next's layers with Qwen3.5's separate in_proj_qkv / z / b / a, every layer MoE, "
                         "multimodal rotary sections on text positions"),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", dict(text_config={**QWEN3_5_TEXT, **TINY_TEXT}, vision_config=TINY_VISION,
                                             tie_word_embeddings=False),
                    "the language model of a vision-language checkpoint on text alone (model.visual.* ignored, as "
                    "its ForCausalLM ignores it)"),
    # text_config.tie_word_embeddings left at its class default (true): the top-level false unties the LM head
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", dict(text_config={**QWEN3_VL_TEXT, **TINY_TEXT},
                                              vision_config=dict(TINY_VISION, deepstack_visual_indexes=[0]),
                                              tie_word_embeddings=False),
                     "the language model of a vision-language checkpoint on text alone: Qwen3-MoE layers, "
                     "interleaved multimodal rotary sections on text positions, top-k always renormalised, dense "
                     "first layer (model.visual.* ignored; deepstack inputs come only with images)"),
    "qwen3_omni_moe_thinker": ("Qwen3OmniMoeThinkerConfig",
                               dict(text_config={**QWEN3_OMNI_TEXT, **TINY_TEXT}, audio_config=TINY_AUDIO,
                                    vision_config=dict(TINY_VISION, deepstack_visual_indexes=[0]),
                                    tie_word_embeddings=False, vision_start_token_id=151652,
                                    vision_end_token_id=151653, audio_end_token_id=151648),
                               "the thinker's language model of an omni (text, audio, vision) checkpoint on text "
                               "alone: Qwen3-MoE layers, interleaved multimodal rotary sections on text positions, "
                               "dense first layer (visual.* and audio_tower.* ignored; deepstack inputs come only with "
                               "images)"),
    "glm4v_moe": ("Glm4vMoeConfig", dict(text_config={**GLM4V_TEXT, **TINY_TEXT}, tie_word_embeddings=False,
                                         vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                            out_hidden_size=64)),
                  "the language model of a vision-language checkpoint on text alone: GLM-4-MoE layers (q/k/v "
                  "biases, no q/k norm), multimodal rotary sections on text positions over a partial rotary, sigmoid "
                  "grouped routing with correction bias, shared expert, dense first layer (model.visual.* ignored)"),
    "laguna": ("LagunaConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                                    shared_expert_intermediate_size=48, head_dim=16,
                                    num_attention_heads_per_layer=[4, 8, 2],
                                    mlp_layer_types=["dense", "sparse", "sparse"],
                                    moe_routed_scaling_factor=1.5, moe_router_logit_softcapping=2.0,
                                    rope_parameters=TYPED_ROPE, **SLIDING3),
               "query heads per layer, softplus attention output gate per head, rotary per layer type (bases and "
               "partial factors), soft-capped sigmoid routing with correction bias, shared expert, routed scaling, "
               "sliding window, per-head q/k norms, dense first layer"),
    "mellum": ("MellumConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_local_experts=8, head_dim=16,
                                    mlp_layer_types=["dense", "sparse", "sparse"], rope_parameters=TYPED_BASES,
                                    num_mtp_layers=1, **SLIDING3),
               "rotary bases per layer type, sliding window, per-head q/k norms, softmax top-k, dense first layer, "
               "a declared multi-token-prediction layer (mtp.* weights unused, as in transformers)"),
    "deepseek_v32": ("DeepseekV32Config", DSA,
                     "sparse attention: a lightning indexer (half-split rotary, its own key cache) picks the 8 keys "
                     "each query attends to; MLA, sigmoid grouped routing with correction bias, dense first layer"),
    "glm_moe_dsa": ("GlmMoeDsaConfig", dict(DSA, indexer_types=["full", "shared", "full"]),
                    "sparse attention: a lightning indexer (pairwise rotary, its own key cache) picks the 8 keys each "
                    "query attends to, a shared layer reusing the previous layer's picks; MLA, sigmoid routing"),
    "kolibri1": ("Kolibri1Config", dict(moe_intermediate_size=64, num_experts=8, shared_expert_intermediate_size=64,
                                        head_dim=16, norm_topk_prob=True, **SLIDING3),
                 "correction bias on the raw router logits (sigmoid weights), GLM-4's four norms per block, "
                 "per-head q/k norms, rotary on sliding layers only, ungated shared expert"),
    # rms_norm_eps large beside the hidden states' variance: depth scaling only rescales the residual stream, which
    # its norms undo but for their epsilon (at 1e-6 dropping it moved the logits by 4e-6)
    "beam": ("BeamConfig", dict(intermediate_size=128, moe_intermediate_size=64, num_experts=8, head_dim=16,
                                n_group=2, topk_group=1, routed_scaling_factor=1.5, final_logit_softcapping=2.0,
                                rms_norm_eps=0.05, mlp_layer_types=["dense", "sparse", "sparse"], **SLIDING3),
             "depth-scaled residual adds, Gemma-style sandwich norms, sigmoid attention gate with a bias per head, "
             "rotary per layer type (NoPE full layers, queries scaled with the position), final logit "
             "soft-capping, sigmoid grouped routing with correction bias, dense first layer"),
    "gemma4_text": ("Gemma4TextConfig", GEMMA4, "a dense MLP beside the MoE (each normed), per-layer input embeddings, "
                    "KV sharing (the last sliding and full layers read earlier ones' caches), per-layer head dims "
                    "and values = keys on full layers, rotary per layer type (proportional on full layers), "
                    "sliding window, normed router with per-expert scales, tanh-GELU, double-wide MLPs, layer "
                    "scalars, logit soft-capping"),
    "mimo_v2_flash": ("MiMoV2FlashConfig", MIMO, "sliding layers with twice the KV heads and attention sinks (full "
                      "layers neither), value heads narrower than q/k heads and rescaled (attention_value_scale), "
                      "partial rotary per layer type, sigmoid grouped routing with correction bias, dense first "
                      "layer"),
    "step3p7": ("Step3p7Config", dict(text_config={**STEP3P5_TEXT, **TINY_TEXT}, vision_config=STEP_VISION),
                "the language model of a vision-language checkpoint on text alone: sliding layers with twice the "
                "query heads, a sigmoid per-head output gate, rotary per layer type (own theta and partial "
                "factor), zero-centred norms, sigmoid routing with correction bias and router scaling, ungated "
                "shared expert, SwiGLU clamped per layer (routed, shared), dense first layer (vision_model.* and "
                "vit_large_projector ignored)"),
    "gemma4": ("Gemma4Config", GEMMA4_MM,
               "the language model of a vision-language-audio checkpoint on text alone: Gemma 4's layers (as "
               "gemma4_text), image / video / audio placeholder ids embedded as the pad token (model.vision_tower, "
               "audio_tower, embed_vision, embed_audio ignored)"),
}
# routing biases made non-zero: checked loaded
MORE_ROUTING_BIAS = {"solar_open", "longcat_flash", "hy_v3", "axk1", "laguna", "deepseek_v32", "glm_moe_dsa",
                     "kolibri1", "beam", "glm4v_moe",
                     "mimo_v2_flash", "lfm2_moe", "step3p7", "kimi_linear"}


@pytest.fixture(scope="module")
def more_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("more_families")
    return {t: make_family_checkpoint(t, root / t, case=c) for t, c in MORE_CASES.items()}


@pytest.mark.parametrize("model_type", sorted(MORE_CASES))
def test_more_family_matches_transformers(model_type, more_dirs):
    """Logits within 1e-4 relative in float32 and 24 greedy tokens identical, routing biases exercised."""
    from elasticmoe import LLM

    llm = LLM(str(more_dirs[model_type]), dtype="float32")
    if model_type in MORE_ROUTING_BIAS:
        biases = [layer.router_bias for layer in llm.engine.model.layers if layer.sparse]
        assert biases and all(b is not None and b.abs().min() > 0 for b in biases)
    _assert_matches(llm, more_dirs[model_type], model_type)


def test_no_more_family_checkpoint_keeps_init_constants(more_dirs):
    """Every weight of the tiny checkpoints is perturbed (LongCat's per-sublayer norms, input_layernorm.0 / .1)."""
    assert {t: trivial_tensors(p) for t, p in more_dirs.items() if trivial_tensors(p)} == {}


def _moe_model_types() -> list[str]:
    """Every model_type of a transformers configuration module that mentions experts."""
    found = set()
    for path in (Path(transformers.__file__).parent / "models").glob("*/configuration_*.py"):
        text = path.read_text()
        if re.search(r"num_experts|num_local_experts|n_routed_experts|moe_", text):
            found.update(re.findall(r'model_type\s*=\s*"([^"]+)"', text))
    return sorted(found)


def test_every_transformers_moe_family_is_supported_or_rejected():
    """Each model_type transformers ships whose default config has experts is in FAMILIES or REJECTED."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from elasticmoe.model.families import FAMILIES, REJECTED
    from elasticmoe.model.family_config import mentions_experts

    unknown = []
    for model_type in _moe_model_types():
        if model_type in FAMILIES or model_type in REJECTED or model_type not in CONFIG_MAPPING:
            continue
        try:
            cfg = CONFIG_MAPPING[model_type]()
        except Exception:  # a sub-config that cannot stand alone (e.g. an assistant needing its target)
            continue
        if mentions_experts(cfg.to_dict()):
            unknown.append(model_type)
    assert unknown == []


def test_every_rejected_family_names_model_type_and_feature():
    """From the config alone: the message names the model type and the missing layer kind or feature."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from elasticmoe.model import ModelSpecError
    from elasticmoe.model.families import REJECTED
    from elasticmoe.model.spec import check_model_type

    for model_type, feature in REJECTED.items():
        cfg = CONFIG_MAPPING[model_type]() if model_type in CONFIG_MAPPING else None
        if cfg is None or cfg.model_type != model_type:
            continue
        with pytest.raises(ModelSpecError) as err:
            check_model_type(cfg)
        assert f"model_type {model_type!r}" in str(err.value) and feature in str(err.value)


@pytest.mark.parametrize("model_type", ["llama4_text", "aria_text"])
def test_square_packed_experts_stored_in_out_match_transformers(model_type, tmp_path):
    """Packed experts stored [E, H, 2I] (Llama 4, Aria) with hidden = 2 * intermediate: a row's shape cannot
    tell [in, out] from [out, in], so the family's layout decides (not read untransposed)."""
    from elasticmoe import LLM

    cls, fields, _ = MORE_CASES[model_type]
    case = (cls, {**fields, "intermediate_size": 32}, "")
    path = make_family_checkpoint(model_type, tmp_path / model_type, case=case)
    _assert_matches(LLM(str(path), dtype="float32"), path, model_type)


# The README's list of what the rejected families lack: (its words, the model_types it names there, a word that each
# of those REJECTED entries, and every entry under that heading, states).
MULTIMODAL = ("vision", "audio", "M-RoPE", "multimodal", "speech")
README_REJECTED = [
    ("Mamba (Bamba, Nemotron-H)", {"bamba", "nemotron_h"}, ("Mamba",)),
    ("linear attention (Qwen4-Exp, GLM-5-Next)", {"qwen4_exp", "glm5_next"}, ("linear",)),
    ("short convolutions with relative-position logits (Inkling)", {"inkling"}, ("short-convolution",)),
    ("sparse-attention indexers (DeepSeek-V4, HY-V4, AXK2, dots3, Mistral-Large-4, MiniMax-M3)",
     {"deepseek_v4", "hy_v4", "axk2", "dots3_note", "mistral_large4", "minimax_m3_vl"},
     ("indexer",)),
    ("hyper-connections;", {"deepseek_v4", "glm5_next", "hy_v4"}, ("hyper-connections",)),
    ("Doge's product-key experts", {"doge"}, ("product-key",)),
    ("ZAYA's convolutional attention", {"zaya"}, ("convolutional attention",)),
    ("Muse Spark's residual gates", {"muse_spark_text"}, ("residual gates",)),
    ("block-diffusion decoding (Diffusion Gemma)", {"diffusion_gemma"}, ("block-diffusion",)),
    ("multimodal-only types (vision, audio or M-RoPE)", {"llama4", "aria", "qwen3_omni_moe"}, MULTIMODAL),
    ("encoder-decoder and encoder-only models", {"nllb_moe", "switch_transformers", "openai_privacy_filter"},
     ("encoder-decoder", "bidirectional encoder")),
]


def test_the_readme_names_what_each_rejected_family_lacks():
    """README (Verified model families): "rejected ... with the missing layer kind or feature named: Mamba (Jamba,
    ...); ...": each family it names is rejected for that, and every REJECTED entry falls under a heading it gives
    (Gemma 4, Doge, ZAYA and five others fell under none)."""
    from elasticmoe.model.families import REJECTED

    readme = " ".join((REPO / "README.md").read_text().split())
    for words, named, marks in README_REJECTED:
        assert words in readme, words
        for model_type in named:
            assert any(m in REJECTED[model_type] for m in marks), (words, model_type, REJECTED[model_type])
    unlisted = {t: f for t, f in REJECTED.items() if not any(m in f for _, _, marks in README_REJECTED for m in marks)}
    assert unlisted == {}, "REJECTED entries the README's list has no heading for"
