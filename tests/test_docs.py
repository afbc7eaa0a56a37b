"""Every code block of README.md and docs/**/*.md works as written.

- Each ```python block runs, exactly as written, on its own: a fresh namespace, a fresh temporary
  working directory, torch seeded with 0. No block depends on another and none can opt out.
- The one substitution: a block may name a hub checkpoint of ``HUB_CHECKPOINTS`` (e.g.
  ``ChameleonForConditionalGeneration.from_pretrained("leloy/Anole-7b-v0.1-hf")``). Its working
  directory then holds a directory of that name with a tiny random checkpoint of the same family
  (``tests/tiny_models.py``: built offline, the real id layout, a processor), and every
  ``from_pretrained`` (transformers, PEFT) loads it, as a local directory goes before the hub.
  Nothing is downloaded; nothing else is patched. A run's adapters directory that the block reloads
  (``"runs/NAME/adapters/METHOD"``, what an earlier ``mode-train`` command line of the document writes)
  then holds fresh MoDE adapters of that tiny checkpoint, saved with ``mode.save_adapter``.
- Each ``mode-train`` / ``mode-prepare`` command line of a ```bash (sh, shell, console) block, also
  as ``python -m mode.train`` or under ``torchrun``, is parsed by the real command line (the config
  it builds is checked too; a ``--config`` file is not read). Nothing runs. ``...`` stands for the
  rest of a command line: it is dropped, and ``--output`` supplied when missing.

tests/conftest.py prints how many blocks ran and how many command lines were parsed.
"""
from __future__ import annotations

import functools
import re
import shlex
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

# hub id -> the tiny_models kind that stands for it
HUB_CHECKPOINTS = {
    "facebook/chameleon-7b": "chameleon",
    "facebook/chameleon-30b": "chameleon",
    "leloy/Anole-7b-v0.1-hf": "chameleon",
    "BAAI/Emu3-Gen-hf": "emu3",
    "BAAI/Emu3-Chat-hf": "emu3",
}

SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(langs: set[str]) -> list[Block]:
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m["lang"] in langs:
                line = text.count("\n", 0, m.start()) + 1
                found.append(Block(path, line, m["lang"], textwrap.dedent(m["body"])))
    return found


PYTHON_BLOCKS = blocks({"python", "py"})


# ---- the one substitution: hub ids -> tiny local checkpoints -------------------------------------

@functools.cache
def _tiny_checkpoint(kind: str, root: Path) -> Path:
    import tiny_models

    return tiny_models.save_tiny_checkpoint(kind, root / kind)


def _hub_ids_as_tiny_checkpoints(code: str, cwd: Path, root: Path) -> None:
    """``from_pretrained`` takes a local directory before the hub: each hub id the block names becomes a
    directory of that name in its working directory, holding the tiny checkpoint."""
    for hub_id, kind in HUB_CHECKPOINTS.items():
        if hub_id in code:
            (cwd / hub_id).parent.mkdir(parents=True, exist_ok=True)
            (cwd / hub_id).symlink_to(_tiny_checkpoint(kind, root), target_is_directory=True)


RUN_ADAPTERS = re.compile(r"[\"'](runs/[\w.-]+/adapters/[\w.-]+)[\"']")


def _run_adapters(code: str, cwd: Path) -> None:
    """The adapters a block reloads from a run's output, as ``mode-train`` writes them, on the tiny checkpoint
    that stands for the block's hub id."""
    paths = RUN_ADAPTERS.findall(code)
    if not paths:
        return
    import tiny_models

    import mode
    from mode.families import family_of

    [kind] = {kind for hub_id, kind in HUB_CHECKPOINTS.items() if hub_id in code}
    for path in paths:
        model = tiny_models.tiny_model(kind)
        model = mode.apply_mode(model, mode.MoDEConfig(modality=family_of(model).modality_spec(model)))
        mode.save_adapter(model, cwd / path)


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.id for b in PYTHON_BLOCKS])
def test_python_block_runs_as_written(block, tmp_path, monkeypatch, tmp_path_factory):
    _hub_ids_as_tiny_checkpoints(block.code, tmp_path, tmp_path_factory.getbasetemp() / "tiny-hub")
    _run_adapters(block.code, tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(block.code, f"{block.id} (the ```python block)", "exec"), {"__name__": "__main__"})


# ---- shell blocks: the command lines of mode-train and mode-prepare ------------------------------

@dataclass(frozen=True)
class CommandLine:
    block: Block
    line: int
    program: str  # "mode-train" or "mode-prepare"
    argv: tuple[str, ...]
    elided: bool  # held "..."

    @property
    def id(self) -> str:
        return f"{self.block.path.relative_to(REPO)}:{self.line}"


_PROGRAMS = {"mode-train": "mode-train", "mode.train": "mode-train", "mode-prepare": "mode-prepare",
             "mode.workloads.hf_model.prepare": "mode-prepare"}


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """The program a command runs and its arguments: ``mode-train ...``, ``python -m mode.train ...``,
    ``torchrun [its options] -m mode.train ...``."""
    if not words:
        return None
    if words[0] in ("mode-train", "mode-prepare"):
        return _PROGRAMS[words[0]], words[1:]
    if "-m" in words and (Path(words[0]).name.startswith("python") or words[0] == "torchrun"):
        module_at = words.index("-m") + 1
        if module_at < len(words) and words[module_at] in _PROGRAMS:
            return _PROGRAMS[words[module_at]], words[module_at + 1:]
    return None


_OPERATORS = {"&&", "||", ";", "|", "&"}


def _commands(text: str) -> list[list[str]]:
    """The words of each command of a shell line, comments dropped, split at ``&&``, ``||``, ``;``, ``|``, ``&``
    outside quotes."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands = [[]]
    for token in lexer:
        if token in _OPERATORS:
            commands.append([])
        else:
            commands[-1].append(token)
    return commands


def command_lines() -> list[CommandLine]:
    found = []
    for block in blocks(SHELL):
        logical, start = "", None
        for offset, raw in enumerate(block.code.splitlines(), start=1):
            if start is None:
                start = block.line + offset
            if raw.rstrip().endswith("\\"):
                logical += raw.rstrip()[:-1] + " "
                continue
            logical += raw
            text = logical[2:] if logical.startswith("$ ") else logical  # a console prompt
            for words in _commands(text):
                hit = _program(words)
                if hit:
                    program, argv = hit
                    found.append(CommandLine(block, start, program, tuple(a for a in argv if a != "..."),
                                             "..." in argv))
            logical, start = "", None
    return found


COMMAND_LINES = command_lines()


def _parse(command: CommandLine) -> None:
    argv = list(command.argv)
    if command.program == "mode-prepare":
        from mode.workloads.hf_model import prepare

        prepare.parse_args(argv)
        return
    from mode.train import cli

    if command.elided and "--output" not in argv:
        argv += ["--output", "out"]
    cli.parse_args(argv)


@pytest.mark.parametrize("command", COMMAND_LINES, ids=[c.id for c in COMMAND_LINES])
def test_command_line_parses(command, monkeypatch, capsys):
    from mode.train import cli

    monkeypatch.setattr(cli, "read_config_file", lambda path: {})  # a --config file the docs only name
    try:
        _parse(command)
    except SystemExit as exit_:
        if exit_.code == 0:  # --help
            return
        pytest.fail(f"{command.program} {shlex.join(command.argv)}\n-> exit {exit_.code}: {capsys.readouterr().err}")


def test_the_documents_hold_blocks_to_run_and_command_lines_to_parse():
    print(f"\n{len(PYTHON_BLOCKS)} python blocks, {len(COMMAND_LINES)} mode-train/mode-prepare command lines "
          f"in {len(DOCUMENTS)} documents")
    assert PYTHON_BLOCKS and COMMAND_LINES
