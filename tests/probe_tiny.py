"""Tiny random transformers hosts for probe tests (built at test time, seconds)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96


def tiny_llama(seed: int = 0, tied: bool = True, layers: int = 3, bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                      rms_norm_eps=1e-5, attention_bias=bias, bos_token_id=0, eos_token_id=1, pad_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    _scale_up(model)
    return model


def tiny_gpt2(seed: int = 0, layers: int = 3) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=256,
                     bos_token_id=0, eos_token_id=1)
    model = GPT2LMHeadModel(cfg).eval()
    _scale_up(model)
    return model


def _scale_up(model: torch.nn.Module) -> None:
    # Default init (std 0.02) makes every sublayer negligible; larger weights and non-trivial norm
    # gains/biases make the tests exercise each term of the feature definitions.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.mul_(6.0)
            elif "norm" in name or "ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))


def random_tokens(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g)
