"""The one error type for bad config or input, raised by every layer and turned into the CLI's
lines and exit code 2 in one place (`launcher.errors`)."""

from __future__ import annotations


class BadInput(Exception):
    """Bad config or input: each entry of `problems` is one line naming the field or file and the fix."""

    def __init__(self, problems: list[str] | str):
        problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self):  # raised in Ray tasks: pickled by its problems, not its joined message
        return type(self), (self.problems,)
