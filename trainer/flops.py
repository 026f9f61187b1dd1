"""Parameter and FLOP counts from the model config alone (no model is built).

Conventions, one for every preset:
- total parameters count every weight once, the input embedding and the output head
  included (once if they are tied);
- active parameters per token count what one token's forward pass multiplies by: attention,
  the dense FFNs, the router, the shared experts, top_k routed experts, the norms, the output
  head, and the input embedding (its lookup row counts as active, as in the DeepSeek-V2 and
  Mixtral reports);
- training FLOPs per token = 6 x (active matmul parameters: active minus embedding and norms)
  + attention's score and value products, 6 x num_heads x (qk_head_dim + v_head_dim) x
  seq_len per layer (forward 2 FLOPs per multiply-add, backward twice the forward; the
  causal mask is not discounted, as in PaLM's MFU accounting).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int
    embedding: int  # the input embedding table
    norms: int
    experts_total: int  # routed expert weights in the whole model
    experts_active: int  # routed expert weights one token uses

    @property
    def active_matmul(self) -> int:
        """Active parameters that take part in a matrix multiply."""
        return self.active - self.embedding - self.norms


def attention_params(cfg: ModelConfig) -> int:
    """Weights of one attention block (projections only)."""
    if cfg.attention == "mla":
        m = cfg.mla
        qk_head = m.qk_nope_head_dim + m.qk_rope_head_dim
        H = cfg.num_heads
        if m.q_lora_rank:
            q = cfg.dim * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * H * qk_head
        else:
            q = cfg.dim * H * qk_head
        kv_down = cfg.dim * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        kv_up = m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim)
        out = H * m.v_head_dim * cfg.dim
        return q + kv_down + kv_up + out
    Dh = cfg.head_dim
    return cfg.dim * Dh * (cfg.num_heads + 2 * cfg.num_kv_heads) + cfg.num_heads * Dh * cfg.dim


def attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key head dim, value head dim)."""
    if cfg.attention == "mla":
        return cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim, cfg.mla.v_head_dim
    return cfg.head_dim, cfg.head_dim


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, L = cfg.dim, cfg.num_layers
    moe = cfg.moe
    num_moe = L - cfg.num_dense_layers
    expert = 3 * D * moe.expert_hidden
    dense_ffn = 3 * D * cfg.dense_hidden
    shared = 3 * D * moe.expert_hidden * moe.num_shared_experts
    router = moe.num_experts * D
    attn = attention_params(cfg) * L
    norms = 2 * D * L + D
    embedding = cfg.vocab_size * D
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * D
    experts_total = num_moe * moe.num_experts * expert
    experts_active = num_moe * moe.top_k * expert
    common = (
        attn
        + norms
        + embedding
        + head
        + cfg.num_dense_layers * dense_ffn
        + num_moe * (shared + router)
    )
    if cfg.tie_embeddings:
        # The tied table is one tensor, but a token uses it twice: as its input row and as
        # the output head's matrix.
        return ParamCounts(
            total=common + experts_total,
            active=common + experts_active + embedding,
            embedding=embedding,
            norms=norms,
            experts_total=experts_total,
            experts_active=experts_active,
        )
    return ParamCounts(
        total=common + experts_total,
        active=common + experts_active,
        embedding=embedding,
        norms=norms,
        experts_total=experts_total,
        experts_active=experts_active,
    )


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at context length `seq_len`."""
    counts = param_counts(cfg)
    qk, v = attention_head_dims(cfg)
    attn = 6 * cfg.num_layers * cfg.num_heads * (qk + v) * seq_len
    return 6.0 * counts.active_matmul + attn
