"""mode-train's command line: generated from TrainConfig, with --config files the flags override."""
import dataclasses
import json

import pytest

from mode.train import cli
from mode.train.config import RunError, TrainConfig


def _parse(*argv):
    return cli.parse_args(["--output", "out", *argv])[0]


def test_every_config_field_is_a_flag_with_its_default_in_the_help(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for field in dataclasses.fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in help_text, field.name
    assert "(default: 0.3)" in help_text  # kd_lambda
    assert _parse() == TrainConfig()


def test_flags_reach_every_kind_of_field():
    config = _parse("--rank", "4", "--alpha", "8", "--kd-lambda", "0.5", "--kd-temperature", "1.5",
                    "--weight-decay", "0.01", "--warmup-fraction", "0.2", "--grad-clip", "1",
                    "--gen-temperature", "0.7", "--methods", "mode, lora,moelora", "--fsdp",
                    "--gen-prompts", "a.json", "b.json", "--on-bad-record", "skip")
    assert (config.rank, config.alpha, config.kd_lambda, config.kd_temperature) == (4, 8.0, 0.5, 1.5)
    assert (config.weight_decay, config.warmup_fraction, config.grad_clip, config.gen_temperature) == \
        (0.01, 0.2, 1.0, 0.7)
    assert config.methods == ("mode", "lora", "moelora") and config.fsdp
    assert config.gen_prompts == ("a.json", "b.json") and config.on_bad_record == "skip"
    assert _parse().kd_topk is None and _parse("--kd-topk", "256").kd_topk == 256
    assert not _parse().kd_topk_tail and _parse("--kd-topk-tail").kd_topk_tail
    assert _parse().kd_cache and not _parse("--no-kd-cache").kd_cache


def test_model_distils_the_teachers_top_256_by_default_as_the_official_code():
    assert _parse("--model", "ckpt").kd_topk == 256 and _parse("--model", "ckpt", "--kd-topk", "0").kd_topk == 0


def test_model_replaces_the_default_benchmark_and_takes_the_papers_learning_rate():
    assert _parse("--model", "ckpt", "--data", "a.jsonl").benchmark is None
    assert _parse("--model", "ckpt").lr == 1e-4 and _parse().lr == 3e-3
    assert _parse("--model", "ckpt", "--lr", "3e-3").lr == 3e-3
    assert _parse("--model", "ckpt", "--benchmark", "digits").benchmark == "digits"  # refused later, explicitly


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_sets_fields_and_flags_override_it(tmp_path, suffix):
    values = {"lr": 1e-4, "steps_per_task": 7, "methods": ["lora"], "fsdp": True}
    path = tmp_path / f"run{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("lr: 1.0e-4\nsteps_per_task: 7\nmethods: [lora]\nfsdp: true\n")
    config = _parse("--config", str(path), "--steps-per-task", "9", "--no-fsdp")
    assert (config.lr, config.steps_per_task, config.methods, config.fsdp) == (1e-4, 9, ("lora",), False)


def test_config_file_with_an_unknown_field_is_refused(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"lr": 1e-4, "learning_rate": 1e-4}))
    with pytest.raises(RunError, match=r"unknown field\(s\) \['learning_rate'\]"):
        _parse("--config", str(path))
    path.write_text("{not json")
    with pytest.raises(RunError, match="not valid json"):
        _parse("--config", str(path))
