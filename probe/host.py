"""The host model as plain tensors: norms, unembedding and the three weight families.

Loaded from a local transformers checkpoint folder (config.json + *.safetensors) or from an
in-memory transformers model, without vLLM. Everything the probe needs from the host is here:

    input_norm(i, h)      the attention-input norm of block i          h [..., d] -> [..., d]
    post_attn_norm(i, m)  the MLP-input norm of block i                m [..., d] -> [..., d]
    final_norm(h)         the final norm before the unembedding        h [..., d] -> [..., d]
    W_U                   unembedding [vocab, d] (the embedding when tied)
    family_matrix(i, f)   the full, unsharded matrix of family f in block i, oriented as a
                          torch Linear weight [out, in]:
                            qkv      [q_out + 2*kv_out, d]  q, k, v stacked (Llama) / c_attn^T (GPT-2)
                            attn_out [d, heads*head_dim]    o_proj / attn.c_proj^T
                            mlp_in   [2*d_ff or d_ff, d]    gate and up stacked / c_fc^T
    attn_out_bias         [L, d] the attention output projection's bias (zeros when it has none)

Block indices `i` are 0-based in code: block i is METHOD.md's layer l = i + 1, reading h_i = h_{l-1}.
Passing i=None applies every block's norm to a stacked input h [..., L, d] (slot i gets norm i).

Architecture families: "llama" (Llama, Mistral, Qwen2, Qwen3, SmolLM2; RMSNorm; tied or untied
embeddings; q/k/v and gate/up stored separately or fused), "gemma" (Gemma 3 text models: RMSNorm
scaling by (1 + w), stored here as the effective weight 1 + w so the RMSNorm code is Llama's;
"sandwich" sublayers whose outputs are RMS-normed before they are added, METHOD.md section 3: the
MLP reads pre_feedforward_layernorm, and the attention write a_l = m_l - h_{l-1} is
post_attention_layernorm(o_proj output), see `attn_writer`) and "gpt2" (LayerNorm; Conv1D weights
stored [in, out], i.e. transposed relative to nn.Linear).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from alignlens.probe.names import FAMILIES

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm2")
GPT2_TYPES = ("gpt2",)
GEMMA_TYPES = ("gemma3_text",)


class UnsupportedHost(ValueError):
    """The checkpoint's architecture is not one probe/ knows how to read."""


@dataclass(frozen=True)
class HostSpec:
    """Architecture numbers read from config.json; also hashed into the fingerprint."""

    family: str  # "llama", "gemma" or "gpt2"
    model_type: str  # config model_type, e.g. "llama", "qwen2", "gpt2"
    n_layers: int  # L, number of blocks
    d_model: int  # residual stream width
    vocab_size: int  # rows of the unembedding
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA)
    head_dim: int  # per-head width
    d_ff: int  # MLP hidden width
    norm_eps: float  # RMSNorm / LayerNorm epsilon
    tied_embeddings: bool  # unembedding == embedding matrix
    rope_theta: float  # rotary base (0 for GPT-2's learned positions)
    hidden_act: str  # MLP activation name

    def to_dict(self) -> dict:
        return asdict(self)


def _rope_theta(cfg: dict) -> float:
    if "rope_theta" in cfg:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    params = params.get("full_attention", params)  # Gemma 3: one entry per attention type
    return float(params.get("rope_theta", 10000.0))


def spec_from_config(cfg: dict) -> HostSpec:
    """Read a HostSpec from a transformers config dict (config.json contents)."""
    model_type = str(cfg.get("model_type", "")).lower()
    if model_type in LLAMA_TYPES or model_type in GEMMA_TYPES:
        d = int(cfg["hidden_size"])
        n_heads = int(cfg["num_attention_heads"])
        return HostSpec(
            family="gemma" if model_type in GEMMA_TYPES else "llama", model_type=model_type, n_layers=int(cfg["num_hidden_layers"]), d_model=d,
            vocab_size=int(cfg["vocab_size"]), n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            head_dim=int(cfg.get("head_dim") or d // n_heads), d_ff=int(cfg["intermediate_size"]),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_theta=_rope_theta(cfg),
            hidden_act=str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"))
    if model_type in GPT2_TYPES:
        d = int(cfg["n_embd"])
        n_heads = int(cfg["n_head"])
        return HostSpec(
            family="gpt2", model_type=model_type, n_layers=int(cfg["n_layer"]), d_model=d,
            vocab_size=int(cfg["vocab_size"]), n_heads=n_heads, n_kv_heads=n_heads,
            head_dim=d // n_heads, d_ff=int(cfg.get("n_inner") or 4 * d),
            norm_eps=float(cfg.get("layer_norm_epsilon", 1e-5)),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", True)), rope_theta=0.0,
            hidden_act=str(cfg.get("activation_function", "gelu_new")))
    raise UnsupportedHost(f"model_type {model_type!r} is not supported (supported: "
                          f"{', '.join(LLAMA_TYPES + GEMMA_TYPES + GPT2_TYPES)})")


def _canonical_tensors(spec: HostSpec, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Checkpoint tensors under one naming (`model.*` / `transformer.*`), buffers and tied copies dropped."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        if spec.family == "gpt2":
            if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of old checkpoints
                continue
            if not name.startswith(("transformer.", "lm_head.")):
                name = "transformer." + name
        if name.endswith("rotary_emb.inv_freq"):
            continue
        out[name] = t
    if spec.tied_embeddings:
        out.pop("lm_head.weight", None)
    return out


class Host:
    """A host's weights as tensors (see module docstring). Build with `from_checkpoint` or `from_model`."""

    def __init__(self, config: dict, tensors: dict[str, Tensor]):
        self.config = config
        self.spec = spec_from_config(config)
        self.tensors = _canonical_tensors(self.spec, tensors)
        s = self.spec
        self.family = s.family
        self.n_layers, self.d_model, self.vocab_size = s.n_layers, s.d_model, s.vocab_size
        f32 = lambda name: self.tensors[name].float()  # noqa: E731
        L = s.n_layers
        self.attn_post_norm_weight = None  # Gemma: the (1 + w) of the norm on the attention's output
        if s.family in ("llama", "gemma"):
            blk = "model.layers.{}."
            # Gemma's RMSNorm scales by (1 + w): kept as that effective weight
            one = 1.0 if s.family == "gemma" else 0.0
            mlp_norm = "pre_feedforward_layernorm" if s.family == "gemma" else "post_attention_layernorm"
            self.input_norm_weight = torch.stack(
                [one + f32(blk.format(i) + "input_layernorm.weight") for i in range(L)])
            self.post_attn_norm_weight = torch.stack([one + f32(blk.format(i) + f"{mlp_norm}.weight") for i in range(L)])
            if s.family == "gemma":
                self.attn_post_norm_weight = torch.stack(
                    [one + f32(blk.format(i) + "post_attention_layernorm.weight") for i in range(L)])
            self.input_norm_bias = self.post_attn_norm_bias = None
            self.final_norm_weight, self.final_norm_bias = one + f32("model.norm.weight"), None
            emb = "model.embed_tokens.weight"
            bias_name = blk + "self_attn.o_proj.bias"
        else:
            blk = "transformer.h.{}."
            self.input_norm_weight = torch.stack([f32(blk.format(i) + "ln_1.weight") for i in range(L)])
            self.input_norm_bias = torch.stack([f32(blk.format(i) + "ln_1.bias") for i in range(L)])
            self.post_attn_norm_weight = torch.stack([f32(blk.format(i) + "ln_2.weight") for i in range(L)])
            self.post_attn_norm_bias = torch.stack([f32(blk.format(i) + "ln_2.bias") for i in range(L)])
            self.final_norm_weight, self.final_norm_bias = f32("transformer.ln_f.weight"), f32("transformer.ln_f.bias")
            emb = "transformer.wte.weight"
            bias_name = blk + "attn.c_proj.bias"
        self.W_U: Tensor = f32(emb if s.tied_embeddings or "lm_head.weight" not in self.tensors else "lm_head.weight")
        self.attn_out_bias = torch.stack([
            f32(bias_name.format(i)) if bias_name.format(i) in self.tensors else torch.zeros(s.d_model)
            for i in range(L)])

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | Path) -> "Host":
        """Load config.json and every *.safetensors shard of a local transformers checkpoint."""
        root = Path(checkpoint_dir)
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{cfg_path} not found: not a transformers checkpoint folder")
        config = json.loads(cfg_path.read_text())
        shards = sorted(root.glob("*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no *.safetensors weights in {root}")
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(load_file(str(shard)))
        return cls(config, tensors)

    @classmethod
    def from_model(cls, model: nn.Module) -> "Host":
        """Read an in-memory transformers causal LM (weights are shared, not copied)."""
        tensors = {k: v.detach() for k, v in model.state_dict().items()}
        return cls(model.config.to_dict(), tensors)

    def to(self, device: torch.device | str) -> "Host":
        """Move the tensors the probe uses at serving time (norms, W_U, biases) to `device`."""
        for name in ("input_norm_weight", "input_norm_bias", "post_attn_norm_weight", "post_attn_norm_bias",
                     "final_norm_weight", "final_norm_bias", "W_U", "attn_out_bias", "attn_post_norm_weight"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # ---- norms --------------------------------------------------------------------------------
    def _norm(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        x = x.float()
        if self.family != "gpt2":  # RMSNorm, computed in float32 as transformers does
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps) * w
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) * torch.rsqrt(var + self.spec.norm_eps) * w + b

    def input_norm(self, i: int | None, h: Tensor) -> Tensor:
        """Attention-input norm of block i on h [..., d]; i=None: h [..., L, d], slot i gets norm i."""
        sel = slice(None) if i is None else i
        b = None if self.input_norm_bias is None else self.input_norm_bias[sel]
        return self._norm(h, self.input_norm_weight[sel], b)

    def post_attn_norm(self, i: int | None, m: Tensor) -> Tensor:
        """MLP-input norm of block i on m [..., d]; i=None: m [..., L, d], slot i gets norm i."""
        sel = slice(None) if i is None else i
        b = None if self.post_attn_norm_bias is None else self.post_attn_norm_bias[sel]
        return self._norm(m, self.post_attn_norm_weight[sel], b)

    def attn_writer(self, write: Tensor) -> Tensor:
        """What the attention output projection wrote, from the attention sublayer's write
        a = m_l - h_{l-1} [..., L, d] (block i in slot i): a - b_o for Llama and GPT-2. Gemma norms
        o_proj's output y before adding it, a = (1 + w) * y / rms(y), so this is y / rms(y): y's
        direction (where W_O's singular directions live), its scale taken by the norm."""
        if self.attn_post_norm_weight is None:
            return write.float() - self.attn_out_bias
        w = self.attn_post_norm_weight
        # a dimension whose 1 + w is 0 never reaches the stream (Gemma 3 270M: one of 640 in blocks 1
        # and 4): its part of y cannot be read back, and is 0 here
        erased = w == 0
        return torch.where(erased, 0.0, write.float() / torch.where(erased, 1.0, w))

    def attn_readout(self, v: Tensor) -> Tensor:
        """The readout direction v [N, d] of the residual stream as seen by `attn_writer`'s vectors,
        per block [N, L, d]: v . a_l == attn_readout(v)[:, l] . attn_writer(a)_l (+ v . b_o)."""
        if self.attn_post_norm_weight is None:
            return v[:, None, :].expand(-1, self.n_layers, -1)
        return v[:, None, :] * self.attn_post_norm_weight

    def final_norm(self, h: Tensor) -> Tensor:
        """Final norm on h [..., d] -> [..., d] float32."""
        return self._norm(h, self.final_norm_weight, self.final_norm_bias)

    def final_norm_vjp(self, h: Tensor, u: Tensor) -> Tensor:
        """d (u . final_norm(h)) / d h for h, u [..., d] (analytic, no autograd) -> [..., d] float32."""
        h, u = h.float(), u.float()
        v = u * self.final_norm_weight
        d = h.shape[-1]
        if self.family != "gpt2":
            s = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)
            return s * v - (s ** 3 / d) * h * (v * h).sum(-1, keepdim=True)
        mu = h.mean(-1, keepdim=True)
        s = torch.rsqrt((h - mu).pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)
        xhat = (h - mu) * s
        return s * (v - v.mean(-1, keepdim=True) - xhat * (v * xhat).mean(-1, keepdim=True))

    def logits(self, h: Tensor) -> Tensor:
        """Full-vocabulary logits final_norm(h) @ W_U^T: h [..., d] -> [..., vocab] float32."""
        return self.final_norm(h) @ self.W_U.T

    # ---- weight families ----------------------------------------------------------------------
    def _linear(self, name: str, conv1d: bool = False) -> Tensor:
        w = self.tensors[name].float()
        return w.T if conv1d else w  # GPT-2 Conv1D stores [in, out]

    def family_matrix(self, i: int, family: str) -> Tensor:
        """Full matrix of `family` in block i as an nn.Linear weight [out, in], float32 (see module doc)."""
        if family not in FAMILIES:
            raise KeyError(f"family {family!r} is not one of {FAMILIES}")
        t = self.tensors
        if self.family == "gpt2":
            name = {"qkv": "attn.c_attn", "attn_out": "attn.c_proj", "mlp_in": "mlp.c_fc"}[family]
            return self._linear(f"transformer.h.{i}.{name}.weight", conv1d=True)
        p = f"model.layers.{i}."
        if family == "qkv":
            if p + "self_attn.qkv_proj.weight" in t:
                return self._linear(p + "self_attn.qkv_proj.weight")
            return torch.cat([self._linear(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if family == "attn_out":
            return self._linear(p + "self_attn.o_proj.weight")
        if p + "mlp.gate_up_proj.weight" in t:
            return self._linear(p + "mlp.gate_up_proj.weight")
        return torch.cat([self._linear(p + "mlp.gate_proj.weight"), self._linear(p + "mlp.up_proj.weight")])

    def attn_out_weights(self, device: torch.device | str | None = None) -> Tensor:
        """Every block's attention output projection [L, d, heads*head_dim] float32 (built once,
        kept on the device asked for): per-head direct logit attribution reads it."""
        w = getattr(self, "_attn_out_w", None)
        if w is None or (device is not None and w.device != torch.device(device)):
            w = torch.stack([self.family_matrix(i, "attn_out") for i in range(self.n_layers)])
            w = w.to(device) if device is not None else w
            self._attn_out_w = w
        return w

    def describe(self) -> dict:
        """The family map stored in artifacts: which checkpoint tensors make each family."""
        if self.family == "gpt2":
            return {"qkv": "transformer.h.{i}.attn.c_attn.weight^T",
                    "attn_out": "transformer.h.{i}.attn.c_proj.weight^T (bias removed from the writer vector)",
                    "mlp_in": "transformer.h.{i}.mlp.c_fc.weight^T"}
        if self.family == "gemma":
            return {"qkv": "model.layers.{i}.self_attn.[q;k;v]_proj.weight (reading input_layernorm)",
                    "attn_out": "model.layers.{i}.self_attn.o_proj.weight (its output before post_attention_layernorm)",
                    "mlp_in": "model.layers.{i}.mlp.[gate;up]_proj.weight (reading pre_feedforward_layernorm)"}
        return {"qkv": "model.layers.{i}.self_attn.[q;k;v]_proj.weight (or qkv_proj)",
                "attn_out": "model.layers.{i}.self_attn.o_proj.weight",
                "mlp_in": "model.layers.{i}.mlp.[gate;up]_proj.weight (or gate_up_proj)"}
