"""Janus end to end on a tiny checkpoint built offline: mode-prepare (pixels in sidecar files, codes
after the text vocabulary) -> mode-train --methods mode,lora -> the adapters reload (mode.load_adapter
and PeftModel.from_pretrained) to the trained model's logits -> images drawn with guidance, as PNGs."""
import json

import pytest
import torch
from PIL import Image
from test_prepare import TINY, raw_files
from tiny_models import JANUS_VOCAB, save_tiny_checkpoint

import mode
from mode.train import cli
from mode.workloads.hf_model import prepare
from mode.workloads.hf_model.data import collate, load_jsonl
from mode.workloads.hf_model.evaluation import exact_match_accuracy
from mode.workloads.hf_model.loading import load_model, vocab_size
from mode.workloads.scoring import answer_nll


def test_janus_prepare_train_reload(tmp_path):
    model_dir = save_tiny_checkpoint("janus", tmp_path / "janus")
    tasks_raw, stream_raw = raw_files(tmp_path / "raw")
    data, gen, prompts = tmp_path / "data" / "tasks.jsonl", tmp_path / "data" / "gen.jsonl", tmp_path / "prompts"
    options = ["--model", str(model_dir), "--no-progress"]
    assert prepare.main([str(tasks_raw), str(data), *options]) == 0
    assert prepare.main([str(stream_raw), str(gen), "--prompt-dir", str(prompts), *options]) == 0

    model = load_model(model_dir)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert records[0]["pixel_values"] == "tasks.pixels/0.pt" and (data.parent / "tasks.pixels" / "0.pt").is_file()
    assert records[0]["input_ids"].count(JANUS_VOCAB["<image_placeholder>"]) == 4
    stream = [json.loads(line) for line in gen.read_text().splitlines()]
    codes = stream[0]["input_ids"][stream[0]["answer_start"]:]
    assert len(codes) == 4 and all(len(JANUS_VOCAB) <= c < vocab_size(model) for c in codes)
    assert load_jsonl(data, vocab_size(model))[0]["pixel_values"].is_file()

    output = tmp_path / "out"
    argv = ["--output", str(output), "--model", str(model_dir), "--modality", "janus", "--data", str(data),
            "--gen-data", str(gen), "--gen-prompts", str(prompts / "square.json"), *TINY[:-2], "--methods", "mode,lora"]
    assert cli.main(argv) == 0
    metrics = json.loads((output / "metrics.json").read_text())
    for method in ("mode", "lora"):
        run = metrics["methods"][method]["per_seed"][0]
        assert len(run["acc_matrix"]) == 2 and run["image_nll"][-1] > 0
    assert metrics["methods"]["mode"]["per_seed"][0]["loss_history"]["kd"][0] >= 0

    # the adapters reload into a fresh base, by mode and by PEFT, to the trained model's results
    from peft import PeftModel

    adapters = output / "adapters" / "mode"
    reloaded = mode.load_adapter(load_model(model_dir), adapters).eval()
    accs = exact_match_accuracy(reloaded, load_jsonl(data, vocab_size(reloaded)))
    assert [accs["color"], accs["shape"]] == metrics["methods"]["mode"]["per_seed"][0]["acc_matrix"][-1]
    # the answer NLL, a continuous function of the logits, as the run's last evaluation scored it (its first
    # --eval-size 2 records per task, in batches of --batch-size 2)
    dataset = load_jsonl(data, vocab_size(reloaded))
    nlls = [answer_nll(reloaded, [collate([r for r, t in zip(dataset.records, dataset.tasks) if t == task][:2],
                                          pad_id=0)]) for task in ("color", "shape")]
    assert nlls == pytest.approx(metrics["methods"]["mode"]["per_seed"][0]["answer_nll_matrix"][-1], rel=1e-6)
    through_peft = PeftModel.from_pretrained(load_model(model_dir), adapters).eval()
    batch = collate(load_jsonl(data, vocab_size(reloaded)).records[:2], pad_id=0)
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"]}
        assert torch.equal(reloaded(**inputs).logits, through_peft(**inputs).logits)

    # images drawn with guidance through the MoDE model, decoded to PNGs by the VQ decoder
    drawn = json.loads((output / "images" / "mode" / "square.image_tokens.json").read_text())
    assert len(drawn["image_tokens"]) == 4 and all(0 <= c < 16 for c in drawn["image_tokens"])
    assert Image.open(output / "images" / "mode" / "square.png").size == (16, 16)
