"""Token ids of the copying task: three special tokens, then the content tokens."""

PAD, BOS, SEP = 0, 1, 2
FIRST_CONTENT = 3


def content_token(index: int) -> int:
    """Id of the ``index``-th content token."""
    return FIRST_CONTENT + index


def vocabulary_size(content_tokens: int) -> int:
    """Embedding rows needed, rounded up to a multiple of 8."""
    return -(-(FIRST_CONTENT + content_tokens) // 8) * 8
