"""Per-token text deltas that never split a UTF-8 code point.

Two sources are combined, because neither alone gives per-token text that matches what
vLLM returns:
  - our own incremental decoder (tokenizers' DecodeStream, seeded with the prompt so the
    first token decodes in context) knows which token completed which code points;
  - vLLM's cumulative output text knows what may be shown: it withholds text that might be
    the start of a stop string and cuts the stop string off when it matches.
A token's delta is vLLM's text up to the end of our decode of that token, when the two agree
there; otherwise (text withheld) it stays empty and the released text moves to a later token.
The last token of each engine output releases everything vLLM shows. So the deltas of a
stream concatenate to exactly vLLM's final text, and each delta is whole code points.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

_PROMPT_CONTEXT_TOKENS = 8  # enough left context for any decoder's leading-space rules


class TokenText:
    """Incremental text of one completion. `tokenizer`: a transformers fast tokenizer."""

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(ids=list(prompt_ids[-_PROMPT_CONTEXT_TOKENS:]), skip_special_tokens=True)
        self._decoded = ""  # our decode of the completion so far
        self._released = 0  # characters of the completion text handed out

    def _decode(self, token_id: int) -> None:
        self._decoded += self._stream.step(self._backend, token_id) or ""

    def step(self, token_ids: list[int], shown: str | None = None) -> list[str]:
        """Deltas for the new `token_ids` of one output; `shown` is vLLM's cumulative text
        after them (None: no vLLM text, e.g. audit, our decode is shown as is)."""
        deltas = []
        for j, token_id in enumerate(token_ids):
            self._decode(token_id)
            if shown is None:
                cut = len(self._decoded)
            elif j == len(token_ids) - 1:
                cut = len(shown)
            else:
                end = len(self._decoded)
                agrees = end <= len(shown) and shown[self._released:end] == self._decoded[self._released:]
                cut = end if agrees else self._released
            text = shown if shown is not None else self._decoded
            cut = max(cut, self._released)
            deltas.append(text[self._released:cut])
            self._released = cut
        return deltas
