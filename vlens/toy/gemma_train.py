"""Train the real-LM toy's tower and projector with Gemma 3 270M frozen: `python -m vlens.toy gemma-train --seed 0`.

Two stages, the language model frozen throughout:

- stage -1 (`pretrain_tower`, no language model, about two minutes): the
  SigLIP tower learns to classify the training images through a linear
  head on its mean patch feature (`class_head`), as Gemma 3 starts from a
  trained SigLIP and the 64-wide toy from a pre-trained CLIP tower;
- stage 1 (alignment in the LLaVA sense): tower + projector trained
  through the frozen LM on the cross-entropy of the answer tokens, plus
  `aux_weight` times the tower's own classification loss (`class_loss`).
  Measured without that term: the answer loss made the tower amplify
  colour until the shapes were no longer separable in its features (a
  logistic probe on the mean patch feature fell from 0.93 to 0.54 held-out
  shape accuracy), and the model answered the shape at chance.

An earlier stage 0 that regressed the soft tokens onto the embeddings of
"A photo of a <class>." was dropped: it learned no class-specific part
(nearest-target accuracy at chance on held-out images: measured).

The prompts are the toy's (`QUESTION` -> "red circle", `COLOUR_QUESTION` ->
"red", `SHAPE_QUESTION` -> "circle"), in Gemma 3's chat template. Rows are
left-padded to one length, so every answer ends at the last position and the
forward computes logits for the last `K` positions only (`logits_to_keep`):
the 262k-row unembedding over every position cost more than the 18 layers.

Resumable: `OUT/state.pt` (tower + projector + optimiser + step) is written
atomically every `save_every` steps and on Ctrl-C; step `s` draws its batch
from its own seed, so a resumed run sees the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..errors import InputError
from ..scoring import answer_loss
from .data import CLASS_NAMES, COLOUR_QUESTION, QUESTION, SHAPE_QUESTION, toy_dataset
from .gemma import (GEMMA_CHECKPOINT_DIR, TRAINED, GemmaToyArch, build_gemma_model, build_gemma_processor,
                    save_trained, trained_state)

__all__ = ["GEMMA_TASKS", "GemmaTrainConfig", "GemmaBatches", "class_head", "class_loss", "pretrain_tower", "evaluate_gemma", "train_gemma"]

#: The prompt mix of training: task name -> probability.
GEMMA_TASKS: dict[str, float] = {"question": 0.6, "colour": 0.2, "shape": 0.2}


@dataclass
class GemmaTrainConfig:
    """Hyper-parameters of `train_gemma`; the defaults are the shipped weights' (their `toy_gemma.json`, `train`).

    Example:
        >>> GemmaTrainConfig().batch_size
        8
    """

    steps: int = 750
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 5
    min_lr_frac: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    n_images: int = 12000
    seed: int = 0
    save_every: int = 50
    threads: int = 2
    tower_batch: int = 32
    vision_pretrain_steps: int = 3000
    vision_pretrain_lr: float = 2e-3
    freeze_tower: bool = False
    aux_weight: float = 1.0


def task_example(task: str, label: int) -> tuple[str, str]:
    """The (prompt, answer) of one task for an image of class `label`.

    Example:
        >>> task_example("colour", 0), task_example("question", 5)
        (('<image>\\nWhat colour is the shape?', 'red'), ('<image>\\nWhat is shown in this image?', 'green square'))
    """
    name = CLASS_NAMES[label]
    if task == "question":
        return QUESTION, name
    if task == "colour":
        return COLOUR_QUESTION, name.split()[0]
    if task == "shape":
        return SHAPE_QUESTION, name.split()[1]
    raise InputError(f"unknown task {task!r}; tasks are {list(GEMMA_TASKS)}")


class GemmaBatches:
    """Fixed-shape batches: images processed once, token rows (`vlens.prepare`) cached per (prompt, answer).

    Every row is left-padded to `seq_len`, so answers end at the last position.
    """

    def __init__(self, processor: Any, config: Any, samples: Sequence, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        from ..families.gemma3 import GEMMA3
        from ..prepare import prepare

        self.samples = list(samples)
        self.labels = torch.tensor([s.label for s in self.samples])
        ims = [s.image for s in self.samples]
        chunks = [processor.image_processor(ims[i:i + 500], return_tensors="pt")["pixel_values"]
                  for i in tqdm(range(0, len(ims), 500), desc="processing images", disable=None if progress else True)]
        self.pixel_values: Float[Tensor, "n 3 h w"] = torch.cat(chunks)
        pairs = [task_example(t, label) for t in GEMMA_TASKS for label in range(len(CLASS_NAMES))]
        pairs = list(dict.fromkeys(pairs))
        b = prepare(GEMMA3, processor, config, [p for p, _ in pairs], [ims[0]] * len(pairs), [a for _, a in pairs])
        self.rows = {pa: (b.inputs["input_ids"][k], b.inputs["attention_mask"][k], b.layout.answer[k])
                     for k, pa in enumerate(pairs)}
        self.seq_len = int(b.inputs["input_ids"].shape[1])
        self.keep = int(b.layout.answer.sum(1).max()) + 1  # logits needed: the answer's tokens and the one before
        self.image_token_id = int(config.image_token_index)

    def batch(self, idx: Sequence[int], examples: Sequence[tuple[str, str]]) -> tuple[dict, Bool[Tensor, "b s"]]:
        """Model inputs (with `logits_to_keep`) and the answer mask of images `idx` with (prompt, answer) `examples`."""
        from ..tokens import position_ids

        ids = torch.stack([self.rows[e][0] for e in examples])
        attn = torch.stack([self.rows[e][1] for e in examples])
        answer = torch.stack([self.rows[e][2] for e in examples])
        inputs = dict(input_ids=ids, attention_mask=attn, position_ids=position_ids(attn),
                      pixel_values=self.pixel_values[list(idx)], token_type_ids=(ids == self.image_token_id).long(),
                      logits_to_keep=self.keep)
        return inputs, answer


def kept_loss(logits: Float[Tensor, "b k v"], ids: Int[Tensor, "b s"], answer: Bool[Tensor, "b s"]) -> Tensor:
    """`vlens.scoring.answer_loss` on the last `k` positions (the logits `logits_to_keep=k` returns).

    Example:
        >>> ids = torch.tensor([[5, 1, 2]]); ans = torch.tensor([[False, False, True]])
        >>> round(float(kept_loss(torch.zeros(1, 2, 4), ids, ans)), 4)
        1.3863
    """
    k = logits.shape[1]
    return answer_loss(logits, ids[:, -k:], answer[:, -k:])


def step_examples(cfg: GemmaTrainConfig, step: int, n: int, labels: Tensor) -> tuple[list[int], list[tuple[str, str]]]:
    """Image indices and (prompt, answer) pairs of training step `step` (deterministic from the seed).

    Example:
        >>> idx, ex = step_examples(GemmaTrainConfig(batch_size=2), 0, 10, torch.arange(10))
        >>> len(idx), len(ex)
        (2, 2)
    """
    rng = np.random.default_rng([cfg.seed, 4321, step])
    idx = rng.integers(n, size=cfg.batch_size).tolist()
    names, probs = list(GEMMA_TASKS), np.array(list(GEMMA_TASKS.values()))
    tasks = rng.choice(len(names), size=cfg.batch_size, p=probs / probs.sum())
    return idx, [task_example(names[t], int(labels[i])) for i, t in zip(idx, tasks)]


def class_head(model: torch.nn.Module, seed: int) -> torch.nn.Linear:
    """The linear class head on the tower's mean patch feature (stage -1's, and stage 1's auxiliary loss), seeded.

    Example:
        >>> m = torch.nn.Module(); m.config = type("C", (), {"vision_config": type("V", (), {"hidden_size": 4})})()
        >>> tuple(class_head(m, 0).weight.shape)
        (20, 4)
    """
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(model.config.vision_config.hidden_size, len(CLASS_NAMES))
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
        head.bias.zero_()
    return head


def class_loss(model: torch.nn.Module, head: torch.nn.Module, pixel_values: Float[Tensor, "b 3 h w"],
               labels: Int[Tensor, " b"]) -> tuple[Tensor, Float[Tensor, "b classes"]]:
    """(cross-entropy, logits) of `head` on the tower's mean patch feature: the tower classifies the images alone.

    Example:
        >>> m = torch.nn.Module(); m.model = torch.nn.Module()
        >>> m.model.vision_tower = lambda px: type("O", (), {"last_hidden_state": px.flatten(2).transpose(1, 2)})()
        >>> loss, logits = class_loss(m, torch.nn.Linear(3, 20), torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
        >>> tuple(logits.shape)
        (2, 20)
    """
    logits = head(model.model.vision_tower(pixel_values).last_hidden_state.mean(1))
    return torch.nn.functional.cross_entropy(logits, labels), logits


def pretrain_tower(model: torch.nn.Module, head: torch.nn.Module, data: GemmaBatches, cfg: GemmaTrainConfig,
                   progress: bool = True) -> float:
    """Stage -1: pre-train the SigLIP tower to classify the training images (as Gemma 3 starts from a trained SigLIP).

    The linear `head` (`class_head`) on the mean patch feature predicts the
    class; no language model runs. The same recipe as the 64-wide toy's
    `vlens.toy.train.pretrain_vision`. Returns the last batch's accuracy
    (a running mean).
    """
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    gen = torch.Generator().manual_seed(cfg.seed)
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_pretrain_lr, weight_decay=cfg.weight_decay)
    acc = 0.0
    bar = tqdm(range(cfg.vision_pretrain_steps), desc="stage -1: tower classifies the images",
               disable=None if progress else True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = cfg.vision_pretrain_lr * min(1.0, (step + 1) / 20) * (1 - step / cfg.vision_pretrain_steps)
        idx = torch.randint(len(data.labels), (cfg.tower_batch,), generator=gen)
        loss, logits = class_loss(model, head, data.pixel_values[idx], data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        acc = 0.9 * acc + 0.1 * float((logits.argmax(-1) == data.labels[idx]).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", refresh=False)
    return acc


def lr_at(cfg: GemmaTrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_frac` of the peak.

    Example:
        >>> cfg = GemmaTrainConfig(lr=1.0, warmup=10, steps=110, min_lr_frac=0.0)
        >>> lr_at(cfg, 0), lr_at(cfg, 10), round(lr_at(cfg, 110), 6)
        (0.1, 1.0, 0.0)
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return float(cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + np.cos(np.pi * t))))


@torch.no_grad()
def evaluate_gemma(vlm: "Any", n: int = 200, seed: int = 0, batch_size: int = 20, progress: bool = True) -> dict:
    """Held-out accuracy of the real-LM toy on `QUESTION`: greedy answer = class name, and colour / shape alone.

    Teacher-forced: an answer token is right when it is the argmax after the
    tokens before it, which is when greedy decoding emits it. `exact` needs
    every token of "<colour> <shape>"; `colour` the colour's tokens, `shape`
    the shape's; also the accuracy on `COLOUR_QUESTION` and `SHAPE_QUESTION`.
    """
    from tqdm.auto import tqdm

    ds = toy_dataset("heldout", n=n, seed=seed)
    model, tok = vlm.hf_model, vlm.processor.tokenizer
    hits = dict(exact=0, colour=0, shape=0, colour_question=0, shape_question=0)
    for start in tqdm(range(0, n, batch_size), desc="toy-gemma eval", disable=None if progress else True):
        samples = [ds[i] for i in range(start, min(n, start + batch_size))]
        for task in ("question", "colour", "shape"):
            ex = [task_example(task, s.label) for s in samples]
            b = vlm.prepare([p for p, _ in ex], [s.image for s in samples], answers=[a for _, a in ex])
            ids, ans = b.inputs["input_ids"], b.layout.answer
            keep = int(ans.sum(1).max()) + 1
            logits = model(**b.inputs, logits_to_keep=keep).logits
            right = (logits[:, :-1].argmax(-1) == ids[:, -keep + 1:]) | ~ans[:, -keep + 1:]
            if task != "question":
                hits[f"{task}_question"] += int(right.all(-1).sum())
                continue
            n_col = torch.tensor([len(tok(a.split()[0], add_special_tokens=False)["input_ids"]) for _, a in ex])
            n_ans = ans.sum(1)
            first = torch.arange(keep - 1) >= (keep - 1 - n_ans).unsqueeze(1)  # answer positions in the kept window
            is_col = first & (torch.arange(keep - 1) < (keep - 1 - n_ans + n_col).unsqueeze(1))
            hits["exact"] += int(right.all(-1).sum())
            hits["colour"] += int((right | ~is_col).all(-1).sum())
            hits["shape"] += int((right | ~(first & ~is_col)).all(-1).sum())
    return {k: v / max(n, 1) for k, v in hits.items()}


def _load_state(path: Path) -> dict:
    """A resume state, read with torch's restricted unpickler (tensors and plain containers: no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a state this trainer wrote
        raise InputError(f"{path} is not a state written by `vlens toy gemma-train` ({type(e).__name__}): delete it "
                         "or pass another --out to start afresh") from e


def _save_state(path: Path, model: torch.nn.Module, head: torch.nn.Module, opt: Any, step: int,
                cfg: GemmaTrainConfig, arch: GemmaToyArch, elapsed: float) -> None:
    from .._durable import atomic_write

    state = dict(trained=trained_state(model), head=head.state_dict(), opt=opt.state_dict(), step=step,
                 cfg=asdict(cfg), arch=asdict(arch), elapsed=elapsed)
    atomic_write(path, lambda p: torch.save(state, p))


def _same_run(saved: dict, cfg: GemmaTrainConfig, arch: GemmaToyArch) -> bool:
    loose = ("threads", "save_every", "steps")  # a finished run can be extended with more steps
    return ({k: v for k, v in saved["cfg"].items() if k not in loose} ==
            {k: v for k, v in asdict(cfg).items() if k not in loose} and saved["arch"] == asdict(arch))


def _setup(out: Path, cfg: GemmaTrainConfig, arch: GemmaToyArch, progress: bool) -> tuple:
    """Model, optimiser, data and the step to start from (resumed from `out/state.pt`, or after stage -1)."""
    processor = build_gemma_processor(arch)
    model = build_gemma_model(arch, seed=cfg.seed)
    head = class_head(model, cfg.seed)
    samples = list(toy_dataset("train", n=cfg.n_images, seed=cfg.seed, image_size=arch.image_size))
    data = GemmaBatches(processor, model.config, samples, progress=progress)
    state_path = out / "state.pt"
    if state_path.exists():
        st = _load_state(state_path)
        if not _same_run(st, cfg, arch):
            raise InputError(f"{state_path} was written with other settings ({st['cfg']}, {st['arch']}): rerun with "
                             "the same options to resume, or pass another --out to start afresh")
        model.load_state_dict(st["trained"], strict=False)
        head.load_state_dict(st["head"])
        opt = _stage1_optimiser(model, head, cfg)
        opt.load_state_dict(st["opt"])
        if progress:
            print(f"resuming from {state_path} at step {st['step']}/{cfg.steps}", flush=True)
        return model, head, processor, opt, data, st["step"], st["elapsed"]
    t0 = time.time()
    if cfg.vision_pretrain_steps:
        acc = pretrain_tower(model, head, data, cfg, progress=progress)
        if progress:
            print(f"stage -1: {cfg.vision_pretrain_steps} steps, running accuracy {acc:.2f}", flush=True)
    elapsed = time.time() - t0
    opt = _stage1_optimiser(model, head, cfg)
    _save_state(state_path, model, head, opt, 0, cfg, arch, elapsed)
    return model, head, processor, opt, data, 0, elapsed


def _stage1_optimiser(model: torch.nn.Module, head: torch.nn.Module, cfg: GemmaTrainConfig) -> Any:
    """Stage 1's AdamW: the projector; the tower unless `cfg.freeze_tower` (LLaVA's stage 1 freezes it); the class
    head when `cfg.aux_weight` keeps the tower's classification loss."""
    model.model.vision_tower.requires_grad_(not cfg.freeze_tower)
    params = [p for p in model.parameters() if p.requires_grad] + (list(head.parameters()) if cfg.aux_weight else [])
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))


def _run(model: torch.nn.Module, head: torch.nn.Module, opt: Any, data: GemmaBatches, cfg: GemmaTrainConfig,
         start: int, save: Any, progress: bool) -> int:
    """Stage 1 from `start`; saves every `save_every` steps and on Ctrl-C. Returns the steps done.

    The loss is the answer's cross-entropy, plus `cfg.aux_weight` times the tower's own classification loss
    on the step's images (measured: without it the answer loss makes the tower amplify colour until the
    shapes are no longer separable in its features, and the LM never learns them).
    """
    from tqdm.auto import tqdm

    params = [p for group in opt.param_groups for p in group["params"]]
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="toy-gemma train",
               disable=None if progress else True)
    ema, done, t_run = None, start, time.time()
    try:
        for step in bar:
            idx, ex = step_examples(cfg, step, len(data.samples), data.labels)
            inputs, answer = data.batch(idx, ex)
            for g in opt.param_groups:
                g["lr"] = lr_at(cfg, step)
            loss = kept_loss(model(**inputs).logits, inputs["input_ids"], answer)
            if cfg.aux_weight:
                loss = loss + cfg.aux_weight * class_loss(model, head, inputs["pixel_values"], data.labels[idx])[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            done = step + 1
            ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
            bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
            if done % cfg.save_every == 0 or done == cfg.steps:
                save(done)
                if progress:
                    print(f"step {done}/{cfg.steps} loss {ema:.3f} ({(time.time() - t_run) / (done - start):.2f} s/step, "
                          f"load {os.getloadavg()[0]:.1f})", flush=True)
    except KeyboardInterrupt:
        save(done)
        bar.close()
        print(f"\ninterrupted: saved at step {done}; rerun the same command to resume", flush=True)
        raise
    bar.close()
    model.eval()
    return done


def train_gemma(out: str | os.PathLike = "toy-gemma-run", cfg: GemmaTrainConfig | None = None,
                arch: GemmaToyArch | None = None, *, ship: bool = False, eval_n: int = 60,
                progress: bool = True) -> dict:
    """Train the real-LM toy's tower + projector into `out` (resuming from `out/state.pt`); returns the record.

    Writes `out/checkpoint/` (loadable by `load_toy_gemma(path=...)`) when
    done; with `ship`, also the package's copy. The record holds the held-out
    accuracies (`evaluate_gemma`), the steps, the wall time and the load average.
    """
    from ..model import VLM

    cfg, arch, out = cfg or GemmaTrainConfig(), arch or GemmaToyArch(), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prev = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model, head, processor, opt, data, start, elapsed = _setup(out, cfg, arch, progress)
        t_run, loads = time.time(), [os.getloadavg()[0]]

        def save(step: int) -> None:
            loads.append(os.getloadavg()[0])
            _save_state(out / "state.pt", model, head, opt, step, cfg, arch, elapsed + time.time() - t_run)

        done = _run(model, head, opt, data, cfg, start, save, progress)
        train_s = elapsed + time.time() - t_run
        vlm = VLM.wrap(model, processor, name="toy-gemma")
        acc = evaluate_gemma(vlm, n=eval_n, seed=cfg.seed, progress=progress) if eval_n else {}
        record = dict(arch=asdict(arch), train=asdict(cfg), steps=done, accuracy=acc, eval_n=eval_n,
                      train_seconds=round(train_s, 1), mean_load_during_run=round(float(np.mean(loads)), 2),
                      n_trained_params=sum(p.numel() for n, p in model.named_parameters() if n.startswith(TRAINED)),
                      tasks=GEMMA_TASKS, class_names=CLASS_NAMES, language_model="gemma-3-270m (q4_k_m GGUF, frozen)")
        save_trained(model, out / "checkpoint", record)
        if ship:
            save_trained(model, GEMMA_CHECKPOINT_DIR, record)
        return record
    finally:
        torch.set_num_threads(prev)
