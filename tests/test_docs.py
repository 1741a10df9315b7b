"""README.md and docs/: every relative link resolves, and every `distfd ...` command line in a code
block parses with the current command line (argparse only: nothing loads, nothing runs)."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from distfd.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w+-]*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
LAUNCHERS = {"srun", "mpirun", "mpiexec", "env", "exec", "time", "nohup"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# Placeholders a page may use for a value; each stands for something the option accepts.
PLACEHOLDERS = {"N": "1", "K": "2", "H": "512", "W": "512", "I/N": "0/2"}


def split_blocks(text: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The text outside fenced code blocks, and each block as (language, lines)."""
    prose, blocks, lang, lines = [], [], None, []
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if lang is None and m:
            lang, lines = m.group(1).lower(), []
        elif lang is not None and line.strip() == "```":
            blocks.append((lang, lines))
            lang = None
        elif lang is not None:
            lines.append(line)
        else:
            prose.append(line)
    return "\n".join(prose), blocks


def relative_links(text: str, anchors: bool = False) -> list[str]:
    """Link and image targets outside code (fenced blocks and `inline code`), http(s) and mailto left
    out; without their `#anchor` unless asked."""
    prose, _ = split_blocks(text)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    targets = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        targets.append(target if anchors else target.split("#", 1)[0])
    return targets


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    prose, _ = split_blocks(text)
    return {
        re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        for m in re.finditer(r"^#{1,6} +(.+?) *#*$", prose, re.MULTILINE)
    }


def shell_lines(lines: list[str]) -> list[str]:
    """Logical lines of a shell block: `\\` continuations and quotes over several lines joined, a
    console's `$ ` prompt dropped."""
    out, pending = [], ""
    for line in lines:
        line = line.rstrip()
        if line.startswith("$ "):
            line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        if _open_quote(pending + line):
            pending += line + "\n"
            continue
        out.append(pending + line)
        pending = ""
    if pending:
        out.append(pending)
    return out


def _open_quote(text: str) -> bool:
    try:
        shlex.split(text, comments=True)
    except ValueError:  # "No closing quotation": the quote goes on in the next line
        return True
    return False


def distfd_argvs(line: str) -> list[list[str]]:
    """The argument lists given to `distfd` in one shell line: `distfd ...`, `python -m distfd ...`,
    `torchrun ... -m distfd ...`, `srun ... distfd ...`, `deepspeed --module distfd ...`, also after `&&`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    tokens = list(lexer)  # `#` comments are dropped by the lexer
    commands, current = [], []
    for tok in tokens:
        if tok in OPERATORS:
            commands.append(current)
            current = []
        else:
            current.append(tok)
    commands.append(current)
    argvs = []
    for cmd in commands:
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):  # VAR=value before the program
            cmd = cmd[1:]
        for i, tok in enumerate(cmd):
            # distfd as the program, as a module (`-m distfd`), or started by a launcher (`srun ... distfd`)
            if tok == "distfd" and (i == 0 or cmd[i - 1] in ("-m", "--module") or cmd[0] in LAUNCHERS):
                argvs.append(cmd[i + 1 :])
                break
    return [[_fill(a) for a in argv] for argv in argvs]


def _fill(arg: str) -> str:
    """A placeholder (alone or in `--opt=VALUE`) replaced by a value of its kind; anything else kept."""
    if arg.startswith("-") and "=" in arg:
        name, value = arg.split("=", 1)
        return f"{name}={PLACEHOLDERS.get(value, value)}"
    return PLACEHOLDERS.get(arg, arg)


def parse_error(argv: list[str]) -> str | None:
    """None when the current CLI's argparse accepts argv (``--help`` included), else its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    return None


def commands_in(page: Path) -> list[tuple[str, list[str]]]:
    _, blocks = split_blocks(page.read_text())
    found = []
    for lang, lines in blocks:
        if lang not in SHELL_BLOCKS:
            continue
        for line in shell_lines(lines):
            found += [(line.strip(), argv) for argv in distfd_argvs(line)]
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_anchors_into_pages_exist(page):
    bad = []
    for target in relative_links(page.read_text(), anchors=True):
        path, _, anchor = target.partition("#")
        if anchor and path.endswith(".md") and (page.parent / path).exists():
            if anchor not in heading_anchors((page.parent / path).read_text()):
                bad.append(target)
    assert not bad, f"{page.relative_to(ROOT)} links to headings that do not exist: {bad}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_distfd_command_lines_parse(page):
    bad = [f"{line}\n    -> {err}" for line, argv in commands_in(page) if (err := parse_error(argv))]
    assert not bad, f"{page.relative_to(ROOT)}: command lines the CLI refuses:\n" + "\n".join(bad)


def test_the_pages_hold_commands_to_check():
    assert len(PAGES) >= 10
    counts = {str(p.relative_to(ROOT)): len(commands_in(p)) for p in PAGES}
    assert counts["README.md"] >= 4 and sum(counts.values()) >= 20, counts


def test_helpers_find_and_refuse_a_bad_line():
    block = [
        "pip install -e . && distfd generate --compare --out out.png   # a comment",
        "torchrun --nproc-per-node 2 -m distfd generate --prompt 'a b' \\",
        "  --no-such-flag 3 --out a.png",
        "srun python -m distfd --local_rank=N generate --ranks-per-image K",
        "ruff check distfd tests && OMP_NUM_THREADS=1 srun --ntasks 2 distfd serve --port 0",
    ]
    argvs = [argv for line in shell_lines(block) for argv in distfd_argvs(line)]
    assert argvs == [
        ["generate", "--compare", "--out", "out.png"],
        ["generate", "--prompt", "a b", "--no-such-flag", "3", "--out", "a.png"],
        ["--local_rank=1", "generate", "--ranks-per-image", "2"],
        ["serve", "--port", "0"],
    ]
    assert parse_error(argvs[0]) is None and parse_error(argvs[2]) is None
    assert "--no-such-flag" in parse_error(argvs[1])
    assert parse_error(["generate", "--scheduler", "no-such-scheduler"]) is not None
    assert parse_error(["generate", "--help"]) is None
    text = "[a](docs/x.md#part) ![b](img.png) [c](https://example.org) `[d](e.md)`\n```\n[f](g.md)\n```"
    assert relative_links(text) == ["docs/x.md", "img.png"]
    assert relative_links(text, anchors=True)[0] == "docs/x.md#part"
    assert heading_anchors("# Groups: many (`--ranks-per-image`)\n```\n# not a heading\n```") == {
        "groups-many---ranks-per-image"
    }
