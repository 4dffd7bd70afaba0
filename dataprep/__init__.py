"""Ray Data: reading the user's data and preprocessing it across the cluster."""


class DataError(Exception):
    """Bad input data; each entry of `problems` is one line naming the file or column and the fix."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self):  # raised in Ray tasks: pickled by its problems, not its joined message
        return type(self), (self.problems,)
