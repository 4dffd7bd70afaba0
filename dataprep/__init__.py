"""Ray Data: reading the user's data and preprocessing it across the cluster."""

from runconfig.problems import BadInput

# A column preprocessing adds where two rows may share a key (a user's key column repeats a value):
# their content, which orders them when the cache sorts each split by key. Not stored.
ORDER = "order"
TOKENIZER_FILE = "tokenizer.json"
"""A BPE tokenizer trained on the train split, beside the data it tokenized and every model trained on it."""
TOKENIZER_DIR = "tokenizer"
"""A transformers model's tokenizer (`save_pretrained` files), beside the data it tokenized."""
IGNORE = -100  # the label of a token without a loss (instruction prompts): cross-entropy's ignore_index


def find_transform(transforms: list[dict], *kinds: str) -> dict | None:
    """The first entry of a `data.transforms` list (plain dicts) of one of these types, or None."""
    return next((t for t in transforms if t["type"] in kinds), None)


def label_classes(transforms: list[dict]) -> list[str] | None:
    """The class order a `label_encode` transform fixes (as text, how labels are compared), or None."""
    encode = find_transform(transforms, "label_encode")
    return [str(c) for c in encode["classes"]] if encode and encode["classes"] else None


class DataError(BadInput):
    """Bad input data; each entry of `problems` is one line naming the file or column and the fix."""
