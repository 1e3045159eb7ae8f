"""A word-level tokenizer made in code: the text side of every tiny vlens build, offline.

It carries the special tokens a family needs (`<image>` and the chat markers)
and a small vocabulary of the words of the paper's prompts, so prompts,
answers and captions tokenize word by word with no download.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

from ..errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "BASE_WORDS", "split_words", "word_tokenizer"]

#: Special tokens of every vlens-made tokenizer, in id order.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "[INST]", "[/INST]"]

#: Words every vlens-made vocabulary knows: the prompts of the paper's experiments.
BASE_WORDS = (
    "a an the is of in on to and or what which this that image shown picture photo "
    "reply either lowercase depending do not output any other text describe "
    "it there here with at left right top bottom middle center small large big "
    "yes no color colour shape object . , ? ! : \" '"
).split()

_WORD = re.compile(r"<image>|\[/?INST\]|</?s>|<pad>|<unk>|[A-Za-z0-9_\-]+|[^\sA-Za-z0-9_\-]")


def split_words(text: str) -> list[str]:
    """Split text the way vlens word-level tokenizers do.

    Example:
        >>> split_words("[INST] <image>\\nWhat is shown? [/INST]")
        ['[INST]', '<image>', 'What', 'is', 'shown', '?', '[/INST]']
    """
    return _WORD.findall(text)


def word_tokenizer(words: Iterable[str] = (), *, image_token_id: int | None = None) -> "PreTrainedTokenizerFast":
    """A lowercasing word-level tokenizer over `BASE_WORDS` plus `words`.

    Ids: the `SPECIAL_TOKENS` first (`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3,
    `<image>`=4, ...), then the words in first-seen order. A BOS token is
    prepended on encode, like Mistral's tokenizer. `image_token_id` moves
    `<image>` to that id (filling the gap with `<unused_i>` tokens), to stand
    in for a real model's tokenizer.

    Example:
        >>> tok = word_tokenizer(["red", "circle"])
        >>> tok.decode(tok("a red circle")["input_ids"], skip_special_tokens=True)
        'a red circle'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    specials = [t for t in SPECIAL_TOKENS if image_token_id is None or t != "<image>"]
    for w in [*specials, *BASE_WORDS, *(w.lower() for w in words)]:
        vocab.setdefault(w, len(vocab))
    if image_token_id is not None:
        if image_token_id < len(vocab):
            raise InputError(f"image_token_id {image_token_id} collides with the {len(vocab)} words of the vocabulary")
        for i in range(len(vocab), image_token_id):
            vocab[f"<unused_{i}>"] = i
        vocab["<image>"] = image_token_id
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<image>", "[INST]", "[/INST]"],
        padding_side="left",
        model_max_length=4096,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "[INST]", "[/INST]"]})
    return tok
