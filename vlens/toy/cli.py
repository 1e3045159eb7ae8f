"""Command line of the toy model: `vlens toy train|eval|samples` (and `python -m vlens.toy ...`).

`main(argv)` dispatches on the first word; `train_main`, `eval_main` and
`samples_main` take the rest of the arguments.
"""

from __future__ import annotations

from typing import Sequence

from .train import eval_main, main as train_main

USAGE = """usage: vlens toy {train,eval,samples} [options]

  train    train the toy LLaVA-Next on CPU (resumable: rerun to continue)
  eval     score "What is shown in this image?" on held-out images; last line `accuracy: 0.97`
  samples  write sample toy images and their captions (PNG + Markdown)

`vlens toy COMMAND --help` lists the options."""


def samples_main(argv: Sequence[str] | None = None) -> int:
    """`vlens toy samples [--out DIR] [--n 10]`: write sample images; print their Markdown captions table."""
    import argparse

    from .samples import samples_table, write_samples

    p = argparse.ArgumentParser(prog="vlens toy samples", description="Write sample toy images with captions.")
    p.add_argument("--out", default="docs/assets/toy", help="output folder (default docs/assets/toy)")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--split", default="heldout")
    a = p.parse_args(argv)
    paths = write_samples(a.out, n=a.n, split=a.split)
    print(f"wrote {len(paths)} images to {a.out}; their Markdown table (links relative to docs/):\n")
    print(samples_table(n=a.n, split=a.split))
    return 0


COMMANDS = {"train": train_main, "eval": eval_main, "samples": samples_main}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch `train`, `eval` or `samples` with the remaining arguments."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(USAGE)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])
