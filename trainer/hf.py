"""Hugging Face transformers checkpoints: which architecture a moeyard model is, its
`config.json`, the name and layout of every tensor in both directions, and a reader for
sharded safetensors directories on any fsspec URL that fetches one tensor at a time.

Shape legend: E experts, D model dim, F expert hidden, H heads, N qk_nope_head_dim,
R qk_rope_head_dim, C kv_lora_rank.

What maps to what (tested against transformers 5.x, whose modeling code is the reference):

    moeyard                                   transformers
    model.attention=gqa, no shared experts,   MixtralForCausalLM
      no dense layers, softmax top-k > 1
      with normalized weights, route_scale 1
    model.attention=mla, shared experts,      DeepseekV2ForCausalLM
      softmax, weights not normalized,
      route_scale = routed_scaling_factor,
      optional group-limited routing and
      dense first layers
    a dense Llama/Mistral/Qwen2 checkpoint    (input only) the attention, norms and
                                              embeddings of an upcycled MoE

Anything else (sigmoid scores, the auxiliary-loss-free selection bias, shared experts or
dense layers with GQA, top-1 routing, an MLA model with a latent-norm epsilon other than
DeepSeek's fixed 1e-6, rope scaling) has no transformers equivalent that computes the same
function, and `architecture` raises naming the setting.

Layouts that differ:
- experts: moeyard stacks them per layer as w1/w3 [E, D, F] and w2 [E, F, D] (saved per
  global id, `...experts.<id>.w1` of [D, F]); the files transformers writes and the Hub
  holds keep one nn.Linear per expert, [out, in]: Mixtral's `experts.<id>.w1/w3.weight`
  [F, D] and `w2.weight` [D, F], DeepSeek's `gate_proj/up_proj/down_proj`. transformers 5
  fuses them in memory (`gate_up_proj` [E, 2F, D], `down_proj` [E, D, F]) and writes the
  per-expert layout back on save; both are read here, the per-expert one is written.
- rotary embedding under MLA: moeyard rotates halves (pair j is dims j and j + R/2),
  DeepSeek's weights rotate interleaved pairs (2i, 2i + 1): the rotary rows of the query
  projection (per head) and of the shared rotary key (`kv_a_proj_with_mqa`'s last R rows)
  are permuted. Mixtral and Llama rotate halves, as moeyard does.
- router: `ffn.router.weight` [E, D] is `block_sparse_moe.gate.weight` (Mixtral) or
  `mlp.gate.weight` (DeepSeek-V2); it stays fp32 whatever the export dtype.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import torch
from torch import Tensor

from trainer.config import MLAConfig, ModelConfig, MoEConfig

MIXTRAL = "MixtralForCausalLM"
DEEPSEEK_V2 = "DeepseekV2ForCausalLM"
DENSE = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# DeepSeek's modeling code builds q_a_layernorm / kv_a_layernorm with this epsilon whatever
# the config's rms_norm_eps; moeyard's latent norms use model.norm_eps.
DEEPSEEK_LATENT_EPS = 1e-6

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"

Transform = Literal["copy", "t", "rope_q", "rope_kv"]


class HFError(ValueError):
    """A Hugging Face checkpoint or a model config that cannot be mapped; the message names
    the file, the tensor or the config key."""


# --- which architecture ----------------------------------------------------------------


def architecture(cfg: ModelConfig) -> str:
    """The transformers class that computes the same function as a moeyard model.

    Raises:
        HFError: no transformers class does; the message names every setting in the way.
    """
    moe = cfg.moe
    why: list[str] = []
    if moe.score_func != "softmax":
        why.append(
            f"model.moe.score_func={moe.score_func} (Mixtral and DeepSeek-V2 score with softmax)"
        )
    if moe.bias_update_rate > 0:
        why.append(
            f"model.moe.bias_update_rate={moe.bias_update_rate} (the selection bias has no "
            "place in either transformers model)"
        )
    if cfg.attention == "gqa":
        arch = MIXTRAL
        if moe.num_shared_experts:
            why.append(f"model.moe.num_shared_experts={moe.num_shared_experts} with GQA")
        if cfg.num_dense_layers:
            why.append(f"model.num_dense_layers={cfg.num_dense_layers} with GQA")
        if moe.n_group > 1:
            why.append(f"model.moe.n_group={moe.n_group} with GQA")
        if moe.top_k == 1 or not moe.norm_topk_prob:
            why.append(
                f"model.moe.top_k={moe.top_k}, model.moe.norm_topk_prob={moe.norm_topk_prob} "
                "(Mixtral always renormalizes the top-k weights, so it needs top_k > 1 and "
                "norm_topk_prob=true)"
            )
        if moe.route_scale != 1.0:
            why.append(f"model.moe.route_scale={moe.route_scale} (Mixtral has no scaling)")
    else:
        arch = DEEPSEEK_V2
        if not moe.num_shared_experts:
            why.append("model.moe.num_shared_experts=0 (DeepSeek-V2 always has shared experts)")
        if moe.norm_topk_prob and moe.top_k > 1:
            why.append(
                "model.moe.norm_topk_prob=true (transformers' DeepSeek-V2 never renormalizes "
                "the top-k weights)"
            )
        if cfg.norm_eps != DEEPSEEK_LATENT_EPS:
            why.append(
                f"model.norm_eps={cfg.norm_eps:g} (DeepSeek-V2's latent norms are fixed at "
                f"{DEEPSEEK_LATENT_EPS:g} and moeyard's use model.norm_eps)"
            )
    if why:
        raise HFError(
            f"no transformers architecture computes this model ({arch} is the nearest): "
            + "; ".join(why)
        )
    return arch


def hf_config(
    cfg: ModelConfig, *, dtype: torch.dtype, eos_token_id: int | None = None
) -> dict[str, Any]:
    """The `config.json` of the export of `cfg` (raises HFError as `architecture` does)."""
    arch = architecture(cfg)
    moe = cfg.moe
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    common: dict[str, Any] = {
        "architectures": [arch],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,  # transformers 4.x reads this key
        "num_experts_per_tok": moe.top_k,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "dtype": _DTYPE_NAMES[dtype],
        "torch_dtype": _DTYPE_NAMES[dtype],
    }
    if arch == MIXTRAL:
        return {
            **common,
            "model_type": "mixtral",
            "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "intermediate_size": moe.expert_hidden,
            "num_local_experts": moe.num_experts,
            "sliding_window": None,
            "router_jitter_noise": 0.0,
            "router_aux_loss_coef": moe.aux_loss_coef,
        }
    m = cfg.mla
    return {
        **common,
        "model_type": "deepseek_v2",
        "num_key_value_heads": cfg.num_heads,
        "intermediate_size": cfg.dense_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "n_routed_experts": moe.num_experts,
        "n_shared_experts": moe.num_shared_experts,
        "first_k_dense_replace": cfg.num_dense_layers,
        "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank or None,
        "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim,
        "v_head_dim": m.v_head_dim,
        "n_group": moe.n_group,
        "topk_group": moe.topk_group,
        "topk_method": "group_limited_greedy" if moe.n_group > 1 else "greedy",
        "routed_scaling_factor": moe.route_scale,
        "norm_topk_prob": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _rope(hf: dict[str, Any], where: str) -> float:
    """rope_theta of a config.json (5.x `rope_parameters` or 4.x `rope_theta`); raises on
    any rope scaling, which moeyard does not compute."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFError(
            f"{where}: rope scaling {kind!r} (rope_parameters / rope_scaling) is not computed "
            "by moeyard's rotary embedding; the model would differ"
        )
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta)


def model_config_from_hf(hf: dict[str, Any], *, where: str) -> ModelConfig:
    """The moeyard model of a Mixtral or DeepSeek-V2 `config.json` (`where` names it).

    Raises:
        HFError: another architecture, or settings moeyard does not compute.
    """
    arch = _arch(hf, where)
    if arch not in (MIXTRAL, DEEPSEEK_V2):
        raise HFError(
            f"{where}: architecture {arch} is not a moeyard MoE ({MIXTRAL} or {DEEPSEEK_V2}); "
            f"a dense {'/'.join(DENSE)} checkpoint starts an MoE with checkpoint.upcycle=true"
        )
    theta = _rope(hf, where)
    if arch == MIXTRAL:
        if hf.get("sliding_window"):
            raise HFError(
                f"{where}: sliding_window={hf['sliding_window']} (moeyard attends to the whole "
                "sequence)"
            )
        dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        if hf.get("head_dim") and int(hf["head_dim"]) != dim // heads:
            raise HFError(
                f"{where}: head_dim={hf['head_dim']} but moeyard's is hidden_size / "
                f"num_attention_heads ({dim // heads})"
            )
        return ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            max_seq_len=int(hf.get("max_position_embeddings", 4096)),
            rope_theta=theta,
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            moe=MoEConfig(
                num_experts=int(hf["num_local_experts"]),
                top_k=int(hf["num_experts_per_tok"]),
                expert_hidden=int(hf["intermediate_size"]),
                norm_topk_prob=True,
            ),
        )
    n_group = int(hf.get("n_group") or 1)
    method = hf.get("topk_method") or "greedy"
    if method not in ("greedy", "group_limited_greedy"):
        raise HFError(f"{where}: topk_method={method!r} (moeyard routes greedy or group-limited)")
    if method == "greedy":
        n_group = 1
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        attention="mla",
        mla=MLAConfig(
            kv_lora_rank=int(hf["kv_lora_rank"]),
            q_lora_rank=int(hf.get("q_lora_rank") or 0),
            qk_nope_head_dim=int(hf["qk_nope_head_dim"]),
            qk_rope_head_dim=int(hf["qk_rope_head_dim"]),
            v_head_dim=int(hf["v_head_dim"]),
        ),
        max_seq_len=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        num_dense_layers=int(hf.get("first_k_dense_replace", 0)),
        dense_hidden=int(hf["intermediate_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe=MoEConfig(
            num_experts=int(hf["n_routed_experts"]),
            top_k=int(hf["num_experts_per_tok"]),
            expert_hidden=int(hf["moe_intermediate_size"]),
            num_shared_experts=int(hf.get("n_shared_experts") or 0),
            n_group=n_group,
            topk_group=int(hf.get("topk_group") or 1) if n_group > 1 else 1,
            norm_topk_prob=False,
            route_scale=float(hf.get("routed_scaling_factor", 1.0)),
        ),
    )


def _arch(hf: dict[str, Any], where: str) -> str:
    archs = hf.get("architectures") or []
    if len(archs) != 1:
        raise HFError(f"{where}: 'architectures' must name one class, not {archs!r}")
    return str(archs[0])


# Settings that change the function a model computes (not its tensor shapes, which the
# tensor check compares): the preset's value must equal the checkpoint's.
_SEMANTIC = (
    "rope_theta",
    "norm_eps",
    "tie_embeddings",
    "attention",
    "moe.top_k",
    "moe.score_func",
    "moe.norm_topk_prob",
    "moe.route_scale",
    "moe.n_group",
    "moe.topk_group",
)


def check_semantics(preset: ModelConfig, ckpt: ModelConfig, *, where: str) -> None:
    """Raises HFError naming the first model.* setting of the preset that differs from the
    checkpoint's config (shapes aside)."""
    for key in _SEMANTIC:
        a, b = _get(preset, key), _get(ckpt, key)
        if a != b:
            raise HFError(
                f"model.{key} ({a}) differs from {where} ({b}): the run would start from a "
                "different model than the checkpoint's"
            )


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


# --- tensor names and layouts ----------------------------------------------------------


@dataclass(frozen=True)
class TensorMap:
    """One transformers tensor and the moeyard state-dict key it holds (no `model.` prefix)."""

    hf: str
    key: str
    transform: Transform = "copy"


def tensor_map(cfg: ModelConfig, arch: str) -> list[TensorMap]:
    """Every tensor of the transformers model `arch` of `cfg`, all experts included."""
    out: list[TensorMap] = [TensorMap("model.embed_tokens.weight", "embed.weight")]
    for i in range(cfg.num_layers):
        h, k = f"model.layers.{i}.", f"layers.{i}."
        out += [
            TensorMap(h + "input_layernorm.weight", k + "attn_norm.weight"),
            TensorMap(h + "post_attention_layernorm.weight", k + "ffn_norm.weight"),
        ]
        a, b = h + "self_attn.", k + "attn."
        if cfg.attention == "gqa":
            out += [
                TensorMap(a + f"{p}_proj.weight", b + f"w{p}.weight") for p in ("q", "k", "v", "o")
            ]
        else:
            if cfg.mla.q_lora_rank:
                out += [
                    TensorMap(a + "q_a_proj.weight", b + "wq_a.weight"),
                    TensorMap(a + "q_a_layernorm.weight", b + "q_norm.weight"),
                    TensorMap(a + "q_b_proj.weight", b + "wq_b.weight", "rope_q"),
                ]
            else:
                out.append(TensorMap(a + "q_proj.weight", b + "wq.weight", "rope_q"))
            out += [
                TensorMap(a + "kv_a_proj_with_mqa.weight", b + "wkv_a.weight", "rope_kv"),
                TensorMap(a + "kv_a_layernorm.weight", b + "kv_norm.weight"),
                TensorMap(a + "kv_b_proj.weight", b + "wkv_b.weight"),
                TensorMap(a + "o_proj.weight", b + "wo.weight"),
            ]
        f = k + "ffn."
        if i < cfg.num_dense_layers:
            out += _swiglu(h + "mlp.", f)
            continue
        if arch == MIXTRAL:
            m = h + "block_sparse_moe."
            out.append(TensorMap(m + "gate.weight", f + "router.weight"))
            for e in range(cfg.moe.num_experts):
                for w in ("w1", "w3", "w2"):
                    out.append(TensorMap(f"{m}experts.{e}.{w}.weight", f"{f}experts.{e}.{w}", "t"))
        else:
            m = h + "mlp."
            out.append(TensorMap(m + "gate.weight", f + "router.weight"))
            for e in range(cfg.moe.num_experts):
                for w, name in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                    out.append(
                        TensorMap(f"{m}experts.{e}.{name}.weight", f"{f}experts.{e}.{w}", "t")
                    )
            out += _swiglu(m + "shared_experts.", f + "shared.")
    out.append(TensorMap("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        out.append(TensorMap("lm_head.weight", "head.weight"))
    return out


def _swiglu(hf_prefix: str, prefix: str) -> list[TensorMap]:
    return [
        TensorMap(hf_prefix + "gate_proj.weight", prefix + "w1.weight"),
        TensorMap(hf_prefix + "up_proj.weight", prefix + "w3.weight"),
        TensorMap(hf_prefix + "down_proj.weight", prefix + "w2.weight"),
    ]


def _rope_perm(R: int) -> Tensor:
    """moeyard's rotary row j comes from DeepSeek's row perm[j]: halves from pairs."""
    return torch.cat([torch.arange(0, R, 2), torch.arange(1, R, 2)])


def _rope_rows(cfg: ModelConfig, transform: Transform, rows: int) -> Tensor:
    """The row order that turns a DeepSeek tensor's rows into moeyard's (for `rows` rows)."""
    m = cfg.mla
    R = m.qk_rope_head_dim
    perm = _rope_perm(R)
    idx = torch.arange(rows)
    if transform == "rope_kv":
        C = m.kv_lora_rank
        idx[C : C + R] = C + perm
        return idx
    head = m.qk_nope_head_dim + R
    idx = idx.view(-1, head).clone()
    N = m.qk_nope_head_dim
    idx[:, N:] = idx[:, N:][:, perm]
    return idx.reshape(-1)


def to_hf(t: Tensor, spec: TensorMap, cfg: ModelConfig) -> Tensor:
    """A moeyard tensor in transformers' layout (exact: a transpose or a row permutation)."""
    if spec.transform == "copy":
        return t
    if spec.transform == "t":
        return t.t().contiguous()
    order = _rope_rows(cfg, spec.transform, t.shape[0])
    return t[torch.argsort(order)].contiguous()


def from_hf(t: Tensor, spec: TensorMap, cfg: ModelConfig) -> Tensor:
    """A transformers tensor in moeyard's layout (the inverse of `to_hf`)."""
    if spec.transform == "copy":
        return t
    if spec.transform == "t":
        return t.t().contiguous()
    return t[_rope_rows(cfg, spec.transform, t.shape[0])].contiguous()


def hf_shape(shape: tuple[int, ...], spec: TensorMap) -> tuple[int, ...]:
    return tuple(reversed(shape)) if spec.transform == "t" else shape


# --- reading safetensors directories -----------------------------------------------------

_ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_DTYPE_NAMES = {v: k for k, v in _ST_DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    file: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


class SafetensorsDir:
    """A transformers checkpoint directory (local or any fsspec URL): `config.json` plus
    `model.safetensors` or shards named by `model.safetensors.index.json`.

    Only the headers are read up front (a few kB per shard); `read` fetches the bytes of one
    tensor (or of one row of its first dim) with a ranged read, so memory holds one tensor
    at a time, never a whole shard.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.path = fsspec.core.url_to_fs(self.url)
        self.fs.invalidate_cache()
        cfg_path = f"{self.path}/{CONFIG}"
        if not self.fs.exists(cfg_path):
            raise HFError(f"{self.url} is not a transformers checkpoint: {CONFIG} is missing")
        with self.fs.open(cfg_path, "r") as f:
            try:
                self.config: dict[str, Any] = json.load(f)
            except json.JSONDecodeError as e:
                raise HFError(f"{self.url}/{CONFIG} is not valid JSON: {e}") from None
        if self.fs.exists(f"{self.path}/{INDEX}"):
            with self.fs.open(f"{self.path}/{INDEX}", "r") as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif self.fs.exists(f"{self.path}/{SINGLE}"):
            weight_map = {}
        else:
            raise HFError(f"{self.url} holds neither {INDEX} nor {SINGLE}")
        self.entries: dict[str, _Entry] = {}
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        for file in files:
            for name, entry in self._header(file, weight_map).items():
                if weight_map and weight_map.get(name) != file:
                    continue  # the index is the authority on which file holds a tensor
                self.entries[name] = entry
        lost = sorted(n for n in weight_map if n not in self.entries)
        if lost:
            raise HFError(
                f"{self.url}/{INDEX} maps {lost[0]} to {weight_map[lost[0]]}, which does not "
                f"hold it ({len(lost)} tensors in all)"
            )

    @property
    def where(self) -> str:
        return f"{self.url}/{CONFIG}"

    def _header(self, file: str, weight_map: dict[str, str]) -> dict[str, _Entry]:
        path = f"{self.path}/{file}"
        if not self.fs.exists(path):
            first = next((n for n, f in sorted(weight_map.items()) if f == file), "?")
            raise HFError(
                f"{self.url}: shard {file} named by {INDEX} is missing (it holds {first} and "
                "others)"
            )
        head = self.fs.cat_file(path, start=0, end=8)
        if len(head) < 8:
            raise HFError(f"{self.url}/{file} is truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(self.fs.cat_file(path, start=8, end=8 + n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HFError(f"{self.url}/{file}: corrupt safetensors header ({e})") from None
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise HFError(f"{self.url}/{file}: {name} has dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            out[name] = _Entry(
                file, _ST_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + begin, 8 + n + end
            )
        return out

    def names(self) -> list[str]:
        return sorted(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def _entry(self, name: str) -> _Entry:
        if name not in self.entries:
            raise HFError(f"{self.url} has no tensor {name}")
        return self.entries[name]

    def read(self, name: str, *, row: int | None = None) -> Tensor:
        """The tensor `name` (or its slice [row] along the first dim), on the CPU."""
        e = self._entry(name)
        start, end, shape = e.start, e.end, e.shape
        if row is not None:
            step = (end - start) // shape[0]
            start, end, shape = start + row * step, start + (row + 1) * step, shape[1:]
        data = self.fs.cat_file(f"{self.path}/{e.file}", start=start, end=end)
        if len(data) != end - start:
            raise HFError(f"{self.url}/{e.file} is truncated: {name} lacks bytes")
        if not data:
            return torch.empty(shape, dtype=e.dtype)
        return torch.frombuffer(bytearray(data), dtype=e.dtype).reshape(shape)
