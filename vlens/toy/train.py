"""Train the toy LLaVA-Next on CPU: `vlens toy train` (resumable) and `vlens toy eval`.

Each training example pairs a generated image with one prompt of a mix
(`TASKS`): the class question ("What is shown in this image?" -> "red
circle"), captioning ("Describe the image." -> the caption), the paper's
two-choice prompt (-> the true one of two class names), and the colour and
shape questions. The loss is the cross-entropy of the answer tokens only
(`batch.layout.answer` of `VLM.prepare`, closing `</s>` included).

Stage 0 (`pretrain_vision`) first trains the CLIP tower alone to classify the
training images, as LLaVA starts from a trained CLIP: it cuts the steps the
whole model needs to read shapes by about 7x.

Images are generated and processed once per run; token rows come from
`VLM.prepare` (cached per distinct prompt and answer) and are left-padded to
one fixed length, so every batch has the same shape. Step `s` draws its
batch from its own seed, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ..errors import InputError
from ..scoring import answer_correct, answer_loss
from .data import (
    CAPTION_PROMPT,
    CLASS_NAMES,
    COLOUR_QUESTION,
    COLOURS,
    QUESTION,
    SHAPE_QUESTION,
    SHAPES,
    caption_of,
    toy_dataset,
    two_choice_prompt,
)
from .model import CHECKPOINT_DIR, ToyArch, build_model, build_processor, evaluate, save_toy

#: The prompt mix of training: task name -> probability.
TASKS: dict[str, float] = {"question": 0.35, "two_choice": 0.25, "caption": 0.15, "colour": 0.1, "shape": 0.15}


@dataclass
class TrainConfig:
    """Training hyper-parameters (the defaults trained the shipped model).

    Example:
        >>> TrainConfig().batch_size
        32
    """

    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    min_lr_frac: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    n_images: int = 12000
    seed: int = 0
    save_every: int = 200
    threads: int = 2
    vision_pretrain_steps: int = 500
    vision_pretrain_lr: float = 2e-3


def task_example(task: str, meta: dict, label: int, rng: np.random.Generator) -> tuple[str, str]:
    """The (prompt text, answer) of one task for one image (prompts from `vlens.prompts`, with their `<image>`).

    Example:
        >>> task_example("question", {}, 0, np.random.default_rng(0))
        ('<image>\\nWhat is shown in this image?', 'red circle')
    """
    name = CLASS_NAMES[label]
    if task == "question":
        return QUESTION, name
    if task == "caption":
        return CAPTION_PROMPT, caption_of(meta)
    if task == "colour":
        return COLOUR_QUESTION, name.split()[0]
    if task == "shape":
        return SHAPE_QUESTION, name.split()[1]
    if task == "two_choice":
        colour, shape = name.split()
        u = rng.random()
        if u < 0.4:  # same shape, other colour
            other = f"{rng.choice([c for c in COLOURS if c != colour])} {shape}"
        elif u < 0.8:  # same colour, other shape
            other = f"{colour} {rng.choice([s for s in SHAPES if s != shape])}"
        else:
            other = str(rng.choice([c for c in CLASS_NAMES if c != name]))
        src, tgt = (name, other) if rng.random() < 0.5 else (other, name)
        return two_choice_prompt(src, tgt), name
    raise InputError(f"unknown task {task!r}; tasks are {list(TASKS)}")


class ToyBatches:
    """Fixed-shape training batches over pre-generated, pre-processed images.

    `rows(prompt, answer)` is the `VLM.prepare` token row of one example
    (cached); `batch(idx, examples)` stacks rows left-padded to `seq_len`.
    """

    def __init__(self, processor: Any, config: Any, samples: Sequence, progress: bool = True) -> None:
        from tqdm.auto import tqdm

        self.processor = processor
        self.config = config
        self.samples = list(samples)
        ims = [s.image for s in self.samples]
        self._dummy = ims[0]
        chunks = []
        for i in tqdm(range(0, len(ims), 500), desc="processing images", disable=None if progress else True):
            chunks.append(processor.image_processor(ims[i : i + 500], return_tensors="pt")["pixel_values"])
        self.pixel_values: Float[Tensor, "n tiles 3 h w"] = torch.cat(chunks)
        self.image_size = tuple(self.samples[0].image.size[::-1])
        self._cache: dict[tuple[str, str], tuple[list[int], list[bool]]] = {}
        self.seq_len = 0

    def warm(self, pairs: Sequence[tuple[str, str]], chunk: int = 64) -> None:
        """Prepare the rows of many (prompt, answer) pairs at once; grows `seq_len`."""
        from ..families.llava_next import LLAVA_NEXT
        from ..prepare import prepare

        todo = [p for p in dict.fromkeys(pairs) if p not in self._cache]
        for i in range(0, len(todo), chunk):
            part = todo[i : i + chunk]
            b = prepare(LLAVA_NEXT, self.processor, self.config, [p for p, _ in part], [self._dummy] * len(part),
                        [a for _, a in part], eos=True)
            ids, keep, ans = b.inputs["input_ids"], b.inputs["attention_mask"].bool(), b.layout.answer
            for k, pa in enumerate(part):
                self._cache[pa] = (ids[k][keep[k]].tolist(), ans[k][keep[k]].tolist())
                self.seq_len = max(self.seq_len, int(keep[k].sum()))

    def batch(self, idx: Sequence[int], examples: Sequence[tuple[str, str]]) -> tuple[dict, Bool[Tensor, "b s"]]:
        """Model inputs and the answer mask of images `idx` with (prompt, answer) `examples`."""
        from ..tokens import position_ids

        self.warm(examples)
        B, S = len(idx), self.seq_len
        pad = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((B, S), pad, dtype=torch.long)
        attn = torch.zeros((B, S), dtype=torch.long)
        answer = torch.zeros((B, S), dtype=torch.bool)
        for b, ex in enumerate(examples):
            ids, ans = self._cache[ex]
            input_ids[b, S - len(ids) :] = torch.tensor(ids)
            attn[b, S - len(ids) :] = 1
            answer[b, S - len(ids) :] = torch.tensor(ans)
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=position_ids(attn),
            pixel_values=self.pixel_values[list(idx)],
            image_sizes=torch.tensor([self.image_size] * B),
        )
        return inputs, answer


def step_examples(cfg: TrainConfig, step: int, samples: Sequence) -> tuple[list[int], list[tuple[str, str]]]:
    """The image indices and (prompt, answer) pairs of training step `step` (deterministic)."""
    rng = np.random.default_rng([cfg.seed, 1234, step])
    idx = rng.integers(len(samples), size=cfg.batch_size).tolist()
    names, probs = list(TASKS), np.array(list(TASKS.values()))
    tasks = rng.choice(len(names), size=cfg.batch_size, p=probs / probs.sum())
    ex = [task_example(names[t], samples[i].meta, samples[i].label, rng) for i, t in zip(idx, tasks)]
    return idx, ex


def all_examples(samples: Sequence) -> list[tuple[str, str]]:
    """Every (prompt, answer) pair the task mix can produce for these samples (to fix the sequence length)."""
    out = set()
    for s in samples:
        name = CLASS_NAMES[s.label]
        out.add((CAPTION_PROMPT, caption_of(s.meta)))
    for name in CLASS_NAMES:
        out.add((QUESTION, name))
        out.add((COLOUR_QUESTION, name.split()[0]))
        out.add((SHAPE_QUESTION, name.split()[1]))
        for other in CLASS_NAMES:
            if other != name:
                out.add((two_choice_prompt(name, other), name))
                out.add((two_choice_prompt(other, name), name))
    return sorted(out)


def pretrain_vision(model: torch.nn.Module, data: "ToyBatches", cfg: TrainConfig, progress: bool = True) -> float:
    """Stage 0: pre-train the CLIP tower to classify the training images (as LLaVA starts from a trained CLIP).

    The tower reads the base tile (the whole image at tile resolution); a
    throw-away linear head on its mean patch feature (the features the
    projector reads) predicts the class. Returns the last batch's accuracy.
    """
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    d = model.config.vision_config.hidden_size
    layer = model.config.vision_feature_layer
    gen = torch.Generator().manual_seed(cfg.seed)
    head = torch.nn.Linear(d, len(CLASS_NAMES))
    with torch.no_grad():
        head.weight.normal_(0, 0.02, generator=gen)
        head.bias.zero_()
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.vision_pretrain_lr, weight_decay=cfg.weight_decay)
    labels = torch.tensor([s.label for s in data.samples])
    acc = 0.0
    bar = tqdm(range(cfg.vision_pretrain_steps), desc="vision pre-training", disable=None if progress else True)
    for step in bar:
        idx = torch.randint(len(labels), (cfg.batch_size,), generator=gen)
        out = tower(data.pixel_values[idx, 0], output_hidden_states=True)
        h = out.hidden_states[layer][:, 1:].mean(1)
        logits = head(h)
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        acc = 0.9 * acc + 0.1 * float((logits.argmax(-1) == labels[idx]).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", refresh=False)
    if progress and bar.disable:
        print(f"vision pre-training: {cfg.vision_pretrain_steps} steps, running acc {acc:.2f}", flush=True)
    return acc


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to `min_lr_frac` of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + np.cos(np.pi * min(t, 1.0))))


def _resume_key(cfg: dict) -> dict:
    """The settings a resumed run must share with the saved one (threads and save cadence may change)."""
    return {k: v for k, v in cfg.items() if k not in ("threads", "save_every")}


def _load_state(path: Path) -> dict:
    """Read a resume state with torch's restricted unpickler (tensors and plain containers only: no code runs)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not a state this trainer wrote
        raise InputError(
            f"{path} is not a resume state written by `vlens toy train` ({type(e).__name__}: {str(e)[:200]}); "
            "delete it or pass another --out to start afresh"
        ) from e


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _resume(state_path: Path, cfg: TrainConfig, arch: ToyArch, model: torch.nn.Module, opt: torch.optim.Optimizer,
            progress: bool) -> tuple[int, float]:
    """Load `state_path` into the model and optimiser if it exists (same settings only); (start step, seconds so far)."""
    if not state_path.exists():
        return 0, 0.0
    st = _load_state(state_path)
    if _resume_key(st["cfg"]) != _resume_key(asdict(cfg)) or st["arch"] != asdict(arch):
        raise InputError(
            f"{state_path} was written with other settings ({st['cfg']}, {st['arch']}); "
            "rerun with the same options to resume, or pass another --out to start afresh"
        )
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["opt"])
    start, elapsed = st["step"], st.get("elapsed", 0.0)
    if progress:
        print(f"resuming from {state_path} at step {start}/{cfg.steps}")
    return start, elapsed


def _record(cfg: TrainConfig, arch: ToyArch, model: torch.nn.Module, acc: float, eval_n: int, train_s: float,
            total_s: float) -> dict:
    """What the checkpoint records about its training: settings, accuracy, time, prompts, classes, tasks."""
    return dict(
        arch=asdict(arch),
        train=asdict(cfg),
        steps=cfg.steps,
        accuracy=acc,
        eval_n=eval_n,
        train_seconds=round(train_s, 1),
        total_seconds=round(total_s, 1),
        n_params=sum(p.numel() for p in model.parameters()),
        prompts=dict(question=QUESTION, caption=CAPTION_PROMPT, colour=COLOUR_QUESTION, shape=SHAPE_QUESTION,
                     two_choice=two_choice_prompt("{src}", "{tgt}")),
        class_names=CLASS_NAMES,
        tasks=TASKS,
    )


def train(
    out: str | os.PathLike = "toy-run",
    cfg: TrainConfig | None = None,
    arch: ToyArch | None = None,
    *,
    ship: bool = False,
    eval_n: int = 500,
    progress: bool = True,
) -> dict:
    """Train the toy model into `out` (resuming from `out/state.pt` if present) and return its record.

    Writes `out/state.pt` (model + optimiser + step, atomically, every
    `save_every` steps and on Ctrl-C) and, when done, the loadable checkpoint
    `out/checkpoint/`; with `ship`, also the package's `vlens/toy/checkpoint/`.
    The record holds the held-out accuracy, steps and wall time.

    Example:
        >>> import tempfile
        >>> cfg = TrainConfig(steps=2, n_images=40, batch_size=4, vision_pretrain_steps=2)
        >>> rec = train(tempfile.mkdtemp(), cfg, eval_n=20, progress=False)
        >>> rec["steps"], 0.0 <= rec["accuracy"] <= 1.0
        (2, True)
    """
    from tqdm.auto import tqdm

    from ..model import VLM

    cfg = cfg or TrainConfig()
    arch = arch or ToyArch()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    t0 = time.time()
    try:
        processor = build_processor(arch)
        model = build_model(arch, processor, seed=cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
        start, elapsed = _resume(state_path, cfg, arch, model, opt, progress)

        samples = [s for s in toy_dataset("train", n=cfg.n_images, seed=cfg.seed, image_size=arch.image_size)] \
            if start < cfg.steps else []
        if samples:
            data = ToyBatches(processor, model.config, samples, progress=progress)
            data.warm(all_examples(samples))

        if samples and start == 0 and cfg.vision_pretrain_steps > 0:
            pretrain_vision(model, data, cfg, progress=progress)

        def save(step: int) -> None:
            _atomic_save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, cfg=asdict(cfg),
                              arch=asdict(arch), elapsed=elapsed + time.time() - t_run), state_path)

        model.train()
        t_run = time.time()
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="toy train",
                   disable=None if progress else True)
        ema_loss, ema_acc = None, None
        done = start  # steps whose update is applied
        try:
            for step in bar:
                idx, ex = step_examples(cfg, step, samples)
                inputs, answer = data.batch(idx, ex)
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                logits = model(**inputs).logits
                loss = answer_loss(logits, inputs["input_ids"], answer)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                done = step + 1
                acc = float(answer_correct(logits.detach(), inputs["input_ids"], answer).float().mean())
                ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
                ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
                bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.2f}", refresh=False)
                if done % cfg.save_every == 0 or done == cfg.steps:
                    save(done)
                    if progress and bar.disable:  # no live bar (not a terminal): log a line instead
                        print(f"step {done}/{cfg.steps} loss {ema_loss:.3f} acc {ema_acc:.2f} "
                              f"({time.time() - t_run:.0f} s)", flush=True)
        except KeyboardInterrupt:
            save(done)
            bar.close()
            print(f"\ninterrupted: saved {state_path} at step {done}; rerun the same command to resume")
            raise
        bar.close()
        train_s = elapsed + time.time() - t_run if samples else elapsed

        model.eval()
        vlm = VLM.wrap(model, processor, name="toy")
        acc = evaluate(vlm, n=eval_n, seed=cfg.seed, progress=progress) if eval_n else float("nan")
        record = _record(cfg, arch, model, acc, eval_n, train_s, time.time() - t0)
        save_toy(model, processor, out / "checkpoint", record)
        if ship:
            save_toy(model, processor, CHECKPOINT_DIR, record)
        return record
    finally:
        torch.set_num_threads(prev_threads)
