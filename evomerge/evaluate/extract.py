"""What counts as the answer in a generated continuation.

A `generate` task compares ``extract(continuation)`` with ``target.strip()``.
The rules are plain text functions so that they can be checked against
lm-eval's filters (``remove_whitespace``, ``regex``) in the agreement tests.
"""

from __future__ import annotations

import re
from typing import Callable

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def strip(text: str) -> str:
    return text.strip()


def first_line(text: str) -> str:
    """The first non-empty line, without surrounding whitespace."""
    return text.strip().split("\n", 1)[0].strip()


def last_number(text: str) -> str | None:
    """The last number in the text, thousands separators removed (``-1,234.5`` -> ``-1234.5``)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def regex(pattern: str) -> Callable[[str], str | None]:
    """The first match of `pattern`: the whole match, its group when it has one, else its first non-empty group
    (as lm-eval's ``regex`` filter), stripped.

    No match gives None, which equals no target.
    """
    compiled = re.compile(pattern)

    def extract(text: str) -> str | None:
        match = compiled.search(text)
        if match is None:
            return None
        if compiled.groups <= 1:
            value = match.group(compiled.groups) or ""
        else:  # as lm-eval's regex filter: the first group that matched something
            value = next((g for g in match.groups() if g), None)
        return value.strip() if value is not None else None

    return extract


RULES: dict[str, Callable[[str], str | None]] = {"strip": strip, "first_line": first_line, "last_number": last_number}


def extractor(rule: str | dict[str, str]) -> Callable[[str], str | None]:
    """The extract function for a task's ``extract`` field (a rule name or ``{regex: ...}``)."""
    if isinstance(rule, str):
        return RULES[rule]
    return regex(rule["regex"])


def exact_match(extract: Callable[[str], str | None], continuation: str, target: str) -> float:
    want = target.strip()
    if extract is last_number and _NUMBER.fullmatch(want):  # a target written "1,234" is the number 1234 too
        want = want.replace(",", "")
    return 1.0 if extract(continuation) == want else 0.0
