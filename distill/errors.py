"""User-facing errors.

A `DistillError` is a problem with what the user gave us (a recipe key, a file, a column, a
model name). The CLI prints its message in one or two lines and exits with code 2, never with a
traceback. Bugs in our own code stay ordinary exceptions (and `assert`s).
"""

from __future__ import annotations


class DistillError(Exception):
    """A user-facing error: the message names what is wrong and what is allowed."""


class RecipeError(DistillError):
    """One or more problems in a recipe, all reported at once.

    Args:
        problems: one line per problem, each naming the dotted key, the bad value and what is
            allowed.
        source: the recipe file, named in the message.
        command: the CLI command whose options built the recipe (`distill export`), named
            instead of a recipe the user never wrote.
    """

    def __init__(self, problems: list[str], source: str | None = None,
                 command: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = (f"{command}: invalid options" if command
                else f"invalid recipe{f' {source}' if source else ''}")
        if len(self.problems) == 1:
            message = f"{head}: {self.problems[0]}"
        else:
            message = head + f" ({len(self.problems)} problems):\n" + "\n".join(
                f"  - {p}" for p in self.problems
            )
        super().__init__(message)
