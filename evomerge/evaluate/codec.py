"""Text <-> tokens, exactly as lm-eval's HF wrapper does it.

The built-in tasks tokenize the way lm-eval's ``HFLM`` does, so that the two
agree example by example: the tokenizer's own special-token policy, trailing
spaces of a context moved to its continuation, the continuation taken from the
encoding of the whole string, and BOS (else EOS) standing in for an empty
context. Everything here runs once per Evaluator, never per trial.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

# `tokenizers` decoders that work token by token (or byte by byte): the text of a token sequence starts with
# the text of each of its prefixes, up to an unfinished UTF-8 character at the end ("\ufffd").
_PREFIX_STABLE = {"Fuse", "ByteLevel", "Metaspace", "ByteFallback", "Replace", "Strip", "BPEDecoder"}


class Codec:
    def __init__(self, tokenizer: Any, model: Any = None) -> None:
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        self.eos_id: int | None = eos
        ids = {eos} if eos is not None else set()
        generation = getattr(model, "generation_config", None)
        extra = getattr(generation, "eos_token_id", None)
        ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
        self.stop_ids: frozenset[int] = frozenset(ids)  # end-of-sequence tokens: each one stops a generation
        bos = tokenizer.bos_token_id
        self.prefix_id: int | None = bos if bos is not None else eos
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (eos if eos is not None else 0)
        # lm-eval encodes a string that starts with this text (a chat template's BOS) without special tokens
        lead = tokenizer.decode([self.prefix_id]) if self.prefix_id is not None else ""
        self.prefix_text: str | None = lead or None
        self.prefix_stable = _prefix_stable(tokenizer)
        self.max_length = context_length(model, tokenizer)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's tokens as lm-eval's `tok_encode` makes them: with the tokenizer's own special tokens,
        except for a text that already starts with BOS (a rendered chat template), which gets none added."""
        if not texts:
            return []
        led = [bool(self.prefix_text) and t.startswith(self.prefix_text) for t in texts]
        out: list[list[int]] = [[] for _ in texts]
        for lead in (False, True):
            index = [i for i, flag in enumerate(led) if flag == lead]
            if index:
                kwargs = {"add_special_tokens": False} if lead else {}
                for i, ids in zip(index, self.tokenizer([texts[i] for i in index], **kwargs)["input_ids"]):
                    out[i] = list(ids)
        return out

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def chat(self, prompts: Sequence[str], *, system: str | None = None) -> list[str]:
        """Each prompt as lm-eval 0.4 renders it with apply_chat_template=True (and system_instruction=system):
        a system turn where one is given, the prompt as one user turn, then the template's generation prompt.
        A template that refuses a system turn renders without it, as lm-eval falls back."""
        import jinja2

        out = []
        for prompt in prompts:
            turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            try:
                out.append(self._render(turns))
            except jinja2.exceptions.TemplateError:
                out.append(self._render(turns[-1:]))
        return out

    def _render(self, turns: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True,
                                                  continue_final_message=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pairs(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[tuple[list[int], list[int]]]:
        """(context tokens, continuation tokens) for each pair, as lm-eval's `_encode_pair` makes them."""
        moved_ctx, moved_cont = [], []
        for context, continuation in zip(contexts, continuations, strict=True):
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
            moved_ctx.append(context)
            moved_cont.append(continuation)
        unique_ctx = sorted(set(c for c in moved_ctx if c))
        ctx_ids = dict(zip(unique_ctx, self.encode(unique_ctx)))
        whole = self.encode([c + k for c, k in zip(moved_ctx, moved_cont) if c])
        out, w = [], iter(whole)
        for context, continuation in zip(moved_ctx, moved_cont):
            if not context:  # lm-eval: BOS (else EOS) as the context of an empty prompt
                cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
                if self.prefix_id is not None and cont and cont[0] == self.prefix_id:
                    out.append((cont[:1], cont[1:]))
                else:
                    out.append(([self.prefix_id if self.prefix_id is not None else self.pad_id], list(cont)))
                continue
            ctx = ctx_ids[context]
            out.append((ctx, next(w)[len(ctx):]))
        return out

    def tails(self, contexts: Sequence[str], rests: Sequence[str]) -> list[list[int]]:
        """Tokens of each `rest` written right after its context, taken from the encoding of the whole.

        Generation contexts keep their trailing spaces (lm-eval's generate_until does not move them).
        """
        wholes = self.encode([c + r for c, r in zip(contexts, rests, strict=True)])
        return [whole[len(ctx):] for whole, ctx in zip(wholes, self.prompts(contexts))]

    def prompts(self, texts: Sequence[str]) -> list[list[int]]:
        """Generation contexts (an empty prompt starts from BOS, else EOS)."""
        encoded = self.encode(texts)
        return [ids if ids else [self.prefix_id if self.prefix_id is not None else self.pad_id] for ids in encoded]

    def text_tokens(self, text: str) -> list[int]:
        """A whole text for perplexity, led by BOS (else EOS) so that its first token is scored too."""
        ids = self.encode([text])[0]
        if self.prefix_id is not None and (not ids or ids[0] != self.prefix_id):
            ids = [self.prefix_id] + ids
        return ids


_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no model_max_length"


def context_length(model: Any, tokenizer: Any) -> int:
    """The model's context in tokens, found as lm-eval's HF wrapper finds it: the config (its text_config
    first), then the tokenizer's model_max_length, else 2048."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if value is not None:
            return int(value)
    length = getattr(tokenizer, "model_max_length", None)
    if length is not None and length != _TOKENIZER_INFINITY:
        return int(length)
    return 2048


def _prefix_stable(tokenizer: Any) -> bool:
    """Whether decode(a + b) always starts with decode(a) (trailing U+FFFD aside): known from the decoder's type."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return False  # slow tokenizers, and transformers' clean-up (" n't" -> "n't") rewrites across tokens

    def stable(decoder: dict | None) -> bool:
        if decoder is None:  # tokenizers' default: tokens joined by spaces
            return True
        if decoder.get("type") == "Sequence":
            return all(stable(d) for d in decoder.get("decoders", []))
        return decoder.get("type") in _PREFIX_STABLE

    try:
        return stable(json.loads(backend.to_str()).get("decoder"))
    except (ValueError, AttributeError):
        return False
