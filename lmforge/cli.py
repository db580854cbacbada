"""`lmforge <verb>`: a table from verbs to functions; each verb's module is imported only when that verb runs.

User mistakes (bad paths, bad values) end as one line on stderr and exit status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# verb -> (module:function, one-line help, example)
VERBS: dict[str, tuple[str, str, str]] = {}
BUILDERS: dict[str, callable] = {}  # verb -> function adding its arguments to a parser


def verb(name: str, target: str, help: str, example: str):
    """Register a verb. The builder adds its arguments; the target runs it with the parsed namespace."""
    def register(build):
        VERBS[name] = (target, help, example)
        BUILDERS[name] = build
        return build
    return register


class UserError(Exception):
    """A mistake in what the user asked for: shown as one line, never as a traceback."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="lmforge", description="From raw text to a trained, served generative language model.",
        epilog="Run `lmforge VERB --help` for a verb's options and an example.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    for name, (_, help_text, example) in VERBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        BUILDERS[name](p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb is None:
        parser.print_help()
        return 0
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    module_name, function_name = VERBS[args.verb][0].split(":")
    handler = getattr(import_module(f"lmforge.{module_name}"), function_name)
    try:
        result = handler(args)
    except (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lmforge {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.verb}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)
