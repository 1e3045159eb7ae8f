"""The `vlens` command line: `vlens demo`, `vlens toy train|eval`, `vlens harvest`, `vlens train-sae`, `vlens export`.

Each subcommand is a thin shell over a library function; `python -m vlens`
is the same program (so `torchrun -m vlens harvest ...` works).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _lazy(module: str, func: str) -> Callable[[Sequence[str]], int | None]:
    def run(argv: Sequence[str]) -> int | None:
        import importlib

        return getattr(importlib.import_module(module), func)(list(argv))

    return run


#: subcommand -> (one-line help, runner taking the remaining argv)
COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int | None]]] = {
    "demo": ("run every experiment of the paper on the toy model and write an HTML report", _lazy("vlens.demo", "main")),
    "toy": ("train or evaluate the embedded toy LLaVA-Next: `vlens toy train|eval`", _lazy("vlens.toy.__main__", "main")),
    "harvest": ("harvest residual activations to an on-disk store", _lazy("vlens.harvest", "main")),
    "train-sae": ("train a multimodal SAE on a harvested store", _lazy("vlens.sae.train", "main")),
    "export": ("export or convert an SAE to SAE-Lens's disk format", _lazy("vlens.sae.export", "main")),
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vlens` command.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="vlens",
        description="vlens: interpretability for vision-language models (LLaVA-Next).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<10} {v[0]}" for k, v in COMMANDS.items())
        + "\n\n`vlens COMMAND --help` describes each.",
    )
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="command")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
    code = COMMANDS[argv[0]][1](argv[1:])
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
