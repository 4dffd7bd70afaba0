"""Ray Data: reading the user's data and preprocessing it across the cluster."""

# The transforms drawn afresh every epoch by the training workers (not cached, not in the cache key).
AUGMENTATIONS = ("random_crop", "flip", "rotate", "brightness")


class DataError(Exception):
    """Bad input data; each entry of `problems` is one line naming the file or column and the fix."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems

    def __reduce__(self):  # raised in Ray tasks: pickled by its problems, not its joined message
        return type(self), (self.problems,)
