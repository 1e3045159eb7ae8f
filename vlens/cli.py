"""The `vlens` command line, one module: `demo`, `toy train|eval|samples`, `harvest`, `probe`, `train-sae`,
`train-saes`, `export`, `dashboard`, `explore`.

Every command that runs a model takes the same model options: `--model toy |
tiny:FAMILY | HUB_ID | DIR`, `--weights random` with `--d-model`, `--n-layers`,
`--vision-d-model`, `--vision-layers` and `--seed`, then `--device` and
`--dtype`.

Each command is a thin shell over a library function. Its flags come from the
function's signature or config dataclass (so a default is written once, in
the library), arguments are checked before anything heavy loads, and a user
error prints one line `vlens: error: ...` and exits with code 2. `python -m
vlens` is the same program (so `torchrun ... -m vlens harvest ...` works).

    $ vlens harvest --layers 1,3 --pool mean --n 200 --out runs/pooled
    $ vlens toy eval --n 100
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import typer

from ._modelopts import ModelChoice, config_options, given_fields, model_options, option_default, with_options
from .errors import InputError, VlensError

__all__ = ["app", "main"]

app = typer.Typer(
    name="vlens",
    help="vlens: interpretability for vision-language models. `vlens COMMAND --help` describes each command.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
toy_app = typer.Typer(help="Train, evaluate or sample the embedded toy LLaVA-Next.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `vlens` command with `argv` (default: `sys.argv[1:]`); return its exit code.

    Example:
        >>> main(["toy", "eval", "--n", "0"])    # prints `vlens: error: --n must be at least 1 (got 0)` to stderr
        2
    """
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        code = app(args=args, prog_name="vlens", standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        print("vlens: interrupted", file=sys.stderr)
        return 130
    except VlensError as e:
        print(f"vlens: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # typer's usage errors (its vendored click exceptions) show themselves
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return int(e.exit_code)
        raise
    return int(code or 0)


# -- flags from the library --------------------------------------------------------------------


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def _layers(text: str, n_layers: int) -> list[int]:
    from .sites import resolve

    try:
        items = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--layers takes comma-separated ints such as 1,2,3, not {text!r}") from None
    if not items:
        raise InputError("--layers needs at least one layer, e.g. --layers 1,2,3")
    for L in items:
        resolve(L, n_layers)
    return items


def _data(data: str, n: int):
    from . import data as vdata

    if data == "toy":
        return vdata.toy("train", n=n)
    if not Path(data).is_dir():
        raise InputError(f"--data is 'toy' or an image folder (class/xxx.jpg); {data!r} is neither")
    return vdata.image_folder(data)


def _device(device: str | None, env: Any) -> str | None:
    return f"cuda:{env.local_rank}" if device == "cuda" and env.enabled else device


# -- commands ----------------------------------------------------------------------------------


def _demo_command() -> Callable:
    from .demo import TOY_MODELS, DemoConfig, run

    @with_options(config_options(DemoConfig), model_options())
    def demo(
        out: Path = typer.Option(Path(option_default(run, "out")), help="output directory (report, stores, SAEs, dashboards)"),
        fast: bool = typer.Option(False, "--fast", help="CI-sized run (about 2 minutes on 2 CPU cores)"),
        data: Optional[str] = typer.Option(None, help="image-class data for a real model: folder or HF dataset id"),
        captions: Optional[Path] = typer.Option(None, help="ShareGPT4V-style caption JSON for a real model"),
        image_root: Optional[Path] = typer.Option(None, help="image root of --captions"),
        **options: Any,
    ) -> None:
        """Run every experiment of the paper on the toy model (or a real one) and write an HTML report.

        The real-LM toy (Gemma 3 270M; the `real-lm` extra): `--model toy-gemma`, at its own sizes.

        A real checkpoint: `--model llava-hf/llava-v1.6-mistral-7b-hf --device cuda --data DIR --captions
        caps.json`. Its real architecture, tokenizer and processor with random weights, offline on a CPU:
        add `--weights random --d-model 64 --n-layers 2 --vision-d-model 32 --vision-layers 1`.
        """
        m = ModelChoice.pop(options)
        if m.model not in TOY_MODELS and (data is None or captions is None):
            raise InputError("a model other than the toy needs --data (an image folder or HF dataset id) and "
                             "--captions (a ShareGPT4V-style JSON), with --image-root if its paths are relative")
        base = DemoConfig.for_model(m.model, fast)
        cfg = dataclasses.replace(base, **given_fields(DemoConfig, options))
        words = None
        if data is not None and captions is not None and Path(data).is_dir():  # a tiny build learns them
            from .data import image_folder, sharegpt4v, vocabulary

            root = None if image_root is None else str(image_root)
            words = vocabulary(image_folder(data)) + vocabulary(sharegpt4v(str(captions), image_root=root))
        vlm: Any = m.model if m.model == "toy" and m.dtype is None else m.load(words=words)
        run(out, model=vlm, device=m.device, data=data, captions=None if captions is None else str(captions),
            image_root=None if image_root is None else str(image_root), config=cfg)

    return demo


app.command("demo")(_demo_command())


def _toy_train_command() -> Callable:
    from .toy.model import ToyArch
    from .toy.train import TrainConfig, train

    @with_options(config_options(TrainConfig))
    def toy_train(
        out: Path = typer.Option(Path(option_default(train, "out")), help="run directory: state.pt (resume) and checkpoint/"),
        layers: int = typer.Option(ToyArch().n_layers, help="language-model layers"),
        vision_layers: int = typer.Option(ToyArch().vision_layers, help="vision-tower layers"),
        eval_n: int = typer.Option(option_default(train, "eval_n"), help="held-out images scored at the end (0: skip)"),
        ship: bool = typer.Option(False, "--ship", help="also write the checkpoint into the installed package"),
        **options: Any,
    ) -> None:
        """Train the toy LLaVA-Next on CPU (resumable: rerun the same command to continue)."""
        from .toy.model import CHECKPOINT_DIR

        _positive("layers", layers)
        cfg = TrainConfig(**given_fields(TrainConfig, options))
        _positive("steps", cfg.steps)
        rec = train(out, cfg, ToyArch(n_layers=layers, vision_layers=vision_layers), ship=ship, eval_n=eval_n)
        print(f"checkpoint: {out / 'checkpoint'}" + (f" (and {CHECKPOINT_DIR})" if ship else ""))
        print(f"train time: {rec['train_seconds']:.0f} s")
        print(f"accuracy: {rec['accuracy']:.2f}")

    return toy_train


toy_app.command("train")(_toy_train_command())


def _toy_gemma_train_command() -> Callable:
    from .toy.gemma_train import GemmaTrainConfig, train_gemma

    @with_options(config_options(GemmaTrainConfig))
    def toy_gemma_train(
        out: Path = typer.Option(Path(option_default(train_gemma, "out")), help="run directory: state.pt and checkpoint/"),
        eval_n: int = typer.Option(option_default(train_gemma, "eval_n"), help="held-out images scored at the end (0: skip)"),
        ship: bool = typer.Option(False, "--ship", help="also write the weights into the installed package"),
        **options: Any,
    ) -> None:
        """Train the real-LM toy's tower + projector, Gemma 3 270M frozen (resumable: rerun to continue)."""
        cfg = GemmaTrainConfig(**given_fields(GemmaTrainConfig, options))
        if cfg.steps < 0:
            raise InputError(f"--steps must be at least 0 (0: stage -1 only), not {cfg.steps}")
        rec = train_gemma(out, cfg, ship=ship, eval_n=eval_n)
        print(f"checkpoint: {out / 'checkpoint'}")
        print(f"train time: {rec['train_seconds']:.0f} s (mean load {rec['mean_load_during_run']})")
        print("accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in rec["accuracy"].items()))

    return toy_gemma_train


toy_app.command("gemma-train")(_toy_gemma_train_command())


@toy_app.command("eval")
def toy_eval(
    n: int = typer.Option(500, help="held-out images"),
    path: Optional[Path] = typer.Option(None, help="checkpoint directory (default: the shipped one)"),
    seed: int = typer.Option(0, help="seed of the held-out images"),
    threads: int = typer.Option(2, help="torch CPU threads"),
) -> None:
    """Score "What is shown in this image?" on held-out toy images; the last line is `accuracy: 0.97`."""
    import torch

    from .toy.model import evaluate, load_toy

    _positive("n", n)
    torch.set_num_threads(threads)
    print(f"accuracy: {evaluate(load_toy(path=path), n=n, seed=seed):.2f}")


@toy_app.command("samples")
def toy_samples(
    out: Path = typer.Option(Path("docs/assets/toy"), help="output folder"),
    n: int = typer.Option(10, help="how many images"),
    split: str = typer.Option("heldout", help="'train' or 'heldout'"),
) -> None:
    """Write sample toy images and print their Markdown captions table."""
    from .toy.samples import samples_table, write_samples

    _positive("n", n)
    paths = write_samples(out, n=n, split=split)
    print(f"wrote {len(paths)} images to {out}; their Markdown table (links relative to docs/):\n")
    print(samples_table(n=n, split=split))


def _harvest_command() -> Callable:
    from .activations.harvesting import harvest

    @with_options(model_options())
    def run_harvest(
        layers: str = typer.Option(..., help="comma-separated LM layers, e.g. 1,2,3 (negative counts from the end)"),
        out: Path = typer.Option(..., help="the store directory"),
        data: str = typer.Option("toy", help="'toy' (the toy image set) or an image folder (class/xxx.jpg)"),
        n: int = typer.Option(200, help="number of toy samples"),
        site: str = typer.Option("resid_pre", help="resid_pre (entering layer L) or resid_post (leaving it)"),
        tokens: str = typer.Option(option_default(harvest, "tokens"), help="token selection, e.g. image, image+answer"),
        pool: Optional[str] = typer.Option(None, help="mean: one row per sample"),
        captions: bool = typer.Option(False, "--captions", help="append each sample's caption as the answer"),
        text_only: bool = typer.Option(False, "--text-only", help="also run a text-only pass over the captions"),
        text_tokens: Optional[str] = typer.Option(None, help="what the text-only pass keeps (default: --tokens); "
                                                  "all: every token, BOS included, as the paper's code"),
        prompt: str = typer.Option(option_default(harvest, "prompt"), help="the prompt, with <image>"),
        batch_size: int = typer.Option(option_default(harvest, "batch_size"), help="samples per forward"),
        store_dtype: Optional[str] = typer.Option(None, help="storage dtype, e.g. bfloat16 (default: the model's)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a store of another configuration"),
        **options: Any,
    ) -> None:
        """Harvest residual activations of a data set to an on-disk store (resumable)."""
        from . import distributed
        from .activations.stream import StreamPlan
        from .sites import RESIDUAL_KINDS

        # Everything checkable is checked before the model loads.
        m = ModelChoice.pop(options)
        _positive("n", n)
        _positive("batch-size", batch_size)
        if site not in RESIDUAL_KINDS:
            raise InputError(f"--site is resid_pre or resid_post, not {site!r}")
        if pool not in (None, "mean"):
            raise InputError(f"--pool is mean (or absent), not {pool!r}")
        # the harvest's own check of its stream (token selection, storage dtype), before the model loads
        StreamPlan(tokens, prompt, True, captions, text_only, "", batch_size, store_dtype, text_tokens).check(
            batch_name="--batch-size")
        if not str(out).strip():
            raise InputError("--out must name a directory")
        layer_ids = _layers(layers, m.facts().n_layers)
        dataset = _data(data, n)
        env = distributed.init()  # joins torchrun's process group; a no-op on one process
        vlm = m.load(words=dataset, device=_device(m.device, env))
        store = harvest(vlm, dataset, [f"{site}.{L}" for L in layer_ids], tokens=tokens, pool=pool,
                        batch_size=batch_size, dtype=store_dtype, out=out, prompt=prompt, captions=captions,
                        text_only=text_only, text_tokens=text_tokens, overwrite=overwrite, progress=env.is_main)
        if env.is_main:
            print(store)
        distributed.cleanup()

    return run_harvest


app.command("harvest")(_harvest_command())


def _train_sae_command() -> Callable:
    from .sae.training import PRESETS, ArchitectureConfig, TrainerConfig, train

    # transcoders need two sites per row, which a store does not hold: `vlens train-saes --transcoders`
    arch_options = config_options(ArchitectureConfig,
                                   skip=("architecture", "d_in", "d_sae", "transcoder", "skip", "d_out"))
    trainer_options = config_options(TrainerConfig, skip=("total_steps",))

    @with_options(arch_options, trainer_options)
    def train_sae(
        store: Path = typer.Option(..., help="a harvest directory (vlens harvest ... --out DIR)"),
        layer: int = typer.Option(..., help="the store's layer to train on"),
        out: Path = typer.Option(..., help="export directory (SAE-Lens format)"),
        preset: str = typer.Option(option_default(train, "preset"), help=f"one of {', '.join(sorted(PRESETS))}"),
        expansion: int = typer.Option(8, help="latents per residual dimension (d_sae = expansion × d_model)"),
        steps: Optional[int] = typer.Option(None, help="training steps (default: one pass over the store)"),
        checkpoint_dir: Optional[Path] = typer.Option(None, help="periodic checkpoints; rerun to resume"),
        device: str = typer.Option(option_default(train, "device"), help="cpu or cuda (under torchrun: cuda:LOCAL_RANK)"),
        **options: Any,
    ) -> None:
        """Train a multimodal SAE on one layer of a harvest store and export it in SAE-Lens format.

        Runs on one process, or on many under `torchrun --nproc-per-node N -m vlens train-sae ...`
        (DistributedDataParallel: each rank reads its slice of every global batch).
        """
        from . import distributed
        from .activations import ActivationStore
        from .sae.io import export

        if preset not in PRESETS:
            raise InputError(f"--preset must be one of {', '.join(sorted(PRESETS))}, not {preset!r}")
        _positive("expansion", expansion)
        _positive("steps", steps)
        given = {**given_fields(ArchitectureConfig, options), **given_fields(TrainerConfig, options)}
        source = ActivationStore(store)
        source.hook_name(layer)  # an unknown layer is refused before training starts
        env = distributed.init()
        sae = train(source, preset, layer=layer, expansion=expansion, steps=steps, checkpoint_dir=checkpoint_dir,
                    progress=env.is_main, model_name=source.config.get("model"), device=_device(device, env), **given)
        if env.is_main:
            path = export(sae, out, model_name=source.config.get("model"), hook_name=source.hook_name(layer))
            print(f"SAE exported to {path}")
            _print_quality(sae, source, layer)
        distributed.cleanup()

    return train_sae


app.command("train-sae")(_train_sae_command())


def _print_quality(sae: Any, source: Any, layer: int, n_tokens: int = 65536) -> None:
    """The SAE's explained variance, L0 and dead latents on (up to `n_tokens` of) its store, per modality."""
    from .sae.evals import evaluate

    r = evaluate(sae, source, layer=layer, n_tokens=min(n_tokens, len(source)))
    for group in ("overall", "image", "text"):
        g = r[group]
        if g["n_tokens"]:
            print(f"{group}: explained variance {g['explained_variance']:.3f}, L0 {g['l0']:.1f}, "
                  f"dead latents {int(g['dead'])} of {sae.cfg.d_sae} ({int(g['n_tokens'])} tokens of the store)")


@app.command("probe")
def probe(
    store: Path = typer.Option(..., help="a pooled harvest of a labelled data set (vlens harvest ... --pool mean)"),
    layers: Optional[str] = typer.Option(None, help="comma-separated layers of the store (default: all)"),
    kind: str = typer.Option("softmax", help="softmax (multiclass) or ovr (one-vs-rest)"),
    test_size: float = typer.Option(0.2, help="held-out share of each class"),
    modality: Optional[str] = typer.Option(None, help="a per-token store: mean over image or text tokens only"),
    figure: Optional[Path] = typer.Option(None, help="write the accuracy-by-layer figure here (.html)"),
) -> None:
    """Fit a linear probe per layer on a pooled harvest store and print each layer's held-out accuracy."""
    from .activations import ActivationStore
    from .probes import sweep

    if kind not in ("softmax", "ovr"):
        raise InputError(f"--kind is softmax or ovr, not {kind!r}")
    if not 0 < test_size < 1:
        raise InputError(f"--test-size is a share between 0 and 1, not {test_size}")
    if modality not in (None, "image", "text"):
        raise InputError(f"--modality is image or text (or absent: every stored token), not {modality!r}")
    source = ActivationStore(store)
    chosen = source.layers if layers is None else _layers(layers, max(source.layers) + 1)
    features = {L: source.pooled(L, modality) for L in chosen}
    result = sweep(features, chosen, kind, test_size=test_size)
    n_classes = len(result.probes[result.layers[0]].classes)
    print(f"{kind} probe on {n_classes} classes (chance {1 / n_classes:.3f}), {source.path}")
    for L, acc in result.accuracy.items():
        print(f"layer {L}: held-out accuracy {acc:.3f}")
    if figure is not None:
        result.figure().write_html(figure, include_plotlyjs="cdn")
        print(f"figure: {figure}")


def _dashboard_command() -> Callable:
    from .sae.dashboards import dashboard

    @with_options(model_options())
    def run_dashboard(
        sae: Path = typer.Option(..., help="an SAE directory (vlens train-sae / vlens export / vlens.sae.export)"),
        out: Path = typer.Option(..., help="output folder: index.html and one page per latent"),
        data: str = typer.Option("toy", help="'toy' (the toy image set) or an image folder (class/xxx.jpg)"),
        n: int = typer.Option(64, help="samples to look for top activations in"),
        n_latents: int = typer.Option(option_default(dashboard, "n_latents"), help="pages for the most frequent latents"),
        top_k: int = typer.Option(option_default(dashboard, "top_k"), help="top images and contexts per latent"),
        **options: Any,
    ) -> None:
        """Write SAE latent dashboards (top images with their patches, top text, logits) as HTML pages."""
        from .sae.io import load as load_sae

        for name, v in (("n", n), ("n-latents", n_latents), ("top-k", top_k)):
            _positive(name, v)
        m = ModelChoice.pop(options)
        if not sae.exists():
            raise InputError(f"no SAE at {sae}: pass a directory written by vlens train-sae or vlens export")
        loaded = load_sae(sae)
        dataset = _data(data, n)
        samples = [dataset[i] for i in range(min(n, len(dataset)))]
        index = dashboard(loaded, m.load(words=dataset), samples, out, n_latents=n_latents, top_k=top_k)
        print(f"dashboards: {index}")

    return run_dashboard


app.command("dashboard")(_dashboard_command())


def _train_saes_command() -> Callable:
    from .sae.training import PRESETS, train_many
    from .sae.transcoder import transcoder_specs

    @with_options(model_options())
    def train_saes(
        sites: str = typer.Option(..., help="comma-separated sites, one SAE each, e.g. resid_pre.2,resid_post.4"),
        out: Path = typer.Option(..., help="export directory: one SAE-Lens folder per SAE, named after its site"),
        data: str = typer.Option("toy", help="'toy' (the toy image set) or an image folder (class/xxx.jpg)"),
        n: int = typer.Option(200, help="number of toy samples"),
        preset: str = typer.Option("paper", help=f"one of {', '.join(sorted(PRESETS))}, for every SAE"),
        expansion: int = typer.Option(8, help="latents per residual dimension (d_sae = expansion × d_model)"),
        n_tokens: int = typer.Option(..., help="training tokens per SAE (the data is streamed again if needed)"),
        batch_size: Optional[int] = typer.Option(None, help="SAE batch size (default: the preset's)"),
        tokens: str = typer.Option(option_default(train_many, "tokens"), help="token selection, e.g. image, image+answer"),
        captions: bool = typer.Option(False, "--captions", help="append each sample's caption as the answer"),
        text_only: bool = typer.Option(False, "--text-only", help="also run a text-only pass over the captions"),
        forward_batch_size: int = typer.Option(option_default(train_many, "forward_batch_size"), help="samples per forward"),
        buffer: Optional[int] = typer.Option(None, help="shuffle-buffer rows per SAE (default: 8 batches)"),
        checkpoint_dir: Optional[Path] = typer.Option(None, help="periodic checkpoints; rerun to resume"),
        transcoders: bool = typer.Option(False, "--transcoders", help="train transcoders mlp_in.L -> mlp_out.L "
                                         "instead: --sites then takes layers, e.g. 0,1,2 or all"),
        skip: bool = typer.Option(False, "--skip", help="with --transcoders: SAE-Lens's skip connection (W_skip)"),
        **options: Any,
    ) -> None:
        """Train one SAE per site (or one transcoder per layer) from a single streaming pass of the model."""
        from .sae.io import export
        from .activations.stream import StreamPlan
        from .sites import RESIDUAL_KINDS, parse, resolve

        if preset not in PRESETS:
            raise InputError(f"--preset must be one of {', '.join(sorted(PRESETS))}, not {preset!r}")
        for name, v in (("n", n), ("expansion", expansion), ("n-tokens", n_tokens),
                        ("forward-batch-size", forward_batch_size), ("buffer", buffer),
                        ("batch-size", batch_size)):
            _positive(name, v)
        # train_many's own check of its stream, before the model loads
        StreamPlan(tokens, captions=captions, text_only=text_only, batch_size=forward_batch_size).check(
            batch_name="--forward-batch-size")
        m = ModelChoice.pop(options)
        f = m.facts()
        names = [x.strip() for x in sites.split(",") if x.strip()]
        if not names:
            raise InputError("--sites must name at least one site, e.g. resid_pre.2,resid_post.4")
        if skip and not transcoders:
            raise InputError("--skip is a transcoder option: add --transcoders (or leave --skip out)")
        layers = _transcoder_layers(names, f.n_layers) if transcoders else None
        for x in names if layers is None else []:
            if parse(x).kind not in RESIDUAL_KINDS:
                raise InputError(f"--sites takes resid_pre.L and resid_post.L sites, not {x!r}")
            resolve(x, f.n_layers)
        dataset = _data(data, n)
        vlm = m.load(words=dataset)
        spec = {"preset": preset, "expansion": expansion, **({"batch_size": batch_size} if batch_size else {})}
        specs = ({x: dict(spec) for x in names} if layers is None
                 else transcoder_specs(vlm, spec.pop("preset"), layers, skip=skip, **spec))
        saes = train_many(vlm, dataset, specs,
                          tokens=tokens, captions=captions, text_only=text_only, forward_batch_size=forward_batch_size,
                          buffer=buffer, n_tokens=n_tokens, checkpoint_dir=checkpoint_dir, device=m.device or "cpu")
        for name, sae in saes.items():
            path = export(sae, Path(out) / name, model_name=vlm.name, hook_name=sae.cfg.metadata.hook_name)
            print(f"{name}: exported to {path}")

    return train_saes


app.command("train-saes")(_train_saes_command())


def _transcoder_layers(names: list[str], n_layers: int) -> list[int]:
    """`--sites` of `train-saes --transcoders`: layer numbers (negative from the end) or `all`."""
    if names == ["all"]:
        return list(range(n_layers))
    try:
        layers = [int(x) for x in names]
    except ValueError:
        raise InputError(f"with --transcoders, --sites takes layers (e.g. 0,1,2 or all), not {','.join(names)!r}") from None
    bad = [L for L in layers if not -n_layers <= L < n_layers]
    if bad:
        raise InputError(f"layers {bad} do not exist: this model has layers 0..{n_layers - 1}")
    return [L % n_layers for L in layers]


def _export_command() -> Callable:
    from .sae.io import convert_paper_checkpoint, convert_sparsify_checkpoint, convert_sparsify_run

    def export_sae(
        format: str = typer.Argument(..., help="paper (an fc1/fc2 state dict) or sparsify (a cfg.json + sae.safetensors "
                                                "dir, or a run dir of layers.N/ hookpoint dirs: each is converted)"),
        src: Path = typer.Argument(..., help="the checkpoint file or directory"),
        out: Path = typer.Option(..., help="SAE-Lens directory to write (for a sparsify run: one subdirectory per hookpoint)"),
        model_name: Optional[str] = typer.Option(None, help="the model the SAE belongs to"),
        hook_name: Optional[str] = typer.Option(None, help="paper: e.g. blocks.16.hook_resid_pre (the paper's site); "
                                                            "sparsify: default from the folder, layers.N -> "
                                                            "blocks.N.hook_resid_post"),
        input_scale: float = typer.Option(option_default(convert_paper_checkpoint, "input_scale"),
                                          help="paper format: inputs ×scale, outputs ÷scale"),
        dtype: str = typer.Option(str(option_default(convert_sparsify_checkpoint, "dtype")),
                                  help="weights dtype: float32, bfloat16, float16, or 'stored' (as in the checkpoint)"),
    ) -> None:
        """Convert the paper's or sparsify's SAE checkpoints to SAE-Lens's disk format."""
        if format not in ("paper", "sparsify"):
            raise InputError(f"the format is paper or sparsify, not {format!r}")
        if not src.exists():
            raise InputError(f"no checkpoint at {src}")
        dt = None if dtype == "stored" else dtype
        if format == "paper":
            convert_paper_checkpoint(src, out, input_scale=input_scale, model_name=model_name, hook_name=hook_name, dtype=dt)
        elif src.is_dir() and not (src / "cfg.json").exists():  # a run folder: every hookpoint
            if hook_name is not None:
                raise InputError("--hook-name names one site; a run folder's hookpoints each take theirs from the folder")
            saes = convert_sparsify_run(src, out, model_name=model_name, dtype=dt)
            for name, sae in saes.items():
                print(f"{name}: {sae.cfg.metadata.hook_name} -> {out / name}")
        else:
            convert_sparsify_checkpoint(src, out, model_name=model_name, hook_name=hook_name, dtype=dt)
        print(f"wrote {out}")

    return export_sae


app.command("export")(_export_command())


def _explore_command() -> Callable:
    from .explorer import explore

    @with_options(model_options())
    def run_explore(
        host: str = typer.Option(option_default(explore, "host"), help="address to listen on (default: this machine only)"),
        port: int = typer.Option(option_default(explore, "port"), help="port to listen on (0: any free port)"),
        sae: Optional[Path] = typer.Option(None, help="an SAE directory (SAE-Lens format): SAE vector, map and latents"),
        n_train: int = typer.Option(option_default(explore, "n_train"), help="toy images for class means and probes"),
        n_pool: int = typer.Option(option_default(explore, "n_pool"), help="toy images to pick from and browse latents on"),
        open_browser: bool = typer.Option(False, "--open", help="open the page in the default browser"),
        graph: Optional[list[Path]] = typer.Option(None, help="an attribution-graph JSON for the graph panel "
                                                   "(repeat for several)"),
        **options: Any,
    ) -> None:
        """Serve a local page to steer the model and look at its image tokens; prints its URL, Ctrl-C stops it.

        Needs vlens's `explore` extra (fastapi, uvicorn, python-multipart).
        """
        from .toy.data import all_words

        _positive("n-train", n_train)
        _positive("n-pool", n_pool)
        m = ModelChoice.pop(options)
        if sae is not None and not sae.exists():
            raise InputError(f"no SAE at {sae}: pass a directory written by vlens.sae.export (or vlens train-sae)")
        for g in graph or ():
            if not g.is_file():
                raise InputError(f"no graph file {g}: pass a graph JSON (circuit-tracer's create_graph_files format)")
        plain = not (m.sizes or m.weights or m.device or m.dtype or m.seed)  # the explorer builds it (its snippets)
        model = m.model if plain else m.load(words=all_words())
        explore(model, sae=None if sae is None else str(sae), host=host, port=port, open_browser=open_browser,
                n_train=n_train, n_pool=n_pool, graphs=[str(g) for g in graph or ()])

    return run_explore


app.command("explore")(_explore_command())
