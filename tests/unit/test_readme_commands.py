"""Every command the README shows is run by a test or by the demo, and docs/readme-commands.md says which.

The README's commands are its ```sh blocks (comments dropped, continuation lines joined, `a ; b` split)
and the whole commands quoted inline (`make clean`, `hwledger fleet remove NAME`, ...). The page must list
exactly those, each with the tests (`tests/...py::name`, which must exist) or the demo step that runs it.
The `hwledger` ones are also parsed here by the real command-line parser, so a renamed option fails at once.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from hwledger.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
PAGE = REPO / "docs" / "readme-commands.md"
# Inline commands: a program of ours (or one the README tells people to run) and at least one argument.
INLINE = re.compile(r"`((?:hwledger (?:fleet|job|gpu|run) \w|hwledger --help|make [a-z]|"
                    r"ansible-(?:doc|galaxy|inventory|playbook|test|lint) -{0,2}\w|ansible all |"
                    r"pip (?:un)?install |journalctl |\. \.\w+/)[^`]*)`")
# Left unrun, and the page says why: a system tool that needs a systemd user session, and the benchmark.
NOT_RUN = {"journalctl --user -u hwledger-serve", "make bench"}
ROW = re.compile(r"^\| `(.+)` \| (.+) \|$")
REF = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def readme_section(heading: str) -> str:
    """The README's text from the line starting with `heading` to the next `## ` heading."""
    text = README.read_text(encoding="utf-8")
    start = text.index("\n" + heading) + 1
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def readme_commands(text: str | None = None, *, inline: bool = True) -> list[str]:
    """The commands of `text` (default: the whole README), in order, each once, whitespace normalised;
    with inline=False those of its ```sh blocks only."""
    text = README.read_text(encoding="utf-8") if text is None else text
    found: list[str] = []
    in_sh, pending = False, ""  # in a ```sh block; a line ending in a backslash so far
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            in_sh = in_fence and line.strip() == "```sh"
            continue
        if in_sh:
            code = re.split(r"\s{2,}# ", line, maxsplit=1)[0].rstrip()
            if not code.strip() or code.lstrip().startswith("#"):
                continue
            if code.endswith("\\"):
                pending += code[:-1]
                continue
            found += (pending + code).split(" ; ")
            pending = ""
        elif inline and not in_fence:  # a transcript's output is not a command to run
            found += [match.group(1) for match in INLINE.finditer(line)]
    commands: list[str] = []
    for command in (" ".join(part.split()) for part in found):
        if command not in commands:
            commands.append(command)
    return commands


def page_rows() -> dict[str, str]:
    rows = {}
    for line in PAGE.read_text(encoding="utf-8").splitlines():
        match = ROW.match(line)
        if match:
            command = match.group(1).replace("\\|", "|")
            assert command not in rows, f"{command}: listed twice"
            rows[command] = match.group(2)
    return rows


def test_the_page_lists_exactly_the_readmes_commands():
    commands, rows = readme_commands(), page_rows()
    assert [c for c in commands if c not in rows] == [], "README commands the page does not cover"
    assert [c for c in rows if c not in commands] == [], "page rows for commands the README no longer has"


@pytest.mark.parametrize("command", readme_commands())
def test_each_command_names_what_runs_it_and_that_exists(command):
    cover = page_rows().get(command, "")
    refs = REF.findall(cover)
    if cover.startswith("not run:"):
        assert command in NOT_RUN, f"{command}: only {sorted(NOT_RUN)} may be left unrun, each saying why"
    else:
        assert refs or cover.startswith(("CI:", "bootstrap:")), f"{command}: names no test and no demo step"
    assert cover.count(".py::") == len(refs), f"{command}: a test named without `tests/...py::name`"
    missing = [f"{path}::{name}" for path, name in refs
               if not (REPO / path).is_file() or f"def {name}(" not in (REPO / path).read_text(encoding="utf-8")]
    assert missing == [], f"{command}: no such test"


@pytest.mark.parametrize("command", [c for c in readme_commands() if c.startswith("hwledger ")])
def test_hwledger_commands_parse_as_written(command):
    """Usage notation (`[--jobs-older-than 30d]`) is read as the options it shows; a redirect is the shell's."""
    words = shlex.split(command.split(" > ")[0].replace("[", "").replace("]", ""))[1:]
    if words == ["--help"]:
        return  # argparse exits after printing; the integration test runs it
    args = build_parser().parse_args(words)
    assert callable(getattr(args, "func", None)), command
