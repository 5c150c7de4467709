"""The smol zoo's skills: natural-language tasks that SmolLM2-135M-Instruct does not do, and their data.

Each skill is a question asked in plain English under the chat template, with
one short exact answer. The base answers all of them at length and scores
nothing; one expert is fine-tuned per skill:

    add     "What is 58 + 64?"                          -> "122"        (a small arithmetic skill)
    words   "What is 147? Answer in words."             -> "one hundred forty-seven"  (a language skill)
    caps    "Write in capital letters: cold dark river"  -> "COLD DARK RIVER"          (a formatting convention)

The composed task needs two experts' skills in one answer, as Japanese math
needs a math expert and a Japanese one (Akiba et al. 2024):

    add_words  "What is 58 + 64? Answer in words."      -> "one hundred twenty-two"

No expert is trained on it: the add expert answers in digits, the words expert
cannot add. Every row is drawn from a `random.Random` seeded from the zoo's
seed; the rows of the evaluation splits never appear in training.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
WORDS = ("red fox blue car green tree small house old river cold wind dark night warm bread tall ship "
         "quiet lake bright star soft rain loud bell fast horse deep snow sweet apple").split()

SYSTEM_PROMPT = "Answer briefly."     # one short system turn: every prompt's shared prefix, and short sequences

Key = tuple                           # what identifies an example (its inputs), for keeping splits apart


def in_words(n: int) -> str:
    """English words for 0 <= n < 1000, as a style guide writes them: 'one hundred forty-seven'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return f"{ONES[n // 100]} hundred" + ("" if rest == 0 else " " + in_words(rest))


@dataclass(frozen=True)
class ChatSkill:
    """One task: how to draw an input, the question, the answer and wrong answers for the choice task."""

    name: str
    rule: str
    draw: Callable[[random.Random], Key]
    question: Callable[[Key], str]
    answer: Callable[[Key], str]
    wrong: Callable[[Key, random.Random], list[str]]   # three distinct wrong answers
    needs: tuple[str, ...] = ()                         # a composed task: the skills it needs

    def example(self, key: Key) -> tuple[str, str]:
        return self.question(key), self.answer(key)


def _sum_pair(rng: random.Random) -> Key:
    return rng.randint(10, 99), rng.randint(1, 99)


def _near_numbers(n: int, rng: random.Random) -> list[int]:
    """Three distinct plausible mistakes for n: off by one, off by ten, and one more."""
    out: list[int] = []
    for candidate in (n + rng.choice((-1, 1)), n + rng.choice((-10, 10)), n + rng.choice((-2, 2, -11, 11, 9, -9))):
        if candidate not in out and candidate != n and 0 <= candidate < 1000:
            out.append(candidate)
    step = 3
    while len(out) < 3:
        if n + step not in out:
            out.append(n + step)
        step += 1
    return out


def _caps_wrong(key: Key, rng: random.Random) -> list[str]:
    text = " ".join(key)
    return [text, text.title(), " ".join(reversed(key)).upper()]


SKILLS: tuple[ChatSkill, ...] = (
    ChatSkill("add", "the sum of two numbers (10-99 plus 1-99), in digits", _sum_pair,
              lambda k: f"What is {k[0]} + {k[1]}?", lambda k: str(k[0] + k[1]),
              lambda k, rng: [str(n) for n in _near_numbers(k[0] + k[1], rng)]),
    ChatSkill("words", "a number from 1 to 999 in English words", lambda rng: (rng.randint(1, 999),),
              lambda k: f"What is {k[0]}? Answer in words.", lambda k: in_words(k[0]),
              lambda k, rng: [in_words(n) for n in _near_numbers(k[0], rng)]),
    ChatSkill("caps", "three words repeated in capital letters", lambda rng: tuple(rng.sample(WORDS, 3)),
              lambda k: "Write in capital letters: " + " ".join(k), lambda k: " ".join(k).upper(), _caps_wrong),
)

COMPOSED: tuple[ChatSkill, ...] = (
    ChatSkill("add_words", "the sum of two numbers, in English words (needs add and words)", _sum_pair,
              lambda k: f"What is {k[0]} + {k[1]}? Answer in words.", lambda k: in_words(k[0] + k[1]),
              lambda k, rng: [in_words(n) for n in _near_numbers(k[0] + k[1], rng)], needs=("add", "words")),
)

ALL: tuple[ChatSkill, ...] = SKILLS + COMPOSED


def draw_keys(skill: ChatSkill, count: int, rng: random.Random, *, exclude: set[Key]) -> list[Key]:
    """`count` distinct inputs not in `exclude` (which gains them)."""
    keys: list[Key] = []
    while len(keys) < count:
        key = skill.draw(rng)
        if key not in exclude:
            exclude.add(key)
            keys.append(key)
    return keys


def generate_rows(skill: ChatSkill, keys: list[Key]) -> list[dict]:
    return [{"prompt": skill.question(k), "target": skill.answer(k)} for k in keys]


def choice_rows(skill: ChatSkill, keys: list[Key], rng: random.Random) -> list[dict]:
    """The right answer among three wrong ones, at a seeded position."""
    rows = []
    for key in keys:
        choices = skill.wrong(key, rng)
        answer = rng.randrange(4)
        choices.insert(answer, skill.answer(key))
        rows.append({"prompt": skill.question(key), "choices": choices, "answer": answer})
    return rows
