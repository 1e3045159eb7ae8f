"""Teacher-forced scoring of answers: log-probabilities, cross-entropy and exact match of answer tokens.

Every experiment that asks "how likely is this answer?" scores it the same
way: the batch holds prompt + answer (`VLM.prepare(..., answers=...)`), the
logits at position t−1 predict token t, and only the answer tokens count
(`batch.layout.answer`). Written once here; steering efficacy and damage, SAE
loss recovered and the toy model's training and evaluation all call it.

    >>> import torch
    >>> logits = torch.zeros(1, 3, 5); logits[0, 1, 4] = 10.0     # position 1 predicts token 4
    >>> ids = torch.tensor([[1, 2, 4]]); answer = torch.tensor([[False, False, True]])
    >>> total, count = answer_logprob(logits, ids, answer)
    >>> round(float(total[0].exp()), 4), int(count[0])
    (0.9998, 1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from .errors import InputError

if TYPE_CHECKING:
    from .model import VLM
    from .tokens import Batch

__all__ = [
    "token_logprobs", "answer_logprob", "answer_ce", "answer_correct", "answer_loss", "score_answers", "single_token_names",
    "lead_logprob", "bos_id",
]


def token_logprobs(
    logits: Float[Tensor, "batch seq vocab"], input_ids: Int[Tensor, "batch seq"]
) -> Float[Tensor, "batch seq_minus_1"]:
    """log p(token t | tokens < t) for t = 1..S−1, in float32.

    Example:
        >>> token_logprobs(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]])).exp()
        tensor([[0.2500, 0.2500]])
    """
    lp = torch.log_softmax(logits[:, :-1].float(), -1)
    return lp.gather(-1, input_ids[:, 1:, None].to(lp.device))[..., 0]


def answer_logprob(
    logits: Float[Tensor, "batch seq vocab"], input_ids: Int[Tensor, "batch seq"], answer: Bool[Tensor, "batch seq"]
) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Per row: the summed log-probability of the answer tokens, and how many there are.

    For a multi-token answer the sum is the log-probability of the whole
    token sequence (the product of its tokens' conditional probabilities).

    Example:
        >>> t, n = answer_logprob(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long),
        ...                       torch.tensor([[0, 1, 1], [0, 0, 1]]).bool())
        >>> n.tolist(), [round(float(x), 3) for x in t]
        ([2, 1], [-2.773, -1.386])
    """
    m = answer[:, 1:].to(logits.device)
    lp = token_logprobs(logits, input_ids)
    return (lp * m).sum(1), m.sum(1)


def lead_logprob(
    logits: Float[Tensor, "batch seq vocab"], answer: Bool[Tensor, "batch seq"], token: int
) -> Float[Tensor, " batch"]:
    """Per row: log p(`token`) read from the logits two positions before the answer's first token.

    The paper's damage and loss recovered score `processor(caption).input_ids`, which start
    with BOS, against the last len + 1 logits: one extra target, BOS, read from the logits
    of the position before the last prompt token. This is that extra term.

    Example:
        >>> logits = torch.zeros(1, 4, 5); logits[0, 1, 0] = 10.0   # position 1 "predicts" token 0
        >>> round(float(lead_logprob(logits, torch.tensor([[False, False, False, True]]), 0).exp()), 4)
        0.9998
    """
    first = answer.to(torch.int8).argmax(1).to(logits.device)  # the first answer position of each row
    if bool((first < 2).any()):
        raise InputError("the extra (BOS) target is read two positions before the answer: give every row a prompt "
                         "of at least two tokens")
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.log_softmax(logits[rows, first - 2].float(), -1)[:, token]


def bos_id(tokenizer: Any) -> int:
    """The tokenizer's BOS id, the paper's extra target (`lead_logprob`); an error naming the fix when it has none.

    Example:
        >>> from vlens.families.wordlevel import word_tokenizer
        >>> bos_id(word_tokenizer(["red"])) >= 0
        True
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise InputError("bos_target=True scores the tokenizer's BOS token, but this tokenizer has none: "
                         "leave bos_target=False")
    return int(bos)


def answer_ce(
    logits: Float[Tensor, "batch seq vocab"], input_ids: Int[Tensor, "batch seq"], answer: Bool[Tensor, "batch seq"]
) -> Float[Tensor, "2"]:
    """Summed next-token cross-entropy over all answer tokens of the batch, and their count: `[sum, count]`.

    Example:
        >>> answer_ce(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool))
        tensor([2.7726, 2.0000])
    """
    total, count = answer_logprob(logits, input_ids, answer)
    return torch.stack([-total.sum(), count.sum().to(total)])


def answer_loss(
    logits: Float[Tensor, "batch seq vocab"], input_ids: Int[Tensor, "batch seq"], answer: Bool[Tensor, "batch seq"]
) -> Float[Tensor, ""]:
    """Cross-entropy of the answer tokens averaged per row, then over rows (a training loss; differentiable).

    Per-row averaging keeps a 13-token caption from outweighing a 3-token class name.

    Example:
        >>> round(float(answer_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.long),
        ...                         torch.ones(1, 3, dtype=torch.bool))), 4)
        1.3863
    """
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")
    m = answer[:, 1:].to(ce.dtype)
    return ((ce * m).sum(1) / m.sum(1).clamp(min=1)).mean()


def answer_correct(
    logits: Float[Tensor, "batch seq vocab"], input_ids: Int[Tensor, "batch seq"], answer: Bool[Tensor, "batch seq"]
) -> Bool[Tensor, " batch"]:
    """Whether greedy decoding would produce each row's answer exactly: every answer token is the argmax.

    Example:
        >>> logits = torch.zeros(1, 3, 4); logits[0, 1, 2] = 1.0
        >>> answer_correct(logits, torch.tensor([[0, 0, 2]]), torch.tensor([[False, False, True]])).tolist()
        [True]
    """
    pred = logits[:, :-1].argmax(-1)
    return ((pred == input_ids[:, 1:].to(pred.device)) | ~answer[:, 1:].to(pred.device)).all(-1)


def score_answers(
    vlm: "VLM", batch: "Batch", edit: Callable[[], None] | None = None, *, lead_target: int | None = None
) -> tuple[Float[Tensor, " batch"], Int[Tensor, " batch"]]:
    """Run `batch` (prompt + answers) once and return `answer_logprob` per row, with `edit()` applied in the trace.

    `edit` is any nnsight code for the same trace, e.g.
    `lambda: vlens.interventions.add(vlm, 8, v, k=4.0, batch=batch)`. `lead_target` (a token
    id, e.g. BOS) adds one more scored target per row (`lead_logprob`: the paper's BOS target).

    Example:
        >>> import vlens; from PIL import Image
        >>> vlm = vlens.tiny(words=["red"])
        >>> b = vlm.prepare(["<image>\\nWhat is it?"], [Image.new("RGB", (32, 32))], answers=["red"])
        >>> total, count = score_answers(vlm, b)
        >>> count.tolist(), bool(total[0] < 0)
        ([1], True)
    """
    ids = batch.layout.input_ids.to(vlm.device)
    answer = batch.layout.answer.to(vlm.device)
    with torch.no_grad(), vlm.trace(batch):
        if edit is not None:
            edit()
        logits = vlm.read("logits")
        total, count = answer_logprob(logits, ids, answer)
        if lead_target is not None:
            total, count = total + lead_logprob(logits, answer, lead_target), count + 1
        total, count = total.cpu().save(), count.cpu().save()
    return total, count


def single_token_names(tokenizer: Any, names: Sequence[str], *, lowercase: bool = True) -> list[str]:
    """The names that are ONE token in the answer position under `tokenizer` (the paper's class selection).

    An answer is appended after the prompt as its own tokens (`VLM.prepare(...,
    answers=...)`), so a name is one token when `tokenizer(name,
    add_special_tokens=False)` gives one id. The two-choice prompt asks for
    lowercase, so names are lowercased first by default. For a one-token name
    the answer probability is the paper's token probability; for longer names
    vlens reports the probability of the whole token sequence.

    Example:
        >>> from vlens.families.wordlevel import word_tokenizer
        >>> single_token_names(word_tokenizer(["red", "circle"]), ["red", "red circle", "Circle"])
        ['red', 'Circle']
    """
    out = []
    for name in names:
        text = name.lower() if lowercase else name
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1:
            out.append(name)
    return out
