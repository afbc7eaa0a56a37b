"""mode-prepare -> mode-train -> adapters on disk -> reload -> generate, on tiny random Chameleon and
Emu3 checkpoints with offline word-level tokenizers and small PNGs written here; bad raw records."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import EMU3_VOCAB, save_tiny_checkpoint
from transformers import AutoProcessor

import mode
from mode.train import cli, loop
from mode.workloads.hf_model import prepare
from mode.workloads.hf_model.data import load_jsonl
from mode.workloads.hf_model.evaluation import exact_match_accuracy
from mode.workloads.hf_model.loading import load_model, modality_spec_for, token_checks, vocab_size

TINY = ["--steps-per-task", "1", "--batch-size", "2", "--eval-size", "2", "--no-progress", "--device", "cpu",
        "--methods", "mode"]


def write_png(path, seed, size=(16, 24)):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path.name


def raw_files(directory):
    """Task records (two tasks), generation-stream records and one prompt, images beside them."""
    (directory / "img").mkdir(parents=True)
    images = [f"img/{write_png(directory / 'img' / f'{i}.png', i)}" for i in range(4)]
    tasks = [{"image": images[i], "question": "what color is it ?", "answer": answer, "task": task}
             for i, (task, answer) in enumerate([("color", "red"), ("color", "blue"), ("shape", "a square"),
                                                 ("shape", "a square")])]
    stream = [{"caption": "a red square", "image": images[i]} for i in range(2)] + \
        [{"caption": "a blue square", "name": "square"}]  # a prompt for --gen-prompts
    for name, records in (("tasks", tasks), ("stream", stream)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return directory / "tasks.jsonl", directory / "stream.jsonl"


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_prepare_train_reload_generate(tmp_path, kind, capsys):
    model_dir = save_tiny_checkpoint(kind, tmp_path / kind)
    tasks_raw, stream_raw = raw_files(tmp_path / "raw")
    data, gen, prompts = tmp_path / "data" / "tasks.jsonl", tmp_path / "data" / "gen.jsonl", tmp_path / "prompts"
    options = ["--model", str(model_dir), "--batch-size", "3", "--no-progress"]
    assert prepare.main([str(tasks_raw), str(data), *options]) == 0
    summary = capsys.readouterr().out
    emu3_size = ["--ratio", "3:2", "--image-area", str(16 * 24)]  # 2 x 3 latents, as the 16x24 images
    assert prepare.main([str(stream_raw), str(gen), "--prompt-dir", str(prompts), *options, *emu3_size]) == 0

    # the codes spliced in are the checkpoint's VQ codes of the image, in its layout
    model, processor = load_model(model_dir), AutoProcessor.from_pretrained(model_dir)
    spec = modality_spec_for(kind, vocab_size(model), getattr(model.config, "vocabulary_map", None))
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert [r["task"] for r in records] == ["color", "color", "shape", "shape"]
    pixels = processor(images=[Image.open(tmp_path / "raw" / "img" / "0.png")], text=["<image>"],
                       return_tensors="pt")
    with torch.no_grad():
        expected = model.model.get_image_tokens(pixels["pixel_values"], *(
            [pixels["image_sizes"]] if kind == "emu3" else [])).reshape(-1).tolist()
    # the summary counts the image codes, 4 images of 64 (Chameleon) or 2x3 latents (Emu3)
    codes = 4 * (64 if kind == "chameleon" else 6)
    tokens = sum(len(r["input_ids"]) for r in records)
    assert f"4 record(s) to {data} ({codes} of their {tokens} tokens image codes)" in summary
    ids = records[0]["input_ids"]
    begin = ids.index(spec.begin_image)
    first_code = next(i for i in range(begin, len(ids)) if ids[i] in range(*spec.image_token_ranges[0]))
    assert ids[first_code:first_code + len(expected)] == expected
    if kind == "emu3":  # 2 rows of 3 codes, each closed by the end-of-row token
        assert [expected[3], expected[7]] == [EMU3_VOCAB["<|extra_200|>"]] * 2
        assert ids[first_code + len(expected):first_code + len(expected) + 2] == [EMU3_VOCAB["<|extra_201|>"],
                                                                                     spec.end_image]
    else:
        assert len(expected) == 64 and ids[first_code + 64] == spec.end_image
    answer = processor.tokenizer("red", add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert ids[records[0]["answer_start"]:] == answer
    # the trainer's checks accept what mode-prepare writes
    load_jsonl(data, vocab_size(model), checks=token_checks(model, spec))
    stream = [json.loads(line) for line in gen.read_text().splitlines()]
    assert len(stream) == 2 and stream[0]["input_ids"][stream[0]["answer_start"]] in range(*spec.image_token_ranges[0])
    prompt = json.loads((prompts / "square.json").read_text())
    if kind == "emu3":
        assert (prompt["height"], prompt["width"]) == (2, 3)

    # train one method, one step per task; the adapters reload into the base with one call
    output = tmp_path / "out"
    extra = ["--decoder", "tiny_models:codes_as_gray", "--image-tokens", "64"] if kind == "chameleon" else []
    argv = ["--output", str(output), "--model", str(model_dir), "--modality", kind, "--data", str(data),
            "--gen-data", str(gen), "--gen-prompts", str(prompts / "square.json"), *TINY, *extra]
    config, args = cli.parse_args(argv)
    metrics = loop.run(config, args.output, device="cpu", progress=False)
    assert (output / "adapters" / "mode" / "adapter_config.json").is_file()
    reloaded = mode.load_adapter(load_model(model_dir), output / "adapters" / "mode")
    accs = exact_match_accuracy(reloaded.eval(), load_jsonl(data, vocab_size(reloaded)))
    assert [accs["color"], accs["shape"]] == metrics["methods"]["mode"]["per_seed"][0]["acc_matrix"][-1]

    # generation: Emu3 in its layout, decoded by its VQ decoder; Chameleon through --decoder
    drawn = json.loads((output / "images" / "mode" / "square.image_tokens.json").read_text())
    png = Image.open(output / "images" / "mode" / "square.png")
    if kind == "emu3":
        tokens = drawn["image_tokens"]
        assert len(tokens) == 2 * 4 + 2 and tokens[3] == tokens[7] == EMU3_VOCAB["<|extra_200|>"]
        assert tokens[-2:] == [EMU3_VOCAB["<|extra_201|>"], spec.end_image]
        assert all(t in range(*spec.image_token_ranges[0]) for t in tokens[:3] + tokens[4:7])
        assert png.size == (24, 16)  # 8x the latents, (width, height)
    else:
        assert len(drawn["image_tokens"]) == 64 and png.size == (8, 8)


@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
def test_bad_raw_records_are_listed_with_file_and_line(tmp_path, kind):
    model_dir = save_tiny_checkpoint(kind, tmp_path / kind)
    directory = tmp_path / "raw"
    directory.mkdir()
    write_png(directory / "ok.png", 0)
    (directory / "broken.png").write_bytes(b"not a png")
    lines = [{"image": "ok.png", "question": "what is it ?", "answer": "red"},
             {"image": "missing.png", "question": "what is it ?", "answer": "red"},
             {"image": "broken.png", "question": "what is it ?", "answer": "red"},
             {"image": "ok.png", "question": "what is it ?", "answer": " "},
             {"image": "ok.png", "question": "what is <image> ?", "answer": "red"}]  # a second image
    raw = directory / "t.jsonl"
    raw.write_bytes("".join(json.dumps(r) + "\n" for r in lines).encode() + b'{"caption": "caf\xe9"}\n')
    out = tmp_path / "t.jsonl"
    with pytest.raises(ValueError) as err:
        prepare.prepare(model_dir, raw, out, progress=False)
    message = str(err.value)
    assert "5 bad record(s)" in message and "--on-bad-record skip" in message and not out.exists()
    assert "t.jsonl:2: image 'missing.png': no such file" in message
    assert "t.jsonl:3: image 'broken.png': unreadable" in message
    assert "t.jsonl:4: answer: expected a non-empty string" in message
    assert "t.jsonl:5: question: holds '<image>', one of the processor's image tokens" in message
    assert "t.jsonl:6: not UTF-8 text" in message
    with pytest.warns(UserWarning, match="skipped 5 bad record"):
        counts = prepare.prepare(model_dir, raw, out, on_error="skip", progress=False)
    assert (counts["records"], counts["prompts"], counts["skipped"]) == (1, 0, 5)
    assert len(out.read_text().splitlines()) == 1
