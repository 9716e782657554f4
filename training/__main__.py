"""`python -m training COMMAND ...` (or `soap-train COMMAND ...`): train, evaluate, import-reference.

Each command lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from models import __version__

COMMANDS = {
    "train": ("training.train", "train a SOAP model or a baseline from a preset"),
    "evaluate": ("training.evaluate", "attack and evaluate a checkpoint; write tables and figures"),
    "soundness": ("training.soundness", "SmoothAdv against certified radii: a check that certificates hold"),
    "published-certify": (
        "training.published_certify",
        "certified accuracy of published MNIST smoothing baselines, from the authors' released logs",
    ),
    "compare-certify": (
        "training.compare_certify",
        "two certification logs of the same images compared image by image (McNemar, ACR difference)",
    ),
    "ensemble": ("training.ensemble", "join trained checkpoints into one ensemble checkpoint (mean of logits)"),
    "import-reference": ("training.import_reference", "convert the authors' checkpoint into our format"),
}


def main(argv: list[str] | None = None) -> int:
    prog = "python -m training" if os.path.basename(sys.argv[0]) == "__main__.py" else os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s (soap-serving) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return modules[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
