"""The stopping rule, the proof that an example can no longer match, and re-drafting: plain Python, no model."""

from __future__ import annotations

import pytest

from evomerge.evaluate.codec import _prefix_stable
from evomerge.evaluate.generate import GenExample, Stopping, redraft

CHARS = {i: c for i, c in enumerate("0123456789 =\n", start=3)}  # 1 = EOS
IDS = {c: i for i, c in CHARS.items()}


def decode(ids) -> str:
    return "".join(CHARS.get(i, "") for i in ids)


def ids(text: str) -> list[int]:
    return [IDS[c] for c in text]


def stopping(*stops: str, max_new: int = 8, early: bool = True) -> Stopping:
    return Stopping(frozenset({1}), tuple(stops), max_new, decode, early_exit=early)


def test_settle_eos_length_and_stop_strings() -> None:
    assert stopping().settle(ids("4 8") + [1] + ids("99")) == ids("4 8")  # EOS ends it and is not output
    assert stopping().settle(ids("4 8")) is None  # still going
    assert stopping(max_new=2).settle(ids("4 8")) == ids("4 ")
    s = stopping("\n", " 9")
    assert s.settle(ids("4 8 9 1")) == ids("4 8 9")  # stops as soon as a stop string appears ...
    assert s.text(ids("4 8 9")) == "4 8"  # ... and the text is cut before it
    assert s.settle(ids("4\n5")) == ids("4\n") and s.text(ids("4\n")) == "4"


@pytest.mark.parametrize("text, hopeless", [
    ("4 9", True), ("4", False), ("", False), ("  ", False), (" 4 8", False), ("4 8  \n", False),
    ("4 8 3", True), ("5", True), ("4 8 ", False),
])
def test_hopeless_with_strip(text: str, hopeless: bool) -> None:
    assert stopping().hopeless(ids(text), " 4 8") is hopeless
    assert stopping(early=False).hopeless(ids(text), " 4 8") is False  # never claimed without early exit


def test_hopeless_leaves_room_for_a_stop_string_and_an_unfinished_character() -> None:
    # "4 8 =" cannot match "4 8" ... unless "= " is a stop string that may still complete after "=": then the
    # last character is not yet certain
    assert stopping().hopeless(ids("4 8 ="), "4 8")
    assert not stopping("= ").hopeless(ids("4 8 ="), "4 8")
    unfinished = Stopping(frozenset({1}), (), 8, lambda t: decode(t) + "\ufffd", early_exit=True)
    assert not unfinished.hopeless(ids("4 8"), "4 8")


def test_redraft_from_proven_tokens() -> None:
    ex = GenExample(prompt="inc 3 7 =", target="4 8", context=[], draft=[])
    assert redraft(ex, " ") == ("inc 3 7 = ", "4 8")  # the model writes a space first: draft the rest
    assert redraft(ex, " 4") == ("inc 3 7 = 4", " 8")
    assert redraft(ex, " 4 8 ") == ("inc 3 7 = 4 8 ", "")  # target done, then a space: draft the end
    assert redraft(ex, " 5") is None


@pytest.mark.parametrize("n, width", [(1, 4), (4, 4), (5, 4), (10, 4), (9, 4), (30, 7)])
def test_text_windows_are_lm_evals_rolling_windows(n: int, width: int) -> None:
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from evomerge.evaluate.score import text_windows

    tokens = list(range(100, 100 + n + 1))  # the prefix token, then n tokens
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens[1:], tokens[0], width, 1)]
    assert text_windows(tokens, width) == [((ctx + cont)[:-1], cont) for ctx, cont in theirs]


def test_prefix_stable_decoders() -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    def tokenizer(decoder, clean_up: bool = False):
        core = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
        if decoder is not None:
            core.decoder = decoder
        return PreTrainedTokenizerFast(tokenizer_object=core, clean_up_tokenization_spaces=clean_up)

    assert _prefix_stable(tokenizer(decoders.Fuse()))
    assert _prefix_stable(tokenizer(decoders.ByteLevel()))
    assert _prefix_stable(tokenizer(decoders.Sequence([decoders.Replace("_", " "), decoders.Fuse()])))
    assert _prefix_stable(tokenizer(None))
    assert not _prefix_stable(tokenizer(decoders.WordPiece()))
    assert not _prefix_stable(tokenizer(decoders.CTC()))
    assert not _prefix_stable(tokenizer(decoders.Fuse(), clean_up=True))
