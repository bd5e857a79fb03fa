"""Per-`model_type` semantics, as transformers' modeling code has them: defaults, block layout, the config keys
understood."""

from __future__ import annotations

from elasticmoe.model.family import COMMON_KEYS, HARMLESS_KEYS, Family  # noqa: F401  (re-exported)
from elasticmoe.model.rejected import REJECTED  # noqa: F401  (re-exported: the families refused by name)

_MLA_KEYS = ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "qk_head_dim",
             "rope_interleave", "n_routed_experts", "n_shared_experts", "moe_intermediate_size",
             "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob", "first_k_dense_replace")
_DSV3_ROUTER = ("n_routed_experts", "n_shared_experts", "moe_intermediate_size", "routed_scaling_factor", "n_group",
                "topk_group", "norm_topk_prob", "first_k_dense_replace")
_SLIDING = ("sliding_window", "layer_types", "use_sliding_window")
_DELTANET = ("layer_types", "full_attention_interval", "linear_conv_kernel_dim", "linear_key_head_dim",
             "linear_value_head_dim", "linear_num_key_heads", "linear_num_value_heads")
_MAMBA2 = ("layer_types", "layers_block_type", "mamba_n_heads", "mamba_n_groups", "mamba_d_state", "mamba_d_head",
           "mamba_d_conv", "mamba_expand", "mamba_chunk_size", "mamba_conv_bias", "mamba_proj_bias", "time_step_limit")
_KIMI_NEUTRAL = {"moe_layer_freq": 1, "mla_use_nope": True, "moe_router_activation_func": "sigmoid",
                 "use_grouped_topk": True}  # Kimi-Linear's hub keys transformers never reads, at their only value
# DeepSeek sparse attention: the indexer's shape; every layer's type "indexed_attention"
_DSA = ("index_topk", "index_head_dim", "index_n_heads", "layer_types", "mlp_layer_types")



FAMILIES: dict[str, Family] = {
    "mixtral": Family(keys=("num_local_experts", *_SLIDING), norm_topk=True, biases=()),
    "qwen2_moe": Family(keys=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                              "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", *_SLIDING),
                        biases=(("attn", "qkv_bias"),)),
    "qwen3_moe": Family(keys=("num_experts", "num_local_experts", "moe_intermediate_size", "norm_topk_prob",
                              "decoder_sparse_step", "mlp_only_layers", *_SLIDING)),
    "olmoe": Family(keys=("num_experts", "norm_topk_prob", "clip_qkv"), neutral=(("clip_qkv", None),),
                    qk_norm_all_heads=True),
    "flex_olmo": Family(keys=("num_experts", "norm_topk_prob"), block="post", qk_norm_all_heads=True),
    "deepseek_v2": Family(keys=(*_MLA_KEYS, "topk_method", "scoring_func", "moe_layer_freq"), norm_topk=False,
                          rope_interleave=True, neutral=(("scoring_func", "softmax"), ("moe_layer_freq", 1)),
                          biases=(("attn", "attention_bias"), ("mlp", "mlp_bias"))),
    "deepseek_v3": Family(keys=(*_MLA_KEYS, "scoring_func", "topk_method", "moe_layer_freq"), scoring="sigmoid",
                          neutral=(("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1))),
    "deepseek_v32": Family(keys=(*_MLA_KEYS, *_DSA, "scoring_func", "topk_method", "moe_layer_freq"),
                           scoring="sigmoid", rope_interleave=True, indexer_rope="half",
                           neutral=(("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1))),
    # GLM-MoE-DSA: indexer_types ("full" / "shared") lets a layer reuse the previous layer's picks; the schedule
    # keys are folded into indexer_types by transformers' config (IndexerSpec.own)
    "glm_moe_dsa": Family(keys=(*_MLA_KEYS, *_DSA, "indexer_types", "index_topk_freq", "index_skip_topk_offset",
                                "index_topk_pattern"), scoring="sigmoid", rope_interleave=True, indexer_rope="pairs"),
    "glm4_moe_lite": Family(keys=(*_MLA_KEYS, "mlp_layer_types"), scoring="sigmoid", default_rope_partial=True),
    "glm4_moe": Family(keys=(*_DSV3_ROUTER, "use_qk_norm"), scoring="sigmoid", partial_rotary=True),
    "dots1": Family(keys=(*_DSV3_ROUTER, *_SLIDING), scoring="sigmoid"),
    "exaone_moe": Family(keys=(*_DSV3_ROUTER, "num_experts", "num_shared_experts", "mlp_layer_types",
                               "sliding_window_pattern", *_SLIDING), scoring="sigmoid", nope_full_layers=True,
                         biases=()),
    "minimax_m2": Family(keys=("num_local_experts", "use_qk_norm"), scoring="sigmoid", norm_topk=True, biases=(),
                         partial_rotary=True, qk_norm_all_heads=True),
    "hunyuan_v1_moe": Family(keys=("num_experts", "moe_topk", "use_qk_norm"), norm_topk=True, qk_norm_after_rope=True,
                             ntk_alpha=True),
    "ernie4_5_moe": Family(keys=("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts",
                                 "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "moe_norm_min"),
                           norm_topk=True, rope_interleave=True,
                           biases=(("attn", "use_bias"), ("mlp", "use_bias"), ("lm_head", "use_bias"))),
    "granitemoe": Family(keys=("num_local_experts", "embedding_multiplier", "residual_multiplier", "logits_scaling",
                               "attention_multiplier"), norm_topk=True),
    "granitemoeshared": Family(keys=("num_local_experts", "embedding_multiplier", "residual_multiplier",
                                     "logits_scaling", "attention_multiplier", "shared_intermediate_size"),
                               norm_topk=True),
    "granitemoe_swa": Family(keys=("num_local_experts", "embedding_multiplier", "residual_multiplier", "logits_scaling",
                                   "attention_multiplier", "shared_intermediate_size", "layer_rope_theta", *_SLIDING),
                             norm_topk=True, attn_sinks=True),
    # DBRX: nested attn/ffn configs; attn_config.rope_theta is stored but transformers' rotary never reads it
    "dbrx": Family(keys=("d_model", "n_heads", "n_layers", "max_seq_len", "resid_pdrop", "emb_pdrop", "attn_config",
                         "ffn_config", "num_key_value_heads"),
                   norm="layer", norm_eps=1e-5, biases=(),
                   nested=(("attn_config", ("attn_pdrop", "clip_qkv", "kv_n_heads", "rope_theta")),
                           ("ffn_config", ("ffn_act_fn", "ffn_hidden_size", "hidden_size", "moe_num_experts",
                                           "moe_top_k", "moe_jitter_eps", "moe_loss_weight",
                                           "moe_normalize_expert_weights")))),
    # Llama 4 text: sigmoid top-k weights scale the experts' inputs (MoESpec.input_scaled), complex rotary
    "llama4_text": Family(keys=("num_local_experts", "intermediate_size_mlp", "moe_layers", "interleave_moe_layer_step",
                                "use_qk_norm", "no_rope_layers", "no_rope_layer_interval", "attention_chunk_size",
                                "layer_types", "attn_temperature_tuning", "floor_scale", "attn_scale"),
                          scoring="sigmoid", norm_topk=False, rope_interleave=True, experts_in_out=True),
    "solar_open": Family(keys=("n_routed_experts", "n_shared_experts", "moe_intermediate_size",
                               "routed_scaling_factor", "n_group", "topk_group", "norm_topk_prob"),
                         scoring="sigmoid", default_rope_partial=True),
    # LongCat-Flash: each decoder layer is two engine layers (attention + dense MLP each); the first one's MoE
    # (with identity experts) is added after the second one
    "longcat_flash": Family(keys=("num_layers", "ffn_hidden_size", "expert_ffn_hidden_size", "n_routed_experts",
                                  "zero_expert_num", "moe_topk", "routed_scaling_factor", "router_bias", *_MLA_KEYS),
                            norm_topk=False, rope_interleave=True, block="shortcut"),
    "mistral4": Family(keys=_MLA_KEYS),  # + rope_parameters.llama_4_scaling_beta (AttentionSpec.query_scale)
    # enable_moe_fp32_combine: routed + shared summed in float32, a rounding-only difference below float32
    "hy_v3": Family(keys=("num_experts", "num_shared_experts", "moe_intermediate_size", "router_scaling_factor",
                          "enable_moe_fp32_combine", "mlp_layer_types"), scoring="sigmoid", norm_topk=True,
                    biases=(("attn", "attention_bias"), ("mlp", "mlp_bias"))),
    "flint": Family(keys=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                          "decoder_sparse_step", "mlp_only_layers", *_SLIDING),
                    scoring="sigmoid", attn_sinks=True, nope_full_layers=True),
    "aria_text": Family(keys=("moe_num_experts", "moe_topk", "moe_num_shared_experts"), norm_topk=True,
                        experts_in_out=True, biases=(("attn", "attention_bias"), ("mlp", "mlp_bias"))),
    # JetMoE: attention experts over one kv_proj's keys and values; packed MoE experts with an output bias
    "jetmoe": Family(keys=("num_local_experts", "kv_channels", "activation_function", "aux_loss_coef"), norm_topk=True,
                     biases=(), moa=True, moe_bias=True, layer_norm_eps=1e-6),
    "axk1": Family(keys=(*_MLA_KEYS, "mlp_layer_types"), scoring="sigmoid", moe_out_norm=True),
    "cohere2_moe": Family(keys=("num_experts", "num_shared_experts", "shared_expert_combination_strategy",
                                "expert_selection_fn", "norm_topk_prob", "logit_scale", "layer_norm_eps",
                                "mlp_layer_types", "sliding_window_pattern", "prefix_dense_sliding_window_pattern",
                                "prefix_dense_intermediate_size", *_SLIDING),
                          block="parallel", norm="layer", rope_interleave=True, nope_full_layers=True),
    "phimoe": Family(keys=("num_local_experts", "router_jitter_noise", "input_jitter_noise", "lm_head_bias",
                           "original_max_position_embeddings", *_SLIDING),
                     scoring="sparsemixer", norm_topk=False, norm="layer", rope_mscale=True,
                     biases=(("attn", "attention_bias"), ("lm_head", "lm_head_bias"))),
    "afmoe": Family(keys=("num_experts", "num_shared_experts", "moe_intermediate_size", "num_dense_layers",
                          "route_scale", "global_attn_every_n_layers", "mup_enabled", *_SLIDING),
                    scoring="sigmoid", norm_topk=True, block="sandwich", nope_full_layers=True),
    # Kolibri: sigmoid weights of the raw logits, chosen by logits + correction bias; rotary on sliding layers only
    "kolibri1": Family(keys=("num_experts", "num_local_experts", "moe_intermediate_size",
                             "shared_expert_intermediate_size", "norm_topk_prob", "sliding_window", "layer_types"),
                       scoring="sigmoid", block="glm4", nope_full_layers=True, window_required=True,
                       bias_on_logits=True, biases=()),
    # Beam: rope_parameters keyed by layer type (null: NoPE), a sigmoid gate per feature with one bias per head
    "beam": Family(keys=("num_experts", "moe_intermediate_size", "norm_topk_prob", "n_group", "topk_group",
                         "routed_scaling_factor", "mlp_layer_types", "final_logit_softcapping", "sliding_window",
                         "layer_types"),
                   scoring="sigmoid", block="gemma", depth_scaled=True, nope_query_scale=(2048.0, 0.1),
                   nope_types=True),
    # LFM2-MoE: short-convolution layers (conv) beside full attention with per-head q/k norms (q_layernorm,
    # k_layernorm), operator_norm / ffn_norm, final embedding_norm; sigmoid routing with expert_bias, a top-k sum + 1e-6
    "lfm2_moe": Family(keys=("num_experts", "moe_intermediate_size", "num_dense_layers", "use_expert_bias",
                             "routed_scaling_factor", "norm_topk_prob", "layer_types", "conv_L_cache", "conv_bias",
                             "norm_eps", "tie_embedding"),
                       scoring="sigmoid", linear_attn="short_conv", topk_norm_add=1e-6, biases=(),
                       tensor_names=(("o", "out_proj.weight"), ("q_norm", "q_layernorm.weight"),
                              ("k_norm", "k_layernorm.weight"), ("attn_in", "operator_norm"), ("mlp_in", "ffn_norm"),
                              ("final", "embedding_norm"))),
    # GraniteMoeHybrid (Granite 4.0-H): Mamba2 layers beside attention (rotary only where position_embedding_type is
    # "rope"), each with GraniteMoeShared's MoE + shared MLP and Granite's multipliers
    "granitemoehybrid": Family(keys=("num_local_experts", "embedding_multiplier", "residual_multiplier",
                                     "logits_scaling", "attention_multiplier", "shared_intermediate_size",
                                     "position_embedding_type", *_MAMBA2), norm_topk=True, linear_attn="mamba2"),
    # Jamba: Mamba (v1) layers beside attention without rotary, MoE every expert_layer_period-th layer (a dense MLP
    # on the rest, both under feed_forward), softmax top-k left unnormalised, pre_ff_layernorm / final_layernorm;
    # the hub's num_logits_to_keep (which positions get logits, never their values) and the kernel switches
    "jamba": Family(keys=("num_experts", "num_local_experts", "expert_layer_period", "expert_layer_offset",
                          "attn_layer_period", "attn_layer_offset", "use_mamba_kernels", "mamba_d_state",
                          "mamba_d_conv", "mamba_expand", "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias",
                          "use_mambapy", "use_associative_scan", "num_logits_to_keep"),
                    norm_topk=False, nope=True, biases=(), linear_attn="mamba1",
                    tensor_names=(("mlp_in", "pre_ff_layernorm"), ("final", "final_layernorm"))),
    # MiniMax-Text-01: lightning (linear) attention layers beside full attention, residual adds of the normed input
    # scaled per sublayer kind (alpha / beta factors), Mixtral's router and experts
    "minimax": Family(keys=("num_local_experts", "block_size", "full_attn_alpha_factor", "full_attn_beta_factor",
                            "linear_attn_alpha_factor", "linear_attn_beta_factor", "mlp_alpha_factor",
                            "mlp_beta_factor", "layer_types", "sliding_window"),
                      norm_topk=True, biases=(), linear_attn="lightning"),
    # Kimi-Linear: KDA layers beside MLA without rotary, DeepSeek-V3's router; its keys by transformers' attribute_map
    # (num_experts_per_token...); the hub's linear_attn_config (1-based layers) and first_k_dense_replace
    "kimi_linear": Family(keys=(*_MLA_KEYS, "num_experts", "num_local_experts", "num_experts_per_token",
                                "num_expert_group", "num_shared_experts", "moe_renormalize", "model_max_length",
                                "layer_types", "mlp_layer_types", "linear_head_dim", "linear_num_heads",
                                "linear_conv_kernel_dim", "linear_attn_config", *_KIMI_NEUTRAL),
                          scoring="sigmoid", linear_attn="kda", nope=True, neutral=tuple(_KIMI_NEUTRAL.items()),
                          nested=(("linear_attn_config", ("full_attn_layers", "kda_layers", "head_dim", "num_heads",
                                                          "short_conv_kernel_size")),),
                          tensor_names=(("dense", "block_sparse_moe"),)),
    # Qwen3-Next: Gated DeltaNet layers beside gated full attention; its mtp.* weights are never loaded
    "qwen3_next": Family(keys=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                               "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", *_DELTANET),
                         partial_rotary=True, linear_attn="gated_deltanet", centred_norms=True, attn_output_gate=True,
                         ignored=(r"mtp\.",)),
    # Qwen3.5-MoE's language model: Qwen3-Next's layers, every layer MoE, its top-k always renormalised, a
    # multimodal rotary whose sections all read the text position (the plain rotary for text); mtp.* and a vision
    # encoder's model.visual.* weights never loaded (as its ForCausalLM ignores them)
    "qwen3_5_moe_text": Family(keys=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size",
                                     "attn_output_gate", "mtp_num_hidden_layers", "mtp_use_dedicated_embeddings",
                                     *_DELTANET),
                               norm_topk=True, partial_rotary=True, linear_attn="gated_deltanet", centred_norms=True,
                               attn_output_gate=True, neutral=(("attn_output_gate", True),),
                               ignored=(r"mtp\.", r"model\.visual\.")),
    # Qwen3.5-MoE with its vision encoder: text prompts only, through its language model
    "qwen3_5_moe": Family(keys=("text_config", "vision_config", "image_token_id", "video_token_id",
                                "vision_start_token_id", "vision_end_token_id"), text_model="qwen3_5_moe_text"),
    # Qwen3-VL-MoE's language model: Qwen3-MoE's layers with its top-k always renormalised (norm_topk_prob and
    # sliding_window are read by no code) and a multimodal rotary whose sections all read the text position on text
    # alone (the plain rotary); deepstack inputs only come with images; the vision encoder's model.visual.* unused
    "qwen3_vl_moe_text": Family(keys=("num_experts", "num_local_experts", "moe_intermediate_size", "norm_topk_prob",
                                      "decoder_sparse_step", "mlp_only_layers", "sliding_window"),
                                norm_topk=True, ignored=(r"model\.visual\.",)),
    "qwen3_vl_moe": Family(keys=("text_config", "vision_config", "image_token_id", "video_token_id",
                                 "vision_start_token_id", "vision_end_token_id"), text_model="qwen3_vl_moe_text",
                           top_ties_head=True),
    # GLM-4.5V's language model: GLM-4-MoE's layers (no q/k norm) with a multimodal rotary whose sections all read
    # the text position on text alone (the plain partial rotary); the vision encoder's model.visual.* unused
    "glm4v_moe_text": Family(keys=_DSV3_ROUTER, scoring="sigmoid", partial_rotary=True, ignored=(r"model\.visual\.",)),
    "glm4v_moe": Family(keys=("text_config", "vision_config", "image_token_id", "video_token_id",
                              "image_start_token_id", "image_end_token_id", "video_start_token_id",
                              "video_end_token_id"),
                        text_model="glm4v_moe_text", top_ties_head=True),
    # Qwen3-Omni's thinker language model: Qwen3-MoE's layers (norm_topk_prob honoured; sliding_window read by no
    # code, so only null) and a multimodal rotary whose sections all read the text position on text alone (the plain
    # rotary); deepstack inputs only come with images; the vision and audio encoders' weights unused
    "qwen3_omni_moe_text": Family(keys=("num_experts", "moe_intermediate_size", "norm_topk_prob",
                                        "decoder_sparse_step", "mlp_only_layers", "sliding_window"),
                                  neutral=(("sliding_window", None),),
                                  ignored=(r"(model\.)?visual\.", r"(model\.)?audio_tower\.")),
    "qwen3_omni_moe_thinker": Family(keys=("text_config", "vision_config", "audio_config", "image_token_id",
                                           "video_token_id", "audio_token_id", "audio_start_token_id",
                                           "audio_end_token_id", "vision_start_token_id", "vision_end_token_id",
                                           "user_token_id", "position_id_per_seconds"),
                                     text_model="qwen3_omni_moe_text", top_ties_head=True),
    # experts_per_token and initial_context_length: written by OpenAI's checkpoints, read by no transformers code
    "gpt_oss": Family(keys=("num_local_experts", "swiglu_alpha", "swiglu_limit", "quantization_config",
                            "experts_per_token", "initial_context_length", *_SLIDING), norm_topk=True, attn_sinks=True),
    # Gemma 4 text: Gemma's four norms, a dense MLP beside the MoE, per-layer input embeddings (PLE), KV sharing,
    # per-layer head dims (per_layer_config), values = keys (attention_k_eq_v), rotary per layer type
    "gemma4_text": Family(keys=("hidden_activation", "final_logit_softcapping", "use_bidirectional_attention",
                                "vocab_size_per_layer_input", "hidden_size_per_layer_input", "attention_k_eq_v",
                                "num_kv_shared_layers", "enable_moe_block", "use_double_wide_mlp", "num_experts",
                                "top_k_experts", "moe_intermediate_size", "per_layer_config", "global_head_dim",
                                "num_global_key_value_heads", *_SLIDING),
                          block="gemma", attn_scale=1.0, v_norm=True, router_norm=True, embed_sqrt=True,
                          moe_beside_mlp=True, layer_scalar=True,
                          neutral=(("use_bidirectional_attention", None), ("enable_moe_block", True)),
                          ignored=(r"model\.(vision_tower|audio_tower|embed_vision|embed_audio)\.",)),
    # Gemma 4 with its vision and audio encoders: text prompts only, through its language model; an image, video
    # or audio placeholder id in a prompt is embedded as the pad token (as transformers without pixels or audio);
    # a text_config's bidirectional attention "vision" covers image tokens only (causal on text)
    "gemma4": Family(keys=("text_config", "vision_config", "audio_config", "boi_token_id", "eoi_token_id",
                           "image_token_id", "video_token_id", "boa_token_id", "eoa_token_index", "audio_token_id"),
                     text_model="gemma4_text", top_ties_head=True,
                     placeholders=("image_token_id", "video_token_id", "audio_token_id"),
                     text_inert=(("use_bidirectional_attention", "vision"),)),
    # Laguna: rope_parameters per layer type (each its own theta and partial_rotary_factor), query heads per layer
    "laguna": Family(keys=("num_experts", "moe_intermediate_size", "shared_expert_intermediate_size", "gating",
                           "num_attention_heads_per_layer", "mlp_layer_types", "moe_routed_scaling_factor",
                           "moe_apply_router_weight_on_input", "moe_router_logit_softcapping", *_SLIDING),
                     scoring="sigmoid", norm_topk=True, attn_gate="softplus", partial_rotary=True,
                     neutral=(("moe_apply_router_weight_on_input", False),)),
    # Mellum: Qwen3-MoE attention and router in Laguna's layers (rope_parameters per layer type, mlp_layer_types);
    # its multi-token-prediction weights (mtp.*, mtp_*layer_types) are unused, as in transformers
    "mellum": Family(keys=("num_experts", "num_local_experts", "moe_intermediate_size", "norm_topk_prob",
                           "mlp_layer_types", "num_mtp_layers", "mtp_layer_types", "mtp_mlp_layer_types", *_SLIDING)),
    # MiMo-V2-Flash: sliding layers with twice the KV heads and attention sinks, values of their own head dim
    # (v_head_dim) rescaled (attention_value_scale), partial rotary per layer type, DeepSeek-V3's router unshared
    "mimo_v2_flash": Family(keys=("n_routed_experts", "moe_intermediate_size", "routed_scaling_factor", "n_group",
                                  "topk_group", "norm_topk_prob", "mlp_layer_types", "v_head_dim",
                                  "attention_value_scale", "sliding_window_size", *_SLIDING),
                            scoring="sigmoid", attn_sinks="sliding", sliding_kv_factor=2, partial_rotary=True,
                            rope_partial=0.334, ignored=(r"model\.mtp\.",)),
    # Step-3.7-Flash's language model (Step3p7TextConfig): sliding layers with their own query heads
    # (per_layer_config), a sigmoid output gate (self_attn.g_proj), rotary per layer type, zero-centred norms, a
    # sigmoid router with correction bias and an ungated shared expert, SwiGLU clamped per layer (swiglu_limits /
    # swiglu_limits_shared); transformers has no causal LM of it alone (inner_only); MTP layers unused
    "step3p5": Family(keys=("n_routed_experts", "moe_intermediate_size", "share_expert_dim", "gating",
                            "mlp_layer_types", "num_sliding_attention_heads", "per_layer_config",
                            "query_pre_attn_scalar", "moe_router_scaling_factor", "swiglu_limits",
                            "swiglu_limits_shared", "use_bidirectional_attention", "num_nextn_predict_layers",
                            "mtp_layer_types", "mtp_mlp_layer_types", "mlp_bias", *_SLIDING),
                      scoring="sigmoid", norm_topk=True, attn_gate="sigmoid", partial_rotary=True, centred_norms=True,
                      per_layer_heads=True, neutral=(("use_bidirectional_attention", False), ("mlp_bias", False)),
                      inner_only=True,
                      ignored=(r"vision_model\.", r"vit_large_projector\.")),
    # Step-3.7-Flash with its vision encoder: text prompts only, through its language model
    "step3p7": Family(keys=("text_config", "vision_config", "image_token_id", "projector_bias"),
                      text_model="step3p5"),
}
