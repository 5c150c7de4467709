"""Errors a user can act on.

`InputError` is bad input: the CLI prints its one line and exits with code 2,
before any weights load and with nothing written. Everything else is a bug or an
environment failure and exits with code 1.
"""

from __future__ import annotations

from pathlib import Path


class InputError(ValueError):
    """Bad user input, reported as one line: ``FILE: FIELD: PROBLEM (FIX)``."""

    def __init__(self, problem: str, *, file: str | Path | None = None, field: str | None = None,
                 fix: str | None = None) -> None:
        self.problem = problem
        self.file = str(file) if file is not None else None
        self.field = field
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [p for p in (self.file, self.field) if p]
        text = ": ".join(parts + [self.problem])
        if self.fix:
            text += f" ({self.fix})"
        return " ".join(text.split())  # always one line

    def at(self, *, file: str | Path | None = None, field: str | None = None) -> "InputError":
        """The same error, located in a file or under a parent field."""
        merged = field if not self.field else (f"{field}.{self.field}" if field else self.field)
        return InputError(self.problem, file=file if file is not None else self.file, field=merged, fix=self.fix)


def suggest(name: str, known: list[str] | tuple[str, ...] | set[str]) -> str | None:
    """'did you mean X?' for a near miss, else None."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else None
