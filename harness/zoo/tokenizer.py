"""The zoo's shared tokenizer: byte-level BPE (vocab 2048) trained on the corpus's train split.

Byte-level means every string round-trips exactly (no unknown tokens, whitespace kept). The
tokenizer is wrapped as a transformers `PreTrainedTokenizerFast`, so a `save_pretrained`
folder reloads with `AutoTokenizer.from_pretrained(folder)`. Training is deterministic: the
same corpus gives the same vocabulary and merges (checked in tests/test_zoo.py).

Special tokens (ids fixed by their order): 0 `<pad>`, 1 `<s>` (bos), 2 `</s>` (eos, also put
between documents in the training stream). Encoding adds no special tokens by itself.
"""

from __future__ import annotations

from pathlib import Path

VOCAB_SIZE = 2048
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(documents, vocab_size: int = VOCAB_SIZE):
    """A `PreTrainedTokenizerFast` trained on `documents` (an iterable of strings)."""
    return _wrap(_train_core(tuple(documents), vocab_size))


def _train_core(documents: tuple[str, ...], vocab_size: int) -> str:
    """The trained `tokenizers.Tokenizer`, serialized to its JSON string."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(list(documents), trainer=trainer)
    for token, expected in zip(SPECIAL_TOKENS, (PAD_ID, BOS_ID, EOS_ID)):
        assert core.token_to_id(token) == expected, (token, core.token_to_id(token))
    return core.to_str()


def _wrap(core_json: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(core_json),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


_TRAINED: dict[tuple[str, int], str] = {}  # (corpus sha256, vocab size) -> tokenizer JSON, this process only


def corpus_tokenizer(corpus=None, vocab_size: int = VOCAB_SIZE):
    """The shared zoo tokenizer, trained on the train split of `corpus` (default: load_corpus()).
    A new wrapper object each call; the training itself is memoized per process."""
    if corpus is None:
        from harness.zoo.corpus import load_corpus

        corpus = load_corpus()
    key = (corpus.sha256, vocab_size)
    if key not in _TRAINED:
        _TRAINED[key] = _train_core(tuple(d.text for d in corpus.train_docs), vocab_size)
    return _wrap(_TRAINED[key])


def save_tokenizer(tokenizer, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return folder


def load_tokenizer(folder: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
