"""``nup`` command line: one sub-command per module, each with ``add_arguments`` and ``main``."""

from __future__ import annotations

import argparse
import importlib
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "train": ("nup.train", "train a νP MLP and write metrics, a summary and plots"),
    "sweep": ("nup.sweep", "run a resumable grid of training runs from a TOML config"),
    "report": ("nup.report", "render a run or sweep directory as Markdown and HTML"),
    "study": ("nup.studies", "run one of the studies (depth transfer, coord check, catapult, ...)"),
    "bench": ("nup.bench", "run a benchmark suite and write JSON/CSV/Markdown/PNG results"),
    "baseline": ("nup.baseline", "fit a plain baseline (scikit-learn MLP/Adam or logistic regression) on the digits"),
    "plan": ("nup.plan", "the memory a configuration needs per path, and whether it fits one GPU or how many"),
}


class CLIError(Exception):
    """An error the user can fix; printed as one line, never a traceback."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``nup`` parser; only ``command``'s module is imported (the others stay unloaded)."""
    from nup import __version__

    parser = argparse.ArgumentParser(
        prog="nup", description="νP: deep MLPs at the Edge of Chaos, with update geometry."
    )
    parser.add_argument("--version", action="version", version=f"nup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip())
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except (CLIError, ValueError, OSError) as err:
        print(f"nup {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nup {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
