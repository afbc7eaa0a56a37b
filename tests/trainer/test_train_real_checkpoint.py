"""mode.train --model: tiny random Llama and Chameleon checkpoints (save_pretrained to tmp dirs)
with tiny JSONL task, evaluation and generation files; bad records; refused flag combinations."""
import json
import random

import pytest
import torch
from tiny_models import BEGIN_IMAGE, END_IMAGE, IMAGE_HI, IMAGE_LO, SPEC, VOCAB, save_tiny_checkpoint, tiny_model

import mode
from mode.train import cli, loop
from mode.train.config import RunError
from mode.workloads.hf_model.data import load_jsonl
from mode.workloads.hf_model.evaluation import exact_match_accuracy
from mode.workloads.hf_model.loading import check_image_tokens, load_model, modality_spec_for

LLAMA_MODALITY = f"{IMAGE_LO}:{IMAGE_HI},begin={BEGIN_IMAGE},end={END_IMAGE}"
TINY = ["--steps-per-task", "2", "--batch-size", "4", "--eval-size", "4", "--checkpoint-every", "1",
        "--image-tokens", "3", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoint_dirs(tmp_path_factory):
    """The tiny Chameleon and Emu3 checkpoints, by name."""
    return {kind: save_tiny_checkpoint(kind, tmp_path_factory.mktemp(kind)) for kind in ("chameleon", "emu3")}


def image_question(rng, text_ids, code_ids, begin, end, answer):
    """A record: text, an image (begin marker, codes, end marker), a question, the answer (scored)."""
    prompt = [rng.choice(text_ids)] + [begin] + [rng.choice(code_ids) for _ in range(4)] + [end] + \
        [rng.choice(text_ids) for _ in range(2)]
    return {"input_ids": prompt + answer, "answer_start": len(prompt)}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def llama_files(directory, bad_line=None):
    """Two task files, their held-out files, a generation stream and a prompt file, in the tiny
    Llama vocabulary (text ids below 40). `bad_line`: a line written as line 3 of task a."""
    rng = random.Random(0)
    text, codes = list(range(1, IMAGE_LO)), list(range(IMAGE_LO, IMAGE_HI))
    files = {}
    for split in ("train", "test"):
        for task, answer in (("a", [7, 2]), ("b", [9])):
            records = [image_question(rng, text, codes, BEGIN_IMAGE, END_IMAGE, answer) for _ in range(5)]
            lines = [json.dumps(r) for r in records]
            if split == "train" and task == "a" and bad_line is not None:
                lines.insert(2, bad_line)
            (directory / split).mkdir(exist_ok=True)
            path = directory / split / f"{task}.jsonl"  # held-out files named like the task files
            path.write_text("\n".join(lines) + "\n")
            files.setdefault(split, []).append(str(path))
    generation = [{"input_ids": [3, 4, BEGIN_IMAGE] + [rng.choice(codes) for _ in range(6)] + [END_IMAGE],
                   "answer_start": 3} for _ in range(6)]
    files["gen"] = str(write_jsonl(directory / "generation.jsonl", generation))
    (directory / "cat.json").write_text(json.dumps([3, 4, 5]))
    files["prompt"] = str(directory / "cat.json")
    return files


def llama_args(output, model_dir, files, *extra):
    return ["--output", str(output), "--model", str(model_dir), "--modality", LLAMA_MODALITY,
            "--data", ",".join(files["train"]), "--eval-data", ",".join(files["test"]), "--gen-data", files["gen"],
            *TINY, *extra]


def run(argv):
    config, args = cli.parse_args(argv)
    return loop.run(config, args.output, device="cpu", progress=False)


def reload_adapters(argv, method_name):
    """The run's base checkpoint with the method's adapters from DIR/adapters/<method>."""
    config, args = cli.parse_args(argv)
    return mode.load_adapter(load_model(config.model), args.output / "adapters" / method_name).eval()


def test_llama_run_scores_every_task_file_and_draws_the_prompts(tmp_path, llama_dir):
    files = llama_files(tmp_path)
    output = tmp_path / "out"
    argv = llama_args(output, llama_dir, files, "--methods", "mode,lora", "--gen-prompts", files["prompt"])
    metrics = run(argv)
    assert metrics["tasks"] == ["a", "b"]  # one task per file, in file order
    assert metrics["pretrained"]["gen_acc"] is None and metrics["pretrained"]["image_nll"] > 0
    for name, method in metrics["methods"].items():
        m = method["per_seed"][0]
        assert len(m["acc_matrix"]) == 2 and all(len(row) == 2 for row in m["acc_matrix"])
        assert all(0.0 <= a <= 1.0 for row in m["acc_matrix"] for a in row)
        assert len(m["answer_nll_matrix"]) == 2 and all(v > 0 for row in m["answer_nll_matrix"] for v in row)
        assert "digit_acc_matrix" not in m
        assert m["gen_acc"] == [None, None] and m["gen_retention"] is None
        assert len(m["image_nll"]) == 2 and all(nll > 0 for nll in m["image_nll"])
        drawn = json.loads((output / "images" / name / "cat.image_tokens.json").read_text())
        assert drawn["prompt"] == [3, 4, 5, BEGIN_IMAGE]
        assert len(drawn["image_tokens"]) == 3 and all(IMAGE_LO <= t < IMAGE_HI for t in drawn["image_tokens"])
        assert m["images"][0]["png"] is None  # no VQ decoder
        # every method's adapters, not only the last one's, reload into the base and score as in the run
        assert m["adapters"] == f"adapters/{name}"
        reloaded = reload_adapters(argv, name)
        assert any(p.abs().sum() > 0 for n, p in reloaded.named_parameters() if "lora_B" in n)  # trained, not fresh
        accs = exact_match_accuracy(reloaded, load_jsonl(files["test"], VOCAB))
        assert [accs["a"], accs["b"]] == m["acc_matrix"][-1]
    assert json.loads((output / "metrics.json").read_text()) == metrics
    assert "| mode |" in (output / "results.md").read_text()
    assert (output / "image_nll.png").exists() and not (output / "gen_acc.png").exists()


def test_chameleon_run(tmp_path):
    model_dir = tmp_path / "chameleon"
    tiny_model("chameleon").save_pretrained(model_dir)
    rng = random.Random(1)
    text, codes = [1, 2, 3, 8200, 8201], list(range(4, 8196))  # 8198 is <image>: not text
    records = [{**image_question(rng, text, codes, 8197, 8196, [8200, 2]), "task": task}
               for task in ("vqa", "caption") for _ in range(3)]
    generation = [{"input_ids": [1, 8197] + [rng.choice(codes) for _ in range(5)] + [8196], "answer_start": 2}
                  for _ in range(4)]
    data, gen = write_jsonl(tmp_path / "tasks.jsonl", records), write_jsonl(tmp_path / "gen.jsonl", generation)
    metrics = run(["--output", str(tmp_path / "out"), "--model", str(model_dir), "--modality", "chameleon",
                   "--data", str(data), "--gen-data", str(gen), "--methods", "mode", *TINY])
    assert metrics["tasks"] == ["vqa", "caption"]  # tasks by the "task" field, in first-record order
    assert len(metrics["methods"]["mode"]["per_seed"][0]["acc_matrix"]) == 2


@pytest.mark.parametrize("record, reason", [
    ({"input_ids": [1, 8197, 5, 8198, 8196, 2, 3], "answer_start": 5},
     r"input_ids\[3\] = 8198 is the processor's image placeholder, inside an image span"),
    ({"input_ids": [1, 2, 8197, 5, 6, 8196], "answer_start": 3}, r"labels\[3\] = 5 scores an image code"),
])
def test_chameleon_task_data_mistakes_are_refused_with_their_reason(tmp_path, record, reason):
    model_dir = tmp_path / "chameleon"
    tiny_model("chameleon").save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "vqa.jsonl", [{"input_ids": [1, 8197, 5, 8196, 2, 3], "answer_start": 4}, record])
    with pytest.raises(RunError, match=f"vqa.jsonl:2: {reason}"):
        run(["--output", str(tmp_path / "out"), "--model", str(model_dir), "--modality", "chameleon",
             "--data", str(data), "--methods", "lora", *TINY])


BAD_LINE = json.dumps({"input_ids": [1, 2, 999], "answer_start": 1})  # 999: outside the vocabulary of 64


def test_bad_record_is_refused_with_its_file_and_line(tmp_path, llama_dir):
    files = llama_files(tmp_path, bad_line=BAD_LINE)
    output = tmp_path / "out"
    with pytest.raises(RunError, match=r"a\.jsonl:3: input_ids\[2\] = 999 is outside the vocabulary"):
        run(llama_args(output, llama_dir, files, "--methods", "lora"))
    assert not (output / "config.json").exists()


def test_bad_record_is_skipped_with_a_warning(tmp_path, llama_dir):
    files = llama_files(tmp_path, bad_line=BAD_LINE)
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 bad record.*a\.jsonl:3"):
        metrics = run(llama_args(tmp_path / "out", llama_dir, files, "--methods", "lora", "--on-bad-record", "skip"))
    assert metrics["tasks"] == ["a", "b"]


@pytest.mark.parametrize("extra, message", [
    (["--model", "M", "--benchmark", "digits"], "--model and --benchmark exclude each other"),
    (["--fsdp", "--probe-conflict", "5"], "--fsdp and --probe-conflict exclude each other"),
    (["--model", "M", "--data", "a.jsonl"], "give --gen-data"),
    (["--model", "M"], "--model needs --data"),
    (["--data", "a.jsonl"], "--data need(s) --model"),
])
def test_inconsistent_flags_are_refused(tmp_path, capsys, extra, message):
    assert cli.main(["--output", str(tmp_path / "out"), "--methods", "mode", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_held_out_files_must_name_the_training_tasks(tmp_path, llama_dir):
    files = llama_files(tmp_path)
    files["test"] = [files["gen"]]  # its records belong to the task "generation"
    with pytest.raises(RunError, match=r"--eval-data has no record of the task\(s\) \['a', 'b'\]"):
        run(llama_args(tmp_path / "out", llama_dir, files, "--methods", "lora"))


@pytest.mark.parametrize("decoder, message", [
    ("tiny_models", "expected module:function"),
    ("no_such_module:f", "No module named 'no_such_module'"),
    ("tiny_models:no_such_function", "has no attribute 'no_such_function'"),
])
def test_bad_decoder_is_refused_before_training(tmp_path, llama_dir, decoder, message):
    files = llama_files(tmp_path)
    with pytest.raises(RunError, match=f"--decoder {decoder!r}: .*{message}"):
        run(llama_args(tmp_path / "out", llama_dir, files, "--methods", "lora", "--decoder", decoder))


def test_emu3_prompt_needs_its_image_size(tmp_path):
    model_dir = tmp_path / "emu3"
    tiny_model("emu3").save_pretrained(model_dir)
    records = [{"input_ids": [0, 25, 3, 9, 10, 6, 4, 27, 28], "answer_start": 7}] * 2
    data = write_jsonl(tmp_path / "vqa.jsonl", records)
    (tmp_path / "cat.json").write_text(json.dumps([0, 25, 3, 5]))  # ids only: no height and width
    with pytest.raises(RunError, match="cat.json: an Emu3 prompt is a JSON object with input_ids and the image's "
                                       "height and width"):
        run(["--output", str(tmp_path / "out"), "--model", str(model_dir), "--modality", "emu3", "--data", str(data),
             "--methods", "lora", "--gen-prompts", str(tmp_path / "cat.json"), *TINY])


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_raw_records_are_refused_with_a_hint_to_run_mode_prepare(tmp_path, checkpoint_dirs, kind):
    data = write_jsonl(tmp_path / "vqa.jsonl", [{"image": "img/0.png", "question": "what is it ?", "answer": "red"}])
    raw = r"vqa\.jsonl:1: missing field 'input_ids': a raw record \(image, question, answer\); tokenize the file with"
    with pytest.raises(RunError, match=rf"(?s)--on-bad-record skip drops them.*{raw} mode-prepare"):
        run(["--output", str(tmp_path / "out"), "--model", str(checkpoint_dirs[kind]), "--modality", kind,
             "--data", str(data), "--methods", "lora", *TINY])


# (checkpoint, a record's ids, the scored start, a --modality whose image codes are none of the data's)
WRONG_SPECS = {"chameleon": ([1, 8197, 5, 6, 8196, 8200, 2], 5, "100:200,begin=8197,end=8196"),
               "emu3": ([0, 25, 3, 9, 10, 6, 4, 27, 28], 7, "44:46,begin=3,end=4")}


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_a_spec_that_marks_none_of_the_datas_images_is_refused(tmp_path, checkpoint_dirs, kind):
    ids, start, spec = WRONG_SPECS[kind]
    data = write_jsonl(tmp_path / "vqa.jsonl", [{"input_ids": ids, "answer_start": start}] * 2)
    with pytest.raises(RunError, match=rf"--modality {spec}: marks none of the tokens of --data as an image code "
                                       r".*though they hold 4 of the checkpoint's image codes"):
        run(["--output", str(tmp_path / "out"), "--model", str(checkpoint_dirs[kind]), "--modality", spec,
             "--data", str(data), "--methods", "lora", *TINY])
    assert not (tmp_path / "out").exists()


def test_an_implausible_share_of_image_codes_is_a_warning():
    chameleon = mode.ModalitySpec.chameleon()
    data = [torch.tensor([1, 8197, 5, 3000, 6000, 8196, 8200])]
    assert check_image_tokens(data, chameleon, "chameleon", chameleon, "d.jsonl") == 3
    with pytest.warns(UserWarning, match=r"d\.jsonl: 1 of 7 tokens are image codes of --modality 4:100,begin=8197,"
                                         r"end=8196, the data holds 3 of the checkpoint's image codes"):
        check_image_tokens(data, modality_spec_for("4:100,begin=8197,end=8196"), "4:100,begin=8197,end=8196",
                           chameleon, "d.jsonl")
    # a family whose codes the checkpoint does not name: codes outside the image spans are text taken for image
    with pytest.warns(UserWarning, match="2 of them outside the image spans"):
        check_image_tokens([torch.tensor([41, 42, 61, 43, 60, 5])], SPEC, "40:60,begin=61,end=60", None, "d.jsonl")
    with pytest.raises(ValueError, match="marks none .* though they hold 1 image span"):
        check_image_tokens([torch.tensor([1, 61, 5, 60])], SPEC, "40:60,begin=61,end=60", None, "d.jsonl")
