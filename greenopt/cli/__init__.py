"""greenopt's command line: parse -> call one library verb -> render -> exit code.

One thin file per command group (``measure``: fetch, env, measure; ``search``: search, worker;
``ship``: apply, export, verify, label, recipe) over ``common``; only this file imports them.

Errors caused by input or environment print one line (``greenopt: error: ...``) and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from pydantic import ValidationError

from greenopt._version import __version__
from greenopt.cli import measure, search, ship
from greenopt.errors import GreenoptError

#: The command files, in help order; each has ``add_parsers(sub)`` and ``HANDLERS``.
COMMANDS = (measure, search, ship)

def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("torchao", "torch.utils._pytree", "lm-eval", "lm_eval", "transformers",
                  "datasets", "optuna", "accelerate", "bitsandbytes", "hqq"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # Only the libraries' own chatter; a user's (or greenopt's) warnings still show.
    for lib in ("torch", "torchao", "transformers", "lm_eval", "datasets", "optuna", "accelerate",
                "bitsandbytes", "hqq", "huggingface_hub", "optimum"):
        warnings.filterwarnings("ignore", module=rf"{lib}(\.|$)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="greenopt", description="Find the most accurate compressed LM variant that reaches an energy label. "
        "Every figure is measured and says how (tier M1/M2/E1, device, protocol).")
    parser.add_argument("--version", action="version", version=f"greenopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for room in COMMANDS:
        room.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``greenopt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)

    handlers = {name: fn for room in COMMANDS for name, fn in room.HANDLERS.items()}
    try:
        return int(handlers[args.command](args) or 0)
    except GreenoptError as e:
        print(f"greenopt: error: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        print(f"greenopt: error: {where}: {err['msg']}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("greenopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
