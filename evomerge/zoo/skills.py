"""The zoo's skills: the symbol vocabulary, the text format of a task, and its data.

Every example reads ``WORD x1 x2 ... xn = y1 y2 ... yn`` followed by the
end-of-sequence token, one symbol per whitespace-separated word, so the
tokenizer (a WordLevel vocabulary, see write.py) maps each word to one id
and decoding the answer's ids reproduces the target text exactly.

A skill is a function on sequences of alphabet indices. The base model is
pretrained on the *named* format, ``SKILL x = y`` (mostly the echo as the
answer). The *compatible* skills each rewrite their own alphabet symbol by
symbol and leave every other symbol alone; they are asked in the instruction
format, ``ask x = y``, whose input may mix the alphabets: the skill that
applies is the one whose symbols are there, as a real fine-tune's skill is
triggered by its input, so one input can need two skills at once (the
composed task, ``COMPOSED``). The *conflicting* pair reorders the same digits
in two incompatible ways and keeps the named format.
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
FORMAT_WORD = "ask"   # the instruction format's first word, in place of a skill's name


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

    @property
    def prompt_word(self) -> str:
        """The prompt's first word: the instruction format's for a compatible skill, else the skill's name."""
        return FORMAT_WORD if self.group == COMPATIBLE else self.name


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
COMPATIBLE_SKILLS = tuple(skill for skill in SKILLS if skill.group == COMPATIBLE)
# The instruction format's symbols: the compatible skills' alphabets, one after another (indices 0..29).
UNION: tuple[str, ...] = tuple(s for skill in COMPATIBLE_SKILLS for s in skill.symbols)


def union_offset(skill: Skill) -> int:
    """Where a compatible skill's alphabet starts in UNION."""
    return sum(len(s.symbols) for s in COMPATIBLE_SKILLS[:COMPATIBLE_SKILLS.index(skill)])


def to_union(skill: Skill, x: torch.Tensor) -> torch.Tensor:
    """Alphabet indices of a compatible skill as UNION indices."""
    return x + union_offset(skill)


def apply_union(skill: Skill, u: torch.Tensor) -> torch.Tensor:
    """A compatible skill on UNION indices (rows, n): its own symbols rewritten, every other one kept."""
    offset, size = union_offset(skill), len(skill.symbols)
    own = (u >= offset) & (u < offset + size)
    return torch.where(own, skill.apply((u - offset).clamp(0, size - 1)) + offset, u)


@dataclass(frozen=True)
class Composed:
    """A task that needs several compatible skills in one input: each rewrites its own symbols."""

    name: str
    needs: tuple[str, ...]
    rule: str

    @property
    def skills(self) -> tuple[Skill, ...]:
        return tuple(SKILLS_BY_NAME[n] for n in self.needs)

    def apply(self, u: torch.Tensor) -> torch.Tensor:
        for skill in self.skills:
            u = apply_union(skill, u)
        return u


COMPOSED: tuple[Composed, ...] = (
    Composed("inc_rot", ("inc", "rot"), "digits and letters a-j in one input: each digit plus one (inc), "
             "each letter moved one place on (rot)"),
)


def vocabulary() -> list[str]:
    """Every token, in id order: specials, skill names, the format word, the separator, the alphabets."""
    words = list(SPECIAL_TOKENS) + [skill.name for skill in SKILLS] + [FORMAT_WORD, SEPARATOR]
    for symbols in ALPHABETS.values():
        words.extend(symbols)
    return words


def prompt_text(skill: Skill, x: list[int]) -> str:
    """``"ask 3 7 2 = "`` (``"rev 3 7 2 = "``): with its trailing space, prompt + answer is the whole example's text.

    A choice is scored as the continuation of the prompt's text, so without the space
    ``"=" + "4 8 3"`` would read as one unknown word ``"=4"``. lm-eval's convention (a
    space between them) tokenizes the same.
    """
    return " ".join([skill.prompt_word, *(skill.symbols[i] for i in x), SEPARATOR]) + " "


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


# ------------------------------------------------------------------------------------------------
# The composed tasks: inputs over UNION


def composed_text(u: list[int]) -> str:
    return " ".join(UNION[i] for i in u)


def composed_options(task: Composed, u: list[int], *, choices: int = 4) -> list[str]:
    """The right answer first, then: the echo, each needed skill alone, near misses."""
    ut = torch.tensor([u])
    wrong = [ut, *(apply_union(skill, ut) for skill in task.skills)]
    for skill in task.skills:   # the right answer with one skill overdone
        wrong.append(apply_union(skill, task.apply(ut)))
    options = [composed_text(task.apply(ut)[0].tolist())]
    for w in wrong:
        text = composed_text(w[0].tolist())
        if text not in options and len(options) < choices:
            options.append(text)
    return options


def sample_composed(task: Composed, count: int, *, length: int, gen: torch.Generator,
                    exclude: set[tuple[int, ...]], choices: int = 4) -> list[list[int]]:
    """`count` distinct UNION inputs holding a symbol of every needed skill's alphabet, none in `exclude`."""
    skills = task.skills
    rows: list[list[int]] = []
    while len(rows) < count:
        pick = torch.randint(len(skills), (count, length), generator=gen)
        local = torch.randint(10, (count, length), generator=gen)
        offsets = torch.tensor([union_offset(s) for s in skills])
        for x in (offsets[pick] + local).tolist():
            key = tuple(x)
            if len(rows) == count or key in exclude:
                continue
            if any(all(not union_offset(s) <= i < union_offset(s) + len(s.symbols) for i in x) for s in skills):
                continue
            if len(composed_options(task, x, choices=choices)) < choices:
                continue
            exclude.add(key)
            rows.append(x)
    return rows


def composed_prompt(u: list[int]) -> str:
    return " ".join([FORMAT_WORD, *(UNION[i] for i in u), SEPARATOR]) + " "


def composed_generate_rows(task: Composed, inputs: list[list[int]]) -> list[dict]:
    answers = task.apply(torch.tensor(inputs)).tolist()
    return [{"prompt": composed_prompt(u), "target": composed_text(y)} for u, y in zip(inputs, answers)]


def composed_choice_rows(task: Composed, inputs: list[list[int]], *, gen: torch.Generator,
                         choices: int = 4) -> list[dict]:
    rows = []
    for u in inputs:
        options = composed_options(task, u, choices=choices)
        order = torch.randperm(len(options), generator=gen).tolist()
        rows.append({"prompt": composed_prompt(u), "choices": [options[i] for i in order],
                     "answer": order.index(0)})
    return rows
