"""Multi-Head Latent Attention: shape, causality, equality with the paper's equations written
out head by head, the cache-only (absorbed) form, gradients, config errors, and a tiny MLA MoE
model training under EP=2 on gloo."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_ranks
from trainer.config import ConfigError, MLAConfig, ModelConfig, MoEConfig, load_config
from trainer.mla import MLAttention
from trainer.model import rope_tables


def mla_cfg(q_lora_rank: int = 24) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        dim=32,
        num_layers=2,
        num_heads=3,
        attention="mla",
        mla=MLAConfig(
            kv_lora_rank=16,
            q_lora_rank=q_lora_rank,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
        ),
        max_seq_len=32,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16),
    )


def make_attn(cfg: ModelConfig, seed: int = 0) -> tuple[MLAttention, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    attn = MLAttention(cfg)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # not ones, so the reference must apply them
            else:
                p.normal_(0.0, 0.2)
    cos, sin = rope_tables(cfg.mla.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
    return attn, cos, sin


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * w


def rope_vec(v: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """RoPE of one vector at one position, halves rotated: pair i is (v[i], v[i + R/2])."""
    R = v.shape[-1]
    out = v.clone()
    for i in range(R // 2):
        ang = pos / theta ** (2 * i / R)
        a, b = v[i], v[i + R // 2]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + R // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def reference_mla(attn: MLAttention, cfg: ModelConfig, h_SD: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 eqs. (9)-(19) for one sequence, token by token and head by head."""
    m, H, eps = cfg.mla, cfg.num_heads, cfg.norm_eps
    N, R, V, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    S = h_SD.shape[0]
    W_DKV, W_KR = attn.wkv_a.weight[:C], attn.wkv_a.weight[C:]
    W_UKV = attn.wkv_b.weight.view(H, N + V, C)
    W_UK, W_UV = W_UKV[:, :N], W_UKV[:, N:]
    if m.q_lora_rank:
        W_DQ = attn.wq_a.weight
        W_UQR = attn.wq_b.weight.view(H, N + R, m.q_lora_rank)
    else:
        W_UQR = attn.wq.weight.view(H, N + R, cfg.dim)
    W_O = attn.wo.weight
    k_C, v_C, k_R, q_C, q_R = {}, {}, {}, {}, {}
    for t in range(S):
        h = h_SD[t]
        c_kv = rmsnorm(W_DKV @ h, attn.kv_norm.weight, eps)  # (9), latent normalized
        k_R[t] = rope_vec(W_KR @ h, t, cfg.rope_theta)  # (14), one rotary key for all heads
        c_q = rmsnorm(W_DQ @ h, attn.q_norm.weight, eps) if m.q_lora_rank else h  # (12)
        for i in range(H):
            k_C[t, i] = W_UK[i] @ c_kv  # (10)
            v_C[t, i] = W_UV[i] @ c_kv  # (11)
            q_full = W_UQR[i] @ c_q
            q_C[t, i] = q_full[:N]  # (13)
            q_R[t, i] = rope_vec(q_full[N:], t, cfg.rope_theta)  # (13)
    out = []
    for t in range(S):
        o_heads = []
        for i in range(H):
            scores = torch.stack(
                [
                    (q_C[t, i] @ k_C[j, i] + q_R[t, i] @ k_R[j]) / math.sqrt(N + R)
                    for j in range(t + 1)
                ]
            )  # (16), (17): causal, scaled by sqrt(d_h + d_h^R)
            p = scores.softmax(0)
            o_heads.append(sum(p[j] * v_C[j, i] for j in range(t + 1)))  # (18)
        out.append(W_O @ torch.cat(o_heads))  # (19)
    return torch.stack(out)


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_mla_matches_the_papers_equations(q_lora_rank):
    cfg = mla_cfg(q_lora_rank)
    attn, cos, sin = make_attn(cfg)
    x = torch.randn(2, 7, cfg.dim, dtype=torch.float64)
    attn = attn.double()
    with torch.no_grad():
        got = attn(x, cos.double(), sin.double())
        assert got.shape == (2, 7, cfg.dim)
        for b in range(2):
            want = reference_mla(attn, cfg, x[b])
            torch.testing.assert_close(
                got[b], want, rtol=1e-5, atol=1e-6
            )  # apply_rope computes in fp32


def test_mla_output_from_the_cache_alone():
    """What the KV cache keeps (latent and rotary key, C + R per token) is enough: queries
    absorb W_UK, outputs come back through W_UV, and the result equals the module's."""
    cfg = mla_cfg()
    attn, cos, sin = make_attn(cfg)
    attn = attn.double()
    m, H = cfg.mla, cfg.num_heads
    N, R, V, C = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, m.kv_lora_rank
    S = 9
    x = torch.randn(1, S, cfg.dim, dtype=torch.float64)
    cos, sin = cos.double(), sin.double()
    from trainer.model import apply_rope

    with torch.no_grad():
        want = attn(x, cos, sin)
        c_SC, k_rope_SR = attn.wkv_a(x[0]).split([C, R], -1)
        cache_c = attn.kv_norm(c_SC)  # [S, C]
        cache_kr = apply_rope(k_rope_SR[None], cos, sin)[0]  # [S, R]
        assert cache_c.shape[1] + cache_kr.shape[1] == C + R
        q = attn.wq_b(attn.q_norm(attn.wq_a(x[0]))).view(S, H, N + R)
        q_nope, q_rope = q.split([N, R], -1)
        q_rope = apply_rope(q_rope.transpose(0, 1), cos, sin)  # [H, S, R]
        W = attn.wkv_b.weight.view(H, N + V, C)
        W_UK, W_UV = W[:, :N], W[:, N:]
        q_lat = torch.einsum("shn,hnc->hsc", q_nope, W_UK)  # absorbed query [H, S, C]
        scores = (q_lat @ cache_c.T + q_rope @ cache_kr.T) / math.sqrt(N + R)
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)  # [H, S, S]
        o_lat = p @ cache_c  # [H, S, C]
        o = torch.einsum("hsc,hvc->shv", o_lat, W_UV).reshape(S, H * V)
        got = attn.wo(o)
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-6)  # apply_rope computes in fp32


def test_mla_is_causal():
    cfg = mla_cfg()
    attn, cos, sin = make_attn(cfg)
    x = torch.randn(2, 10, cfg.dim)
    with torch.no_grad():
        base = attn(x, cos, sin)
        for t in (3, 9):
            x2 = x.clone()
            x2[:, t] += torch.randn(cfg.dim)
            out = attn(x2, cos, sin)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_gradients_reach_every_projection(q_lora_rank):
    cfg = mla_cfg(q_lora_rank)
    attn, cos, sin = make_attn(cfg)
    x = torch.randn(2, 6, cfg.dim, requires_grad=True)
    attn(x, cos, sin).square().sum().backward()
    names = {n for n, _ in attn.named_parameters()}
    expected = {"wkv_a.weight", "kv_norm.weight", "wkv_b.weight", "wo.weight"}
    expected |= {"wq_a.weight", "q_norm.weight", "wq_b.weight"} if q_lora_rank else {"wq.weight"}
    assert names == expected
    for n, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    assert x.grad.abs().sum() > 0


def test_model_init_sets_mla_norms_to_ones_and_counts_match():
    from trainer.flops import param_counts
    from trainer.model import build_model, materialize

    cfg = mla_cfg()
    model = materialize(build_model(cfg), device=torch.device("cpu"), seed=3)
    attn = model.layers[0].attn
    assert isinstance(attn, MLAttention)
    assert torch.equal(attn.kv_norm.weight, torch.ones(cfg.mla.kv_lora_rank))
    assert torch.equal(attn.q_norm.weight, torch.ones(cfg.mla.q_lora_rank))
    assert attn.wkv_b.weight.std() > 0.01
    assert sum(p.numel() for p in model.parameters()) == param_counts(cfg).total
    out = model(torch.randint(0, cfg.vocab_size, (2, 8)))
    assert out.logits.shape == (2, 8, cfg.vocab_size)


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model.mla.qk_rope_head_dim=5", ["model.mla.qk_rope_head_dim"]),
        ("model.mla.kv_lora_rank=512", ["model.mla.kv_lora_rank", "model.dim"]),
        ("model.mla.q_lora_rank=4096", ["model.mla.q_lora_rank", "model.dim"]),
        ("model.mla.v_head_dim=0", ["model.mla.v_head_dim"]),
        ("model.num_kv_heads=2", ["model.num_kv_heads", "model.attention=mla"]),
    ],
)
def test_mla_dims_that_do_not_fit_are_named(override, names):
    base = [
        "model.attention=mla",
        "model.dim=64",
        "model.num_heads=4",
        "model.mla.kv_lora_rank=32",
        "model.mla.q_lora_rank=48",
    ]
    load_config(None, base)  # the base is valid
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, override])
    for n in names:
        assert n in str(e.value)


def _train_tiny_mla(rank: int, world: int, steps: int) -> list[float]:
    """Trains the tiny MLA MoE with the real build -> parallelize -> materialize path and the
    real gradient reduction (FSDP, in backward); returns the global mean loss of every step."""
    import torch.distributed as dist

    from trainer.mesh import build_mesh
    from trainer.model import build_model, materialize
    from trainer.parallelize import clip_grad_norm_, parallelize

    cfg = ModelConfig(
        vocab_size=48,
        dim=32,
        num_layers=2,
        num_heads=2,
        attention="mla",
        mla=MLAConfig(
            kv_lora_rank=16, q_lora_rank=0, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8
        ),
        max_seq_len=32,
        num_dense_layers=1,
        dense_hidden=64,
        moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=32, num_shared_experts=1),
    )
    mesh = build_mesh(world_size=world, rank=rank, ep=world)
    model = materialize(parallelize(build_model(cfg), mesh), device=torch.device("cpu"), seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # A learnable stream: each row counts up by a row-specific stride modulo the vocabulary.
    g = torch.Generator().manual_seed(1)
    start = torch.randint(0, cfg.vocab_size, (8, 1), generator=g)
    stride = torch.randint(1, 4, (8, 1), generator=g)
    rows = (start + stride * torch.arange(17)) % cfg.vocab_size
    mine = rows[rank::world]
    losses = []
    for _ in range(steps):
        out = model(mine[:, :-1])
        lm = F.cross_entropy(out.logits.flatten(0, 1), mine[:, 1:].flatten())
        (lm + out.aux_loss).backward()
        clip_grad_norm_(model, mesh, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = lm.detach().clone()
        dist.all_reduce(t)
        losses.append(t.item() / world)
    return losses


@pytest.mark.slow
def test_tiny_mla_moe_trains_under_ep2():
    losses = run_ranks(_train_tiny_mla, 2, 40)
    assert losses[0] == losses[1]  # every rank saw the same global loss
    curve = losses[0]
    assert curve[0] > 3.0  # about log(48) at the start
    assert curve[-1] < 0.5 * curve[0], curve
