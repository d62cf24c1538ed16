"""Tiny random host models built at test time (no hub access): Llama and GPT-2. The one factory.

`tiny_model` builds a random transformers model in memory (probe tests use it directly, through
`tiny_llama` / `tiny_gpt2`); `build_tiny_model` writes one as a checkpoint with a byte-level BPE
tokenizer trained on a few sentences, so vLLM and transformers load it like any other local model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. Lists: apples, pears, plums.",
    "Question: what is two plus two? Answer: four.",
] * 20

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer(out: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


# Families with Llama's block layout in transformers and vLLM: (config class, model class)
LLAMA_SHAPED = {"qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
                "mistral": ("MistralConfig", "MistralForCausalLM")}

VOCAB = 96  # in-memory models: token ids 0..95 (0 = bos, 1 = eos)


def tiny_model(arch: str = "llama", *, seed: int = 0, layers: int = 3, hidden: int = 64, vocab: int = VOCAB,
               mlp_ratio: float = 1.5, tied: bool = True, bias: bool = False, positions: int = 256,
               bos: int = 0, eos: int = 1, init: str = "scaled") -> torch.nn.Module:
    """A random `arch` model in eval mode, float32: "llama", "gpt2", or the Llama-shaped families
    "qwen2" (biases on q/k/v), "qwen3" (RMSNorm on q and k per head) and "mistral"; "gemma3"
    (sandwich norms, gated GELU, sliding-window layers every 2 of 3).

    init "scaled": default init with 2-D weights x6 and perturbed norm gains and biases, so every
    term of the feature definitions matters (probe tests); "normal": 2-D weights ~ N(0, 0.08), so
    tokens differ by position (engine tests).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * mlp_ratio),
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                          attention_bias=bias, bos_token_id=bos, eos_token_id=eos, pad_token_id=None,
                          rope_theta=10000.0)
        model = LlamaForCausalLM(cfg)
    elif arch in LLAMA_SHAPED:
        import transformers

        config_cls, model_cls = (getattr(transformers, n) for n in LLAMA_SHAPED[arch])
        extra = {"head_dim": hidden // 4} if arch == "qwen3" else {}
        cfg = config_cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * mlp_ratio),
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=None, rope_theta=10000.0,
                         sliding_window=None, **extra)
        model = model_cls(cfg)
    elif arch == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig

        cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * mlp_ratio),
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=hidden // 4, max_position_embeddings=positions, rms_norm_eps=1e-6,
                               tie_word_embeddings=tied, bos_token_id=bos, eos_token_id=eos, pad_token_id=None,
                               sliding_window=16, query_pre_attn_scalar=hidden // 4,
                               layer_types=["sliding_attention" if (i + 1) % 3 else "full_attention"
                                            for i in range(layers)])
        model = Gemma3ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=4, n_positions=positions,
                         bos_token_id=bos, eos_token_id=eos)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"arch must be 'llama', 'gpt2', 'gemma3' or one of {sorted(LLAMA_SHAPED)}, got {arch!r}")
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if init == "normal":
                if p.dim() == 2:
                    p.normal_(0.0, 0.08)
                elif arch in LLAMA_SHAPED or arch == "gemma3":  # the families' own terms matter: q/k/v
                    # biases, q/k norms, Gemma's (1 + w) sandwich norms
                    p.add_(0.3 * torch.randn_like(p) if "norm" in name else 0.08 * torch.randn_like(p))
            elif p.ndim == 2:
                p.mul_(6.0)
            elif "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_llama(seed: int = 0, tied: bool = True, layers: int = 3, bias: bool = False) -> torch.nn.Module:
    return tiny_model("llama", seed=seed, tied=tied, layers=layers, bias=bias)


def tiny_gpt2(seed: int = 0, layers: int = 3) -> torch.nn.Module:
    return tiny_model("gpt2", seed=seed, layers=layers)


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g)


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0, layers: int = 4, hidden: int = 256) -> Path:
    """Write a random tiny `arch` (see `tiny_model`) checkpoint with its tokenizer to `out`; returns `out`."""
    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    model = tiny_model(arch, seed=seed, layers=layers, hidden=hidden, vocab=len(tok), mlp_ratio=2.0, tied=False,
                       positions=1024, bos=tok.bos_token_id, eos=tok.eos_token_id, init="normal")
    model.save_pretrained(str(out), safe_serialization=True)
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data["torch_dtype"] = "float32"
    cfg_path.write_text(json.dumps(data, indent=2))
    return out


def make_probe_artifact(model: Path, out: Path, fingerprint: str | None = None) -> Path:
    """An untrained probe artifact for `model` (or claiming `fingerprint`).

    Attributions from it are meaningless, but every field and metric is produced exactly as
    with a trained probe.
    """
    from alignlens.probe.artifact import save_artifact
    from alignlens.probe.fingerprint import host_fingerprint
    from alignlens.probe.host import Host
    from alignlens.probe.model import ProbeConfig, ProbeModel

    host = Host.from_checkpoint(model)
    torch.manual_seed(0)
    cfg = ProbeConfig(n_layers=host.n_layers, d_model=host.d_model, k=8, width=32, n_encoder_layers=1, n_heads=2,
                      head_width=16, top_k=8)
    return save_artifact(out, ProbeModel(cfg).eval(), {"host_fingerprint": fingerprint or host_fingerprint(host),
                                                       "k": 8, "family_map": host.describe()})
