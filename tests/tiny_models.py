"""Tiny random host models built at test time (no hub access): Llama and GPT-2.

A byte-level BPE tokenizer is trained on a few sentences so vLLM and transformers
load the checkpoint like any other local model.
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


def build_tiny_model(out: Path, arch: str = "llama", seed: int = 0, layers: int = 4, hidden: int = 256) -> Path:
    """Write a random tiny `arch` ("llama" or "gpt2") checkpoint to `out`; returns `out`."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, rope_theta=10000.0)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=4, n_positions=1024,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    with torch.no_grad():  # larger weights than the default init so tokens differ by position
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.to(torch.float32).save_pretrained(str(out), safe_serialization=True)
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
    from probe.artifact import save_artifact
    from probe.fingerprint import host_fingerprint
    from probe.host import Host
    from probe.model import ProbeConfig, ProbeModel

    host = Host.from_checkpoint(model)
    torch.manual_seed(0)
    cfg = ProbeConfig(n_layers=host.n_layers, d_model=host.d_model, k=8, width=32, n_encoder_layers=1, n_heads=2,
                      head_width=16, top_k=8)
    return save_artifact(out, ProbeModel(cfg).eval(), {"host_fingerprint": fingerprint or host_fingerprint(host),
                                                       "k": 8, "family_map": host.describe()})
