"""A model_type's semantics the config leaves out (Family), and the config keys every family may carry."""

from __future__ import annotations

from dataclasses import dataclass

# Keys of every config.json that never change a forward pass (bookkeeping, training-only, generation defaults),
# but in the one family whose spec reads them (router_jitter_noise: PhiMoE, moe_norm_min: Ernie 4.5).
HARMLESS_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "use_cache", "initializer_range",
    "output_router_logits", "router_aux_loss_coef", "attention_dropout", "hidden_dropout", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "eod_token_id", "id2label", "label2id", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "chunk_size_feed_forward", "is_encoder_decoder",
    "problem_type", "tie_encoder_decoder", "_name_or_path", "auto_map", "router_jitter_noise", "input_jitter_noise",
    "num_nextn_predict_layers", "num_mtp_layers", "aux_loss_alpha", "seq_aux", "moe_norm_min", "max_window_layers",
    "pretraining_tp", "tokenizer_class", "_attn_implementation_autoset", "use_bfloat16", "finetuning_task",
    "task_specific_params", "ep_size", "prefix", "add_cross_attention", "cross_attention_hidden_size",
    "decoder_start_token_id",
    "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values", "tf_legacy_loss",
    "pruned_heads", "is_decoder", "exponential_decay_length_penalty", "begin_suppress_tokens", "suppress_tokens",
})
# Keys every family's spec reads (model shape, norms, rope, sliding windows).
COMMON_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor",
    "num_experts_per_tok", "attention_bias", "mlp_bias", "qkv_bias", "use_bias",  # biases: taken from the tensors
    "quantization_config",  # checked and applied by the checkpoint reader (model.quant)
    "transformers_weights",  # the weights file transformers loads, and so does the checkpoint reader (weight_files)
})


@dataclass(frozen=True)
class Family:
    """How transformers runs one model_type, where its config is silent or ignored."""

    keys: tuple[str, ...] = ()  # family config keys the spec reads (or that are checked against the tensors)
    scoring: str = "softmax"  # router score function when the config has no scoring_func ("sparsemixer": PhiMoE)
    norm_topk: bool | None = None  # forced top-k renormalisation (None: config.norm_topk_prob, default True)
    block: str = "pre"  # "pre" | "post" (norm after each sublayer) | "sandwich" (both) | "parallel" (attn + mlp)
    #                     | "shortcut" (LongCat: an even layer's MoE output joins the next layer's residual)
    #                     | "glm4" (sandwich norms under GLM-4's names: post_self_attn / post_attention / post_mlp)
    #                     | "gemma" (sandwich norms under Gemma's names: post_attention / pre_ / post_feedforward)
    norm: str = "rms"  # "rms" | "layer" (mean-subtracted)
    qk_norm_after_rope: bool = False
    qk_norm_all_heads: bool = False  # q_norm / k_norm over the whole q / k projection (OLMoE), not per head
    rope_interleave: bool | None = None  # forced pairwise (complex) rotary layout; None: config.rope_interleave
    nope_full_layers: bool = False  # rotary only on sliding layers (full-attention layers are NoPE)
    nope: bool = False  # no rotary on any layer (Kimi-Linear's MLA: its rope part of q and k left unrotated)
    window_required: bool = False  # transformers builds a sliding-window mask every forward: null fails (Kolibri)
    bias_on_logits: bool = False  # the correction bias joins the raw router logits for the choice (Kolibri)
    depth_scaled: bool = False  # residual add k (1-based, two per layer): h * sqrt((k - 1) / k) + out / sqrt(k) (Beam)
    nope_query_scale: tuple[float, float] | None = None  # NoPE layers' queries * (1 + (pos + 1) / p) ** e (Beam)
    nope_types: bool = False  # rope_parameters per layer type: a null entry is a NoPE type (Beam), else refused
    attn_sinks: bool | str = False  # a learned per-head sink logit in every attention softmax (self_attn.sinks);
    #                                 "sliding": on the sliding layers only (MiMo-V2-Flash)
    sliding_kv_factor: int = 1  # sliding layers hold this many times num_key_value_heads (MiMo-V2-Flash: 2)
    rope_partial: float = 1.0  # a per-layer-type rope entry's partial_rotary_factor when it has none (MiMo: 0.334)
    rope_mscale: bool = False  # cos/sin scaled by rope_parameters' short_mscale (PhiMoE), see family_config.mscale_rope
    neutral: tuple[tuple[str, object], ...] = ()  # keys supported only at this value
    moe_out_norm: bool = False  # A.X-K1: an RMSNorm (post_mlp_layernorm) on the MoE block's output
    nested: tuple[tuple[str, tuple[str, ...]], ...] = ()  # sub-config key -> the keys understood inside it
    norm_eps: float | None = None  # fixed norm epsilon (DBRX's LayerNorms take no eps from the config)
    experts_in_out: bool = False  # packed experts stored [E, in, out] (x @ w), also when a row is square
    partial_rotary: bool = False  # the rotary honours partial_rotary_factor (else it rotates every head dim)
    default_rope_partial: bool = False  # its default rope shortens cos/sin to partial_rotary_factor all the same
    ntk_alpha: bool = False  # "dynamic" rope with rope_parameters.alpha: NTK-alpha, a fixed stretched base (HunYuan)
    # (part, config flag): the "attn" / "mlp" / "lm_head" projections transformers builds with biases when the flag
    # is set; a part not listed never has any (biases stored for it are dropped by transformers)
    biases: tuple[tuple[str, str], ...] = (("attn", "attention_bias"),)
    linear_attn: str | None = None  # the kind of config.layer_types' "linear_attention" layers ("gated_deltanet",
    #                                 "mamba2": Mamba2 mixers, "mamba1": Jamba's Mamba, "lightning": MiniMax's, "kda":
    #                                 Kimi Delta Attention),
    #                                 or "short_conv": LFM2's "conv" layers
    topk_norm_add: float | None = None  # added to the top-k sum it renormalises by (None: MoESpec.norm_add's default)
    centred_norms: bool = False  # zero-centred RMSNorms: weight (1 + w), every norm but the linear layers' gated one
    attn_output_gate: bool = False  # q_proj holds [q ; gate] per head: the output is multiplied by sigmoid(gate)
    ignored: tuple[str, ...] = ()  # tensor-name patterns transformers ignores on load (multi-token prediction)
    # (role, name): this family's own name for a part, in place of the usual one (model.names: attention roles under
    # self_attn., layer norm roles as modules, "final" the last norm's module); no other family loads these names
    tensor_names: tuple[tuple[str, str], ...] = ()
    text_model: str | None = None  # a multimodal model run as its language model alone: config.text_config, of
    #                                this model_type (whose `ignored` drops the encoders' weights)
    top_ties_head: bool = False  # the multimodal config's tie_word_embeddings ties the LM head (transformers has no
    #                              causal LM of the text model_type alone); else it must equal text_config's
    # the gate on the attention output (self_attn.g_proj), when its activation is not AFMoE's sigmoid per feature:
    # "softplus" (Laguna; one value per head or per feature by config.gating)
    attn_gate: str | None = None
    # DeepSeek sparse attention: the rotary layout of the lightning indexer (self_attn.indexer) that picks the keys
    # each query attends to, "half" (split halves, DeepSeek-V3.2) or "pairs" (GLM-MoE-DSA); None: no indexer
    indexer_rope: str | None = None
    attn_scale: float | None = None  # softmax scale (None: head_dim ** -0.5)
    v_norm: bool = False  # a weightless RMSNorm of each value head
    router_norm: bool = False  # the router reads the residual: weightless RMSNorm * router.scale / sqrt(H)
    embed_sqrt: bool = False  # embeddings times sqrt(hidden_size), rounded to the model's dtype first
    moe_beside_mlp: bool = False  # a dense MLP (mlp.*) beside the MoE in each layer, each with its own norms
    layer_scalar: bool = False  # each layer's output times its layer_scalar (a stored buffer, 1 where absent)
    # a multimodal config's keys of placeholder token ids (images, audio) that transformers embeds as
    # text_config.pad_token_id (main and per-layer embeddings) before it merges any encoder output: on text too
    placeholders: tuple[str, ...] = ()
    text_inert: tuple[tuple[str, object], ...] = ()  # text_config keys at a value that acts only with images
    inner_only: bool = False  # only the language model of a multimodal family (text_model): refused on its own
    per_layer_heads: bool = False  # per_layer_config may set a layer's num_attention_heads (Step-3.7's sliding layers)
    # JetMoE: mixture-of-attention heads (model.moa: routed query / output projections over shared keys and values),
    # a bias on the MoE's output (mlp.bias), and decoder-layer norms at this eps whatever rms_norm_eps (final norm's)
    moa: bool = False
    moe_bias: bool = False
    layer_norm_eps: float | None = None
