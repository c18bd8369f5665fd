"""greenopt's command line: parse -> call one library verb -> render -> exit code.

One thin file per command group (``measure``: fetch, env, measure; ``calibrate``; ``search``: search, worker;
``ship``: apply, export, verify, label, recipe) over ``common``; only this file imports them.

Errors caused by input or environment print one line (``greenopt: error: ...``) and exit 1;
a usage error (a bad flag or value) prints one such line and exits 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from typing import NoReturn

from pydantic import ValidationError

from greenopt._version import __version__
from greenopt.cli import calibrate, measure, search, ship
from greenopt.errors import GreenoptError

#: The command files, in help order; each has ``add_parsers(sub)`` and ``HANDLERS``.
COMMANDS = (measure, calibrate, search, ship)


class _Parser(argparse.ArgumentParser):
    """argparse with greenopt's one-line usage errors; subcommand parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"greenopt: error: {message}; see {self.prog} --help\n")


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
    parser = _Parser(
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
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (its one line already printed)
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)

    handlers = {name: fn for room in COMMANDS for name, fn in room.HANDLERS.items()}
    try:
        return int(handlers[args.command](args) or 0)
    except GreenoptError as e:
        return _fail(str(e))
    except ValidationError as e:
        err = e.errors()[0]
        return _fail(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}")
    except OSError as e:  # last resort: a path the checks did not foresee (permissions, disk full, a file)
        return _fail(_os_error(e))
    except KeyboardInterrupt:
        print("greenopt: interrupted", file=sys.stderr)
        return 130


def _fail(message: str) -> int:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    print(f"greenopt: error: {one_line}", file=sys.stderr)
    return 1


def _os_error(e: OSError) -> str:
    what = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return what
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    return f"{where}: {what}"


if __name__ == "__main__":
    sys.exit(main())
