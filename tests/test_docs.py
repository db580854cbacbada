"""The README and docs/ say only what is so: every `lmforge ...` command they show parses with the real command line
(its verb, its options, its --field=value overrides), every `python benchmarks/...` script exists with the options
shown, every Python block parses, and every file path and link they name exists."""

import ast
import re
import shlex
from pathlib import Path

import pytest

from lmforge.cli import build_parser
from lmforge.config import TrainConfig, parse_overrides

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.S)
INLINE = re.compile(r"`([^`\n]+)`")
PATH = re.compile(r"(?<![\w./~-])((?:lmforge|benchmarks|configs|tests|docs|\.ci)/[\w./*-]*[\w/*])")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def commands() -> list[tuple[str, str]]:
    """(doc, command line) for every lmforge / python benchmarks command in a shell block or an inline span."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        lines = [line for lang, body in FENCE.findall(text) if lang in ("bash", "sh", "") for line in body.splitlines()]
        # inline spans that are commands (a verb and its arguments, not a verb named alone or an error message)
        lines += [s for s in INLINE.findall(FENCE.sub("", text)) if len(s.split()) > 2 and ": error:" not in s]
        for line in lines:
            line = line.strip()
            if line.startswith(("lmforge ", "python -m lmforge ", "python benchmarks/", "torchrun ")):
                found.append((doc.name, line))
    return found


def test_the_docs_show_commands_and_name_paths():
    assert len(DOCS) >= 8 and len(commands()) >= 40


def test_the_readme_is_a_front_door():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250 and "make demo" in text and "make test" in text
    assert all(f"docs/{d.name}" in text for d in DOCS[1:])


@pytest.mark.parametrize("doc,line", commands(), ids=[f"{d}: {c[:70]}" for d, c in commands()])
def test_every_command_shown_parses(doc, line):
    argv = shlex.split(line, comments=True)
    if argv[0] == "torchrun":
        argv = argv[argv.index("lmforge") + 1:] if "lmforge" in argv else argv
        assert argv[0] != "torchrun", f"{doc}: {line}: torchrun without -m lmforge"
    elif argv[0] == "python" and argv[1] == "-m":
        argv = argv[3:]
    elif argv[0] == "python":
        script = ROOT / argv[1]
        assert script.is_file(), f"{doc}: {line}: no {argv[1]}"
        source = script.read_text()
        for option in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
            assert f'"{option}"' in source, f"{doc}: {line}: {argv[1]} takes no {option}"
        return
    else:
        argv = argv[1:]
    args, extra = build_parser().parse_known_args(argv)  # a mistake raises UserError, with the message
    if getattr(args, "accepts_overrides", False):
        TrainConfig().with_overrides(parse_overrides(extra))  # every --field=value names a real field
        if getattr(args, "config", None):
            assert (ROOT / args.config).is_file(), f"{doc}: {line}: no {args.config}"
    else:
        assert not extra, f"{doc}: {line}: unrecognized {extra}"


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_python_block_parses(doc):
    for lang, body in FENCE.findall(doc.read_text()):
        if lang == "python":
            ast.parse(body)


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_path_and_link_named_exists(doc):
    text = doc.read_text()
    missing = []
    for path in set(PATH.findall(text)):
        if not (list(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()):
            missing.append(path)
    for link in set(LINK.findall(text)):
        if not link.startswith(("http://", "https://")) and not (doc.parent / link).exists():
            missing.append(link)
    assert not missing, f"{doc.name} names what is not there: {sorted(missing)}"
