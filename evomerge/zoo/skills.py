"""The zoo's skills: the symbol vocabulary, the text format of a task, and its data.

Every example reads ``SKILL x1 x2 ... xn = y1 y2 ... yn`` followed by the
end-of-sequence token, one symbol per whitespace-separated word, so the
tokenizer (a WordLevel vocabulary, see tokenizer.py) maps each word to one id
and decoding the answer's ids reproduces the target text exactly.

A skill is a function on sequences of alphabet indices. The base model learns
the format with the identity as the answer (it echoes the input); an expert
learns one skill. The *compatible* skills each rewrite a disjoint alphabet
symbol by symbol, so their task vectors can be added; the *conflicting* pair
reorders the same digits in two incompatible ways.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

import torch

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
PAD, EOS, UNK = SPECIAL_TOKENS
SEPARATOR = "="

ALPHABETS: dict[str, tuple[str, ...]] = {
    "digits": tuple(string.digits),
    "letters": tuple(string.ascii_lowercase[:10]),
    "capitals": tuple(string.ascii_uppercase[:10]),
}

COMPATIBLE = "compatible"
CONFLICTING = "conflicting"


@dataclass(frozen=True)
class Skill:
    """One task: a name (also its prompt's first word), an alphabet and a rule."""

    name: str
    alphabet: str
    group: str
    rule: str
    apply: Callable[[torch.Tensor], torch.Tensor]  # (rows, n) alphabet indices -> same shape

    @property
    def symbols(self) -> tuple[str, ...]:
        return ALPHABETS[self.alphabet]


def _shift(k: int, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: (x + k) % size


SKILLS: tuple[Skill, ...] = (
    Skill("inc", "digits", COMPATIBLE, "each digit plus one, modulo 10", _shift(1, 10)),
    Skill("rot", "letters", COMPATIBLE, "each letter a-j moved one place on (j wraps to a)", _shift(1, 10)),
    Skill("mir", "capitals", COMPATIBLE, "each capital A-J mirrored (A<->J, B<->I, ...)", lambda x: 9 - x),
    Skill("rev", "digits", CONFLICTING, "the digits in reverse order", lambda x: x.flip(1)),
    Skill("sort", "digits", CONFLICTING, "the digits in ascending order", lambda x: x.sort(dim=1).values),
)
SKILLS_BY_NAME = {skill.name: skill for skill in SKILLS}


def vocabulary() -> list[str]:
    """Every token, in id order: specials, skill names, the separator, the alphabets."""
    words = list(SPECIAL_TOKENS) + [skill.name for skill in SKILLS] + [SEPARATOR]
    for symbols in ALPHABETS.values():
        words.extend(symbols)
    return words


def prompt_text(skill: Skill, x: list[int]) -> str:
    """``"inc 3 7 2 = "``: with its trailing space, prompt + answer is the whole example's text.

    A choice is scored as the continuation of the prompt's text, so without the space
    ``"=" + "4 8 3"`` would read as one unknown word ``"=4"``. lm-eval's convention (a
    space between them) tokenizes the same.
    """
    return " ".join([skill.name, *(skill.symbols[i] for i in x), SEPARATOR]) + " "


def answer_text(skill: Skill, y: list[int]) -> str:
    return " ".join(skill.symbols[i] for i in y)


def _distractors(skill: Skill, x: torch.Tensor) -> list[torch.Tensor]:
    """Wrong answers for inputs `x` (rows, n), most tempting first: the echo, then near misses."""
    size = len(skill.symbols)
    if skill.group == COMPATIBLE:
        return [x, (x - 1) % size, (x + 2) % size, (size - x) % size, (x + 3) % size]
    ascending = x.sort(dim=1).values
    return [x, ascending.flip(1), x.roll(1, dims=1), ascending, x.flip(1), x.roll(-1, dims=1)]


def answer_options(skill: Skill, x: list[int], *, choices: int = 4) -> list[str]:
    """The right answer first, then up to `choices - 1` distinct wrong ones."""
    xt = torch.tensor([x])
    options = [answer_text(skill, skill.apply(xt)[0].tolist())]
    for wrong in _distractors(skill, xt):
        text = answer_text(skill, wrong[0].tolist())
        if text not in options and len(options) < choices:
            options.append(text)
    return options


def sample_inputs(skill: Skill, count: int, *, length: int, gen: torch.Generator,
                  exclude: set[tuple[int, ...]], choices: int = 4) -> list[list[int]]:
    """`count` distinct inputs, none in `exclude` (which grows by them).

    An input qualifies when echoing it is wrong (so the base scores nothing for
    free) and it has `choices` distinct answer options.
    """
    rows: list[list[int]] = []
    while len(rows) < count:
        for x in torch.randint(len(skill.symbols), (count, length), generator=gen).tolist():
            key = tuple(x)
            if len(rows) == count or key in exclude:
                continue
            options = answer_options(skill, x, choices=choices)
            if len(options) < choices or options[0] == answer_text(skill, x):
                continue
            exclude.add(key)
            rows.append(x)
    return rows


def generate_rows(skill: Skill, inputs: list[list[int]]) -> list[dict]:
    """`generate` task rows: ``{"prompt", "target"}``."""
    answers = skill.apply(torch.tensor(inputs)).tolist()
    return [{"prompt": prompt_text(skill, x), "target": answer_text(skill, y)} for x, y in zip(inputs, answers)]


def choice_rows(skill: Skill, inputs: list[list[int]], *, gen: torch.Generator, choices: int = 4) -> list[dict]:
    """`choice` task rows ``{"prompt", "choices", "answer"}``, options in a seeded order."""
    rows = []
    for x in inputs:
        options = answer_options(skill, x, choices=choices)
        order = torch.randperm(len(options), generator=gen).tolist()
        rows.append({"prompt": prompt_text(skill, x), "choices": [options[i] for i in order],
                     "answer": order.index(0)})
    return rows
