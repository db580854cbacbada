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


# ---------------------------------------------------------------------------------------------------------- verbs

@verb("prepare", "data:prepare_cli", "Tokenize a corpus into train.bin / val.bin / tokenizer.json / meta.json.",
      "lmforge prepare shakespeare --tokenizer char --out data/shakespeare-char")
def _prepare_args(p):
    p.add_argument("source", help="a text file, a folder of .txt, a URL, a .jsonl of prompt/completion pairs, "
                                  "or the built-in 'shakespeare'")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--tokenizer", default="char", help="char | bpe:VOCAB (e.g. bpe:8192) | gpt2 (default: char)")
    p.add_argument("--tokenizer-from", help="reuse the tokenizer of a run or data directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out for validation (default 0.1)")
    p.add_argument("--split", default="auto", choices=["auto", "documents", "tail"],
                   help="hold out whole documents or the tail of the token stream (auto: documents when there are "
                        "enough of them)")
    p.add_argument("--errors", default="strict", choices=["strict", "replace"], help="on invalid UTF-8")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
