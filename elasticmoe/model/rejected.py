"""The MoE model_types of transformers refused by name, each with the layer kind or feature that is missing."""

from __future__ import annotations

# Families whose decoder layers hold more than attention + MLP/MoE, or whose math is not implemented here.
REJECTED: dict[str, str] = {
    "bamba": "Mamba (state-space) layers",
    "nemotron_h": "Mamba (state-space) layers",
    "bailing_hybrid": "linear-attention layers",
    "llama4": "a vision encoder (a multimodal model; its text-only checkpoints are model_type llama4_text)",
    "nllb_moe": "encoder-decoder layers",
    "nllb-moe": "encoder-decoder layers",
    # transformers 5.23 families whose decoder layers hold more than attention + MoE/MLP (by the feature named)
    "deepseek_v4": "hyper-connections, compressed sparse attention with an indexer, and hash-routed layers",
    "glm5_next": "hyper-connections, linear-attention layers and a sparse-attention indexer (a multimodal model)",
    "glm5_next_text": "hyper-connections, linear-attention layers and a sparse-attention indexer",
    "qwen4_exp": "linear-attention (Gated DeltaNet) layers, a sparse-attention indexer and n-gram embeddings",
    "qwen4_exp_text": "linear-attention (Gated DeltaNet) layers, a sparse-attention indexer and n-gram embeddings",
    "hy_v4": "hyper-connections and a sparse-attention indexer",
    # their sparse-attention indexers sit in attention or blocks that hold more than the DeepSeek-V3.2 indexer
    "axk2": "low-rank sigmoid-gated RMSNorms and a gated attention output (fused q_gate_proj) around its "
            "sparse-attention indexer",
    "dots3_note": "a sparse-attention indexer, and vision/audio encoders (a multimodal model)",
    "dots3_note_text": "a per-head sigmoid attention output gate (g_proj), a normed rotary key, rescaled latents and "
                       "per-layer-type rotary and sliding layers around its sparse-attention indexer",
    "minimax_m3_vl": "a sparse-attention indexer, and a vision encoder (a multimodal model)",
    "minimax_m3_vl_text": "a block-sparse indexer (blocks of keys picked per KV head, local blocks always kept) and "
                          "clamped SwiGLU experts",
    "mistral_large4": "a sparse-attention indexer, and a vision encoder (a multimodal model)",
    "mistral_large4_text": "KV sharing across layers, NoPE layers, a learned log-position softmax scaling and final "
                           "logit soft-capping around its sparse-attention indexer",
    "inkling": "short-convolution layers and relative-position logits (a multimodal model)",
    "inkling_text": "short-convolution layers and relative-position logits",
    "inkling2": "short-convolution layers, block attention residuals and soft-capped SwiGLU (a multimodal model)",
    "inkling2_text": "short-convolution layers, block attention residuals and soft-capped SwiGLU",
    "muse_spark": "residual gates and centred RMSNorms, and vision/audio encoders (a multimodal model)",
    "muse_spark_text": "residual gates and centred RMSNorms, and experts run at a pooled width (moe_hidden_size) with "
                       "a norm on each expert's output",
    "zaya": "compressed convolutional attention (CCA projections)",
    "doge": "product-key retrieval experts (cross-domain MoE) and dynamic-mask attention",
    "diffusion_gemma": "block-diffusion decoding with an encoder (not causal language modelling)",
    "openai_privacy_filter": "bidirectional encoder layers for token classification (not causal language modelling)",
    "aria": "a vision encoder and projector (a multimodal model)",
    # on text only the text expert group runs (its own router and correction-bias row, moe_intermediate_size[0]),
    # but the hub stores both groups as one list: experts 0..E-1 text, E..2E-1 vision, the router transposed
    "ernie4_5_vl_moe": "modality-split experts stored as one list (text then vision experts, moe_intermediate_size "
                       "per group, a transposed router per group, a [2, E] correction bias) that the loader does not "
                       "split, and a vision encoder",
    "ernie4_5_vl_moe_text": "modality-split experts stored as one list (text then vision experts, "
                            "moe_intermediate_size per group, a transposed router per group, a [2, E] correction "
                            "bias) that the loader does not split",
    "qwen3_omni_moe": "a thinker-talker pair with audio and vision encoders (a multimodal model; transformers' "
                      "class only generates, with no forward: its thinker saved alone, qwen3_omni_moe_thinker, is "
                      "served)",
    "deepseek_ocr2": "vision encoders (an OCR model)",
    "deepseek_ocr2_text": "the decoder of an OCR model, loadable only with its vision encoders",
    "unlimited_ocr_text": "the decoder of an OCR model, loadable only with its vision encoders",
    "diffusion_gemma_text": "block-diffusion decoding with an encoder (not causal language modelling)",
    "dots3_note_vision_encoder": "a vision encoder (no language model)",
    "inkling_mm_model": "short-convolution layers and relative-position logits (a multimodal model)",
    "kimi_k25": "a vision encoder (a multimodal model)",
    "nemo_speechlm": "an audio encoder with a Mamba (state-space) language model",
    "nemotron_h_omni": "Mamba (state-space) layers, and vision/audio encoders",
    "qwen3_omni_moe_talker_text": "a speech-codec talker conditioned on the thinker's hidden states",
    "vitpose": "a vision pose-estimation model (no language model)",
    "vitpose_backbone": "a vision pose-estimation model (no language model)",
    "unlimited_ocr": "vision encoders (an OCR model)",
    "switch_transformers": "encoder-decoder layers",
}
