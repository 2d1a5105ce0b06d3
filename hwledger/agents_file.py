"""Editing `ssh-agents.toml` in place: append an `[[agents]]` block, remove one, keep everything else.

The file is the user's: its comments, order and formatting stay as they are. Every edit is checked by
parsing the whole resulting text with the agents schema (`agents.parse_agents_toml`) and comparing the
agents it yields with what the edit should give, before the file is replaced atomically (temp file in
the same directory, fsync, rename) with mode 0600, under a lock beside the file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ansible_collections.hwledger.fleet.plugins.plugin_utils import agents as agents_schema
from ansible_collections.hwledger.fleet.plugins.plugin_utils import private_files

from hwledger.errors import UserError

# A header line that is only the [[agents]] header (and maybe a comment): the schema's pattern, anchored
# at the end too, so a block is never cut at a line that merely starts like one.
_AGENTS_HEADER = re.compile(agents_schema.AGENTS_HEADER_RE.pattern + r"""\s*(?:#.*)?$""")
_SUB_TABLE_HEADER = re.compile(r"""^\s*\[\s*(?:agents|"agents"|'agents')\s*\.""")
_ANY_HEADER = re.compile(r"^\s*\[")
_COMMENT_OR_BLANK = re.compile(r"^\s*(?:#.*)?$")
_COMMENT = re.compile(r"^\s*#")

NEW_FILE_HEADER = (
    "# hwledger agents: one [[agents]] block per GPU host (see `hwledger fleet register-ssh --help`).\n"
    "# Comments and order are kept when hwledger adds or removes an agent.\n"
)


@dataclass(frozen=True)
class Block:
    start: int  # first line (0-based), comments attached directly above the header included
    end: int    # one past the last line
    header: int


def read_agents(path: Path, *, missing_ok: bool = True) -> list[agents_schema.Agent]:
    """The agents in the file; schema errors become UserError.

    A missing file is [] for the commands that create it (`register-ssh` writes the first agent); the
    server passes `missing_ok=False`: for it a vanished file is an error, never "every agent was removed".
    """
    if not path.exists():
        if missing_ok:
            return []
        raise UserError(f"the agents file {path} does not exist (moved or deleted?); restore it, or point "
                        "--config / HWLEDGER_CONFIG at it (`hwledger fleet register-ssh` creates it)")
    try:
        found, _warnings = agents_schema.load_agents_file(str(path))
    except agents_schema.AgentsFileError as exc:
        raise UserError(str(exc)) from None
    return found


def _parse(text: str, source: str) -> list[agents_schema.Agent]:
    try:
        found, _warnings = agents_schema.parse_agents_toml(text, source)
    except agents_schema.AgentsFileError as exc:
        raise UserError(str(exc)) from None
    return found


def agent_blocks(lines: list[str]) -> list[Block]:
    """The line span of each `[[agents]]` block, in file order.

    A block runs from its header to the next header that is not one of its own sub-tables
    (`[agents.bastion]`); comment and blank lines at its end belong to what follows (next table or EOF),
    and comment lines directly above a header (no blank line between) belong to that header's block.
    """
    headers = [i for i, line in enumerate(lines) if _AGENTS_HEADER.match(line)]
    blocks = []
    for header in headers:
        end = header + 1
        while end < len(lines):
            line = lines[end]
            if _AGENTS_HEADER.match(line) or (_ANY_HEADER.match(line) and not _SUB_TABLE_HEADER.match(line)):
                break
            end += 1
        # Trailing comment and blank lines belong to what follows (the next table, or the file's end).
        while end > header + 1 and _COMMENT_OR_BLANK.match(lines[end - 1]):
            end -= 1
        start = header
        while start > 0 and _COMMENT.match(lines[start - 1]):
            start -= 1
        blocks.append(Block(start, end, header))
    return blocks


def append_agent(path: Path, agent: agents_schema.Agent, *, replace: bool = False) -> None:
    """Append the agent's block (replacing an agent of that name first when `replace`)."""
    block = agents_schema.render_agent_toml(agent)
    with private_files.locked_beside(path):
        text = path.read_text() if path.exists() else NEW_FILE_HEADER
        before = _parse(text, str(path)) if path.exists() else []
        names = [a.name for a in before]
        if agent.name in names:
            if not replace:
                raise UserError(f"{path}: an agent named {agent.name!r} is already registered; choose another "
                                f"--name, or re-register it with --replace (or `hwledger fleet remove {agent.name}`)")
            text = _remove_block(text, agent.name, str(path))
            before = [a for a in before if a.name != agent.name]
        if text and not text.endswith("\n"):
            text += "\n"
        new_text = text + ("\n" if text.strip() else "") + block
        after = _parse(new_text, str(path))
        if after != [*before, agent]:
            raise UserError(f"{path}: appending the agent would not give the expected agents (the file's layout "
                            "confuses hwledger); add this block by hand:\n" + block)
        _write(path, new_text)


def remove_agent(path: Path, name: str) -> bool:
    """Remove the agent's block. False when the file has no such agent."""
    with private_files.locked_beside(path):
        if not path.exists():
            return False
        text = path.read_text()
        before = _parse(text, str(path))
        if name not in [a.name for a in before]:
            return False
        new_text = _remove_block(text, name, str(path))
        after = _parse(new_text, str(path))
        if after != [a for a in before if a.name != name]:
            raise UserError(f"{path}: could not remove agent {name!r} automatically without touching other "
                            "agents; delete its [[agents]] block by hand")
        _write(path, new_text)
        return True


def _remove_block(text: str, name: str, source: str) -> str:
    lines = text.splitlines(keepends=True)
    plain = [line.rstrip("\r\n") for line in lines]
    for block in agent_blocks(plain):
        block_text = "".join(lines[block.header:block.end])
        try:
            found = agents_schema.parse_agents_toml(block_text, source)[0]
        except agents_schema.AgentsFileError:
            continue
        if len(found) == 1 and found[0].name == name:
            kept = lines[:block.start] + lines[block.end:]
            # Collapse the blank lines the removal leaves behind into one.
            if block.start < len(kept) and block.start > 0 and not kept[block.start - 1].strip():
                while block.start < len(kept) and not kept[block.start].strip():
                    del kept[block.start]
            return "".join(kept)
    raise UserError(f"{source}: cannot find the [[agents]] block of {name!r} line by line (inline or unusual "
                    "layout); delete it by hand")


def _write(path: Path, text: str) -> None:
    try:
        private_files.write_atomically(path, text.encode("utf-8"))
    except private_files.PrivatePathError as exc:
        raise UserError(str(exc)) from None


def ensure_config_dir(path: Path) -> None:
    """The directory of the agents file (and of the pinned host keys): created 0700, refused when others
    can write to it (they could replace the file, and so choose which commands hwledger runs)."""
    try:
        private_files.ensure_private_dir(path.parent, "the config directory",
                                         harm=f"replace {path.name} and so choose the hosts and commands hwledger runs")
    except private_files.PrivatePathError as exc:
        raise UserError(str(exc)) from None
