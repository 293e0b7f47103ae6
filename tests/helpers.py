"""Small shared pieces of the tests: generated text for locally trained tokenizers."""

from __future__ import annotations

import random

WORDS = ("the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "mat", "tree", "red", "big")


def sentences(rng: random.Random, n: int) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) + "." for _ in range(n))
