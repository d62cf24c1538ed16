"""Capture-enabled model classes.

Why this shape (measured, see VLLM_NOTES.md): forward hooks do not fire inside the
compiled model, and Llama-family blocks return `(mlp_out, residual)` with the add
deferred into the next fused add+RMSNorm. So capture is part of the model's own
compiled forward: the inner model returns, beside its normal output, a list of
2L+1 tensors `[h_0, m_1, h_1, m_2, h_2, ..., m_L, h_L]`, each `[tokens, d_model]`
(`resid` = h, `resid_mid` = m; probe/names.py). The outer, uncompiled
`ForCausalLM.forward` hands that list to `capture.on_forward` (which keeps only the
rows that decide tokens) and returns the plain hidden states, so vLLM's model runner
sees a stock model.

Llama/Mistral/Qwen2/Qwen3 use vLLM's EAGLE-3 auxiliary-hidden-state mechanism: all depths are
enabled at construction, before compilation, and `_maybe_add_hidden_state` is
extended to also record m_l (the `residual` a Llama block returns is exactly the
stream after its attention add). GPT-2 blocks add inside themselves, so the GPT-2
inner forward is written out here with the same arithmetic as vLLM's GPT2Block.

Per-head capture (heads.py): each attention output projection records its input, the heads'
outputs side by side, into a buffer it owns (for direct logit attribution per head).

Interventions (interventions.py) sit in the blocks' own forward: each decoder layer class below
repeats vLLM's forward with the hooks applied to what q/k/v and the MLP read and to what the
attention sublayer writes, when the model was built with them (ALIGNLENS_INTERVENTIONS, default on).
"""

from __future__ import annotations

from itertools import islice

from vllm.model_executor.models import gemma3 as vllm_gemma3
from vllm.model_executor.models import gpt2 as vllm_gpt2
from vllm.model_executor.models import qwen2 as vllm_qwen2
from vllm.model_executor.models import qwen3 as vllm_qwen3
from vllm.model_executor.models.gemma3 import Gemma3DecoderLayer, Gemma3ForCausalLM, Gemma3Model
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel, GPT2Model
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from vllm.model_executor.models.mistral import MistralDecoderLayer, MistralForCausalLM, MistralModel
from vllm.model_executor.models.qwen2 import Qwen2DecoderLayer, Qwen2ForCausalLM, Qwen2Model
from vllm.model_executor.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM, Qwen3Model

from alignlens.service.vllm_plugin import capture, heads, internals, interventions
from alignlens.service.vllm_plugin.interventions import MLP_IN, QKV


def _require_single_stage() -> None:
    if internals.pipeline_stages() > 1:
        raise NotImplementedError("alignlens capture does not support pipeline parallelism")


def _hook_sizes(vllm_config) -> tuple[int, int]:
    """(d_model, most rows one forward can have) for the intervention buffers."""
    sched = vllm_config.scheduler_config
    return vllm_config.model_config.get_hidden_size(), sched.max_num_batched_tokens + sched.max_num_seqs


def _attach_hooks(blocks: list, out_projections, vllm_config) -> None:
    """Give each block its intervention hooks and each attention output projection its per-head
    buffer (model construction, before compilation; each off by its own switch)."""
    d_model, max_rows = _hook_sizes(vllm_config)
    if interventions.enabled():
        interventions.attach_hooks(blocks, d_model, max_rows)
    if heads.enabled():
        heads.attach(out_projections, max_rows)


def _attention(layer, iv, positions, hidden_states, residual, **kwargs):
    """A decoder layer's first half as vLLM writes it: the input norm (fused with the deferred add
    of the previous block's write), then attention, with the hooks on what q/k/v read and on what
    o_proj writes. Returns (o_proj's output, the stream before this block's attention)."""
    if residual is None:
        residual = hidden_states
        hidden_states = layer.input_layernorm(hidden_states)
    else:
        hidden_states, residual = layer.input_layernorm(hidden_states, residual)
    if iv is not None:
        hidden_states = iv.read(hidden_states, QKV)
    hidden_states = layer.self_attn(positions=positions, hidden_states=hidden_states, **kwargs)
    if iv is not None:
        hidden_states = iv.write(hidden_states)
    return hidden_states, residual


class _IntervenedLayer:
    """A Llama-family decoder layer's forward (as vLLM writes it) with the intervention hooks."""

    def forward(self, positions, hidden_states, residual, t_cond=None):
        iv = getattr(self, "alignlens_iv", None)
        hidden_states, residual = _attention(self, iv, positions, hidden_states, residual)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        if getattr(self, "ada_rms_norm_t_cond", None) is not None:  # Mistral's time-conditioned variant
            hidden_states = hidden_states * (1 + self.ada_rms_norm_t_cond(t_cond))
        if iv is not None:
            hidden_states = iv.read(hidden_states, MLP_IN)
        hidden_states = self.mlp(hidden_states)
        return hidden_states, residual


class CaptureLlamaDecoderLayer(_IntervenedLayer, LlamaDecoderLayer):
    pass


class CaptureMistralDecoderLayer(_IntervenedLayer, MistralDecoderLayer):
    pass


class CaptureQwen2DecoderLayer(_IntervenedLayer, Qwen2DecoderLayer):
    pass


class CaptureQwen3DecoderLayer(_IntervenedLayer, Qwen3DecoderLayer):
    pass


class _AuxCaptureMixin:
    """Records [h_0, m_1, h_1, ..., m_L, h_L] through the EAGLE-3 aux mechanism; gives every block
    its intervention hooks."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._enable_full_capture()
        layers = list(islice(self.layers, self.start_layer, self.end_layer))
        _attach_hooks(layers, [layer.self_attn.o_proj for layer in layers], kwargs["vllm_config"])

    def _enable_full_capture(self) -> None:
        _require_single_stage()
        self._set_aux_hidden_state_layers(tuple(range(self.start_layer, self.end_layer + 1)))

    def _maybe_add_hidden_state(self, aux_hidden_states, layer_idx, hidden_states, residual):
        if layer_idx in self.aux_hidden_state_layers:
            if residual is None:  # before block 1: the embeddings are the stream
                aux_hidden_states.append(hidden_states)
            else:
                # `residual` is m_l; clone because the next fused add+norm updates it in place.
                aux_hidden_states.append(residual.clone())
                aux_hidden_states.append(hidden_states + residual)
        return aux_hidden_states


class CaptureLlamaModel(_AuxCaptureMixin, LlamaModel):
    pass


class CaptureQwen2Model(_AuxCaptureMixin, Qwen2Model):
    def __init__(self, *, vllm_config, prefix: str = "", decoder_layer_type=Qwen2DecoderLayer):
        super().__init__(vllm_config=vllm_config, prefix=prefix, decoder_layer_type=CaptureQwen2DecoderLayer)


class CaptureQwen3Model(_AuxCaptureMixin, Qwen3Model):
    decoder_layer_type = CaptureQwen3DecoderLayer  # Qwen3Model hands this to Qwen2Model


class CaptureGPT2Model(GPT2Model):
    """GPT-2 with the block arithmetic inlined so m_l is visible (and the hooks applied)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        blocks = list(islice(self.h, self.start_layer, self.end_layer))
        _attach_hooks(blocks, [block.attn.c_proj for block in blocks], vllm_config)

    def forward(self, input_ids, position_ids, intermediate_tensors, inputs_embeds):
        _require_single_stage()
        if inputs_embeds is None:
            inputs_embeds = self.embed_input_ids(input_ids)
        h = inputs_embeds + self.wpe(position_ids)
        stream = [h]
        for block in islice(self.h, self.start_layer, self.end_layer):
            iv = getattr(block, "alignlens_iv", None)
            x = block.ln_1(h)
            y = block.attn(hidden_states=x if iv is None else iv.read(x, QKV))
            m = (y if iv is None else iv.write(y)) + h
            x = block.ln_2(m)
            h = m + block.mlp(x if iv is None else iv.read(x, MLP_IN))
            stream += [m, h]
        return self.ln_f(h), stream


class CaptureGemma3DecoderLayer(Gemma3DecoderLayer):
    """vLLM's Gemma 3 layer with the intervention hooks. Its sublayers are "sandwich" normed: the
    attention's output is RMS-normed (post_attention_layernorm) before it is added, so the
    attn_out hook acts on what o_proj writes, before that norm (where W_O's directions live)."""

    def forward(self, positions, hidden_states, residual, **kwargs):
        iv = getattr(self, "alignlens_iv", None)
        hidden_states, residual = _attention(self, iv, positions, hidden_states, residual, **kwargs)
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        if iv is not None:
            hidden_states = iv.read(hidden_states, MLP_IN)
        hidden_states = self.mlp(hidden_states)
        hidden_states = self.post_feedforward_layernorm(hidden_states)
        return hidden_states, residual


class CaptureGemma3Model(Gemma3Model):
    """Gemma 3 with the stream recorded in its own (compiled) forward. A layer returns
    (its MLP write, m_l) with the add deferred into the next fused add+norm, as in Llama, so
    h_l = write + m_l; m_l and h_0 are cloned because the fused add+norm updates in place."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        with _SwapInner(vllm_gemma3, "Gemma3DecoderLayer", CaptureGemma3DecoderLayer):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        layers = list(islice(self.layers, self.start_layer, self.end_layer))
        _attach_hooks(layers, [layer.self_attn.o_proj for layer in layers], vllm_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        _require_single_stage()
        h = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        stream = [h.clone()]
        residual = None
        for layer in islice(self.layers, self.start_layer, self.end_layer):
            h, residual = layer(positions, h, residual, **kwargs)
            stream += [residual.clone(), h + residual]
        hidden, _ = self.norm(h, residual)
        return hidden, stream


class _CaptureForwardMixin:
    """Outer, uncompiled forward: hand the stream to capture, return the plain hidden states."""

    _inner = "model"  # attribute holding the compiled inner model

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kw):
        capture.before_forward()  # this step's intervention coefficients
        out = getattr(self, self._inner)(input_ids, positions, intermediate_tensors, inputs_embeds)
        if isinstance(out, tuple):
            hidden, stream = out
            capture.on_forward(stream)
            return hidden
        return out


class CaptureLlamaForCausalLM(_CaptureForwardMixin, LlamaForCausalLM):
    def _init_model(self, vllm_config, prefix="", layer_type=LlamaDecoderLayer):
        return CaptureLlamaModel(vllm_config=vllm_config, prefix=prefix, layer_type=CaptureLlamaDecoderLayer)


class CaptureMistralModel(_AuxCaptureMixin, MistralModel):
    pass


class CaptureMistralForCausalLM(_CaptureForwardMixin, MistralForCausalLM):
    def _init_model(self, vllm_config, prefix="", layer_type=MistralDecoderLayer):
        return CaptureMistralModel(vllm_config=vllm_config, prefix=prefix, layer_type=CaptureMistralDecoderLayer)


class _SwapInner:
    """Build a parent model with its inner model class swapped (no double construction)."""

    def __init__(self, module, name: str, replacement: type):
        self.module, self.name, self.replacement = module, name, replacement

    def __enter__(self):
        self.original = getattr(self.module, self.name)
        setattr(self.module, self.name, self.replacement)

    def __exit__(self, *exc):
        setattr(self.module, self.name, self.original)


class CaptureQwen2ForCausalLM(_CaptureForwardMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with _SwapInner(vllm_qwen2, "Qwen2Model", CaptureQwen2Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class CaptureQwen3ForCausalLM(_CaptureForwardMixin, Qwen3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with _SwapInner(vllm_qwen3, "Qwen3Model", CaptureQwen3Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class CaptureGemma3ForCausalLM(_CaptureForwardMixin, Gemma3ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        with _SwapInner(vllm_gemma3, "Gemma3Model", CaptureGemma3Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


class CaptureGPT2LMHeadModel(_CaptureForwardMixin, GPT2LMHeadModel):
    _inner = "transformer"

    def __init__(self, *, vllm_config, prefix: str = ""):
        with _SwapInner(vllm_gpt2, "GPT2Model", CaptureGPT2Model):
            super().__init__(vllm_config=vllm_config, prefix=prefix)


__all__ = [
    "CaptureLlamaForCausalLM", "CaptureMistralForCausalLM",
    "CaptureQwen2ForCausalLM", "CaptureQwen3ForCausalLM", "CaptureGemma3ForCausalLM", "CaptureGPT2LMHeadModel",
]
