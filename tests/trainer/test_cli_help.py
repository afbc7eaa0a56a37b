"""The --help of mode-train and mode-prepare: the whole description with its examples, each default
once, help for every flag, and mode-prepare's record formats."""
import re

import pytest

from mode.train import cli
from mode.workloads.hf_model import prepare


def _help(parse_args, capsys) -> str:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    return capsys.readouterr().out


def _options(help_text: str) -> dict[str, str]:
    """Each option's help (wrapped lines joined), by its first flag."""
    body = help_text.split("\noptions:\n", 1)[1]
    entries = re.split(r"\n  (?=-)", body)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries if entry.startswith("-")}


def test_mode_train_help_has_the_whole_description_its_examples_and_each_default_once(capsys):
    text = _help(cli.parse_args, capsys)
    assert "on a\nsequence of understanding tasks" in text  # the description is not cut at its first line
    assert "mode-train --benchmark digits --methods mode,lora --output runs/digits" in text
    assert "    mode-train --model /ckpt/anole-7b-hf" in text  # the examples keep their layout
    options = _options(text)
    assert "--benchmark" in options and "--kd-lambda" in options
    for entry in options.values():
        assert entry.lower().count("default") <= 1, entry
    assert "(default: 0.3)" in options["--kd-lambda"]
    assert "(default: None)" not in text


def test_mode_prepare_help_documents_every_flag_its_default_and_the_record_formats(capsys):
    text = _help(prepare.parse_args, capsys)
    options = _options(text)
    for flag, entry in options.items():
        assert len(entry.split()) > 2, f"{flag} has no help"
        assert entry.lower().count("default") <= 1, entry
    for flag, default in (("--batch-size", "8"), ("--on-bad-record", "refuse"), ("--template", "{image}{question}"),
                          ("--ratio", "1:1"), ("--device", "cpu")):
        assert f"(default: {default})" in options[flag], flag
    assert '{"image": "img/1.png", "question": "What color is it?", "answer": "red"' in text
    assert '{"caption": "a red square", "image": "img/2.png"}' in text
