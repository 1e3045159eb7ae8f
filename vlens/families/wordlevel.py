"""A word-level tokenizer made in code: the text side of every tiny vlens build, offline.

It carries the special tokens a family needs (`<image>` and the chat markers)
and a small vocabulary of the words of the paper's prompts, so prompts,
answers and captions tokenize word by word with no download.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable, Sequence

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


def word_tokenizer(
    words: Iterable[str] = (),
    *,
    image_token_id: int | None = None,
    specials: Sequence[str] | None = None,
    bos: str | None = "<s>",
    eos: str = "</s>",
    pad: str = "<pad>",
    unk: str = "<unk>",
    named: dict[str, str] | None = None,
) -> "PreTrainedTokenizerFast":
    """A lowercasing word-level tokenizer over `BASE_WORDS` plus `words`.

    Ids: the `SPECIAL_TOKENS` first (`<pad>`=0, `<s>`=1, `</s>`=2, `<unk>`=3,
    `<image>`=4, ...), then the words in first-seen order. A BOS token is
    prepended on encode, like Mistral's tokenizer. `image_token_id` moves
    `<image>` to that id (filling the gap with `<unused_i>` tokens), to stand
    in for a real model's tokenizer.

    A family with other special tokens passes them as `specials` (in id
    order, including its `bos`, `eos`, `pad` and `unk` tokens); `bos=None`
    prepends nothing on encode (like Qwen's tokenizer); `named` gives
    model-specific token attributes, as a real tokenizer config's
    `extra_special_tokens` does (`{"image_token": "<image_soft_token>"}` makes
    `tok.image_token` and `tok.image_token_id`).

    Example:
        >>> tok = word_tokenizer(["red", "circle"])
        >>> tok.decode(tok("a red circle")["input_ids"], skip_special_tokens=True)
        'a red circle'
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    specials = list(SPECIAL_TOKENS if specials is None else specials)
    missing = [t for t in (bos, eos, pad, unk) if t is not None and t not in specials]
    if missing:
        raise InputError(f"special tokens {missing} are named but not among specials={specials}: list them there")
    kept = [t for t in specials if image_token_id is None or t != "<image>"]
    for w in [*kept, *BASE_WORDS, *(w.lower() for w in words)]:
        vocab.setdefault(w, len(vocab))
    if image_token_id is not None:
        if image_token_id < len(vocab):
            raise InputError(f"image_token_id {image_token_id} collides with the {len(vocab)} words of the vocabulary")
        for i in range(len(vocab), image_token_id):
            vocab[f"<unused_{i}>"] = i
        vocab["<image>"] = image_token_id
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Split(Regex(_WORD.pattern), behavior="isolated")]
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    extra = [t for t in specials if t not in (bos, eos, pad, unk)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        padding_side="left",
        model_max_length=4096,
        **({"extra_special_tokens": dict(named)} if named else {"additional_special_tokens": extra}),
    )
    tok.add_special_tokens({"additional_special_tokens": extra})
    return tok
