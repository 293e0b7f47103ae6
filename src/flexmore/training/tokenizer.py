"""A byte-level BPE tokenizer trained locally with `tokenizers`, wrapped for `transformers`.

Byte-level: every byte is in the base vocabulary, so any text round-trips and nothing is ever unknown.
Digits are split one per token (as Llama and OLMo do): a tiny model learns arithmetic on digits far
more easily than on arbitrary merged numbers such as "485" vs "48" + "5".
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # end of document; also the padding token (GPT-2 convention)
_MIN_VOCAB = 256 + 1 + 1  # 256 bytes, eos, and at least one merge


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int = 4096,
    *,
    seed: int = 0,
    max_chars: int | None = 4_000_000,
    min_frequency: int = 2,
    split_digits: bool = True,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts` (a seeded sample of at most `max_chars` characters).

    Deterministic: the same texts, vocab size and seed give the same vocabulary and merges. The result
    is a `PreTrainedTokenizerFast` (eos = pad = `<|endoftext|>`, id 0) that `save_pretrained` writes and
    `AutoTokenizer.from_pretrained(folder)` reads back offline. It adds no special tokens when encoding:
    packing inserts eos between documents itself.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {_MIN_VOCAB}, got {vocab_size!r}")
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive or None, got {max_chars!r}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency!r}")
    sample = _sample(texts, max_chars, seed)
    if not any(t.strip() for t in sample):
        raise ValueError("train_tokenizer needs at least one non-empty text")

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in training or not
        show_progress=False,
    )
    tok.train_from_iterator(sample, trainer=trainer, length=len(sample))
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """The `transformers` face of a trained `tokenizers.Tokenizer` whose special token is `<|endoftext|>`."""
    if tok.token_to_id(EOS_TOKEN) is None:
        raise ValueError(f"the tokenizer has no {EOS_TOKEN} token")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        # Byte-level decoding is exact; the default clean-up would rewrite " ." to "." and break round trips.
        clean_up_tokenization_spaces=False,
    )


def _sample(texts: Sequence[str], max_chars: int | None, seed: int) -> list[str]:
    """All texts if they fit in max_chars, else a seeded random subset that does (in the original order)."""
    texts = list(texts)
    if max_chars is None or sum(len(t) for t in texts) <= max_chars:
        return texts
    order = list(range(len(texts)))
    random.Random(f"flexmore:tokenizer:{seed}").shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + len(texts[i]) > max_chars:
            continue  # a long document is skipped, shorter ones may still fit
        chosen.append(i)
        total += len(texts[i])
    if not chosen:  # every text is longer than max_chars: train on the start of one
        return [texts[order[0]][:max_chars]]
    return [texts[i] for i in sorted(chosen)]
