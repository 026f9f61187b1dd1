"""Parameter, FLOP and KV-cache counts from the model config alone (no model is built).

Conventions, one for every preset (the published figures are checked against them in
tests/test_presets.py):
- total parameters count every weight once, the input embedding and the output head
  included (the table once if they are tied);
- active parameters per token count every weight a token's forward pass multiplies by:
  attention, the dense FFNs, the router, the shared experts, top_k routed experts, the norms
  and the output head. The input embedding table is not counted: a token reads one row of it
  by lookup and multiplies by none of it. (With tied embeddings the table is the output head
  and is counted as such.) This is the convention under which DeepSeek-V2 (21B),
  DeepSeek-V2-Lite (2.4B) and Mixtral-8x7B (12.9B) all come out within 2.5%; counting the
  input table as active overshoots DeepSeek-V2-Lite's 2.4B by 11%;
- training FLOPs per token = 6 x (active matmul parameters: active minus norms)
  + attention's score and value products, 6 x num_heads x (qk_head_dim + v_head_dim) x
  seq_len per layer (forward 2 FLOPs per multiply-add, backward twice the forward; the
  causal mask is not discounted, as in PaLM's MFU accounting);
- multi-token prediction modules (`model.mtp.depth`) are training-only: `total` and `active`
  leave them out (they are the figures publishers state and transformers' models hold),
  `mtp_total` / `mtp_active` count them (each depth: its two input norms, the 2D x D
  projection, one transformer block, its final norm) and `trained_total` is what training
  holds. Training FLOPs per token add, per depth, 6 x its active matmul parameters, 6 x the
  shared head it multiplies by again, and its block's attention products (counted per token
  of the main sequence; depth k runs on S - k of S positions);
- the KV cache per token counts what inference must keep per token and layer: keys and
  values for multi-head or grouped-query attention (2 x num_kv_heads x head_dim), and for
  Multi-Head Latent Attention the compressed latent plus the one shared rotary key
  (kv_lora_rank + qk_rope_head_dim), from which every head's keys and values are rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int  # the input embedding table (counted in total, not in active)
    norms: int  # every RMSNorm weight, the MLA latent norms included
    experts_total: int  # routed expert weights in the main model
    experts_active: int  # routed expert weights one token uses
    # Multi-token prediction modules (training-only; not in total or active).
    mtp_total: int = 0
    mtp_active: int = 0
    mtp_norms: int = 0
    mtp_experts: int = 0  # routed expert weights in the MTP blocks

    @property
    def active_matmul(self) -> int:
        """Active parameters that take part in a matrix multiply."""
        return self.active - self.norms

    @property
    def trained_total(self) -> int:
        """Every parameter training holds: the model and its MTP modules."""
        return self.total + self.mtp_total


def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention block: projections, and for MLA its two latent norms."""
    if cfg.attention == "mla":
        return attention_matmul_params(cfg) + attention_norm_params(cfg)
    return attention_matmul_params(cfg)


def attention_matmul_params(cfg: ModelConfig) -> int:
    """Projection weights of one attention block."""
    if cfg.attention == "mla":
        m = cfg.mla
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        H = cfg.num_heads
        if m.q_lora_rank:
            q = cfg.dim * m.q_lora_rank + m.q_lora_rank * H * qk_head
        else:
            q = cfg.dim * H * qk_head
        kv_down = cfg.dim * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv_up = m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
        out = H * m.v_head_dim * cfg.dim
        return q + kv_down + kv_up + out
    Dh = cfg.head_dim
    return cfg.dim * Dh * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * Dh * cfg.dim


def attention_norm_params(cfg: ModelConfig) -> int:
    """Norm weights inside one attention block (MLA's latent norms, Qwen3's q/k norms)."""
    if cfg.attention == "mla":
        return cfg.mla.kv_lora_rank + cfg.mla.q_lora_rank
    return 2 * cfg.head_dim if cfg.qk_norm else 0


def attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key head dim, value head dim)."""
    if cfg.attention == "mla":
        return cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim
    return cfg.head_dim, cfg.head_dim


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counts under the module docstring's conventions."""
    D, L = cfg.dim, cfg.num_layers
    moe = cfg.moe
    num_moe = L - cfg.num_dense_layers
    expert = 3 * D * moe.expert_hidden
    dense_ffn = 3 * D * cfg.dense_hidden
    shared = 3 * D * moe.expert_hidden * moe.num_shared_experts
    router = moe.num_experts * D
    attn = attention_matmul_params(cfg) * L
    norms = 2 * D * L + D + attention_norm_params(cfg) * L
    embedding = cfg.vocab_size * D
    head = cfg.vocab_size * D  # the tied table when tie_embeddings
    experts_total = num_moe * moe.num_experts * expert
    experts_active = num_moe * moe.top_k * expert
    # Everything but the embedding table and the routed experts: used by every token.
    common = attn + norms + head + cfg.num_dense_layers * dense_ffn + num_moe * (shared + router)
    # One MTP depth: enorm, hnorm and the final norm, the projection, one block.
    n = cfg.mtp.depth
    mtp_norms = n * (5 * D + attention_norm_params(cfg))
    mtp_common = n * (2 * D * D + attention_matmul_params(cfg)) + mtp_norms
    mtp_experts = 0
    if cfg.mtp.moe:
        mtp_common += n * (shared + router)
        mtp_experts = n * moe.num_experts * expert
        mtp_experts_active = n * moe.top_k * expert
    else:
        mtp_common += n * dense_ffn
        mtp_experts_active = 0
    return ParamCounts(
        total=common + experts_total + (0 if cfg.tie_embeddings else embedding),
        active=common + experts_active,
        embedding=embedding,
        norms=norms,
        experts_total=experts_total,
        experts_active=experts_active,
        mtp_total=mtp_common + mtp_experts,
        mtp_active=mtp_common + mtp_experts_active,
        mtp_norms=mtp_norms,
        mtp_experts=mtp_experts,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context length `seq_len`, the MTP
    modules included (see the module docstring)."""
    counts = param_counts(cfg)
    qk, v = attention_head_dims(cfg)
    blocks = cfg.num_layers + cfg.mtp.depth
    attn = 6 * blocks * cfg.num_heads * (qk + v) * seq_len
    mtp = counts.mtp_active - counts.mtp_norms + cfg.mtp.depth * cfg.vocab_size * cfg.dim
    return 6.0 * (counts.active_matmul + mtp) + attn


def kv_cache_elements_per_token(cfg: ModelConfig) -> int:
    """Elements the KV cache holds per token, all layers (see the module docstring)."""
    if cfg.attention == "mla":
        per_layer = cfg.mla.kv_lora_rank + cfg.mla.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.num_kv_heads * cfg.head_dim
    return per_layer * cfg.num_layers


def mha_kv_cache_elements_per_token(cfg: ModelConfig) -> int:
    """The same per-token cache for multi-head attention with this model's heads and dims.

    For MLA that is the keys and values its up-projections rebuild, cached as they are:
    num_heads x (qk_nope_head_dim + qk_rope_head_dim + v_head_dim) per layer; for
    grouped-query attention it is 2 x num_heads x head_dim.
    """
    qk, v = attention_head_dims(cfg)
    return cfg.num_heads * (qk + v) * cfg.num_layers
