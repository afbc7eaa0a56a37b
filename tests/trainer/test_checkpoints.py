"""mode.workloads.hf_model (loading, evaluation, generation) on tiny random Llama and Chameleon checkpoints
written with save_pretrained (no hub)."""
import json

import pytest
import torch
from tiny_models import (
    BEGIN_IMAGE,
    CHAMELEON_VOCAB,
    SPEC,
    VOCAB,
    config,
    image_sequence,
    randomize_adapters,
    tiny_model,
)

import mode
from mode.constants import IGNORE_INDEX
from mode.workloads.hf_model.data import JsonlDataset
from mode.workloads.hf_model.evaluation import exact_match_accuracy
from mode.workloads.hf_model.generation import generate_images, load_prompt
from mode.workloads.hf_model.loading import load_model, masked_logit_ids, modality_spec_for, vocab_size
from mode.workloads.scoring import answer_nll


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chameleon_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chameleon")
    tiny_model("chameleon").save_pretrained(path)
    return path


@torch.no_grad()
def test_load_model_gives_the_saved_models(llama_dir, chameleon_dir):
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    llama = load_model(llama_dir)
    assert type(llama).__name__ == "LlamaForCausalLM" and not llama.training
    assert torch.equal(llama(input_ids=ids).logits, tiny_model("llama")(input_ids=ids).logits)
    chameleon = load_model(chameleon_dir, dtype=torch.bfloat16)
    assert type(chameleon).__name__ == "ChameleonForConditionalGeneration"
    assert chameleon.get_output_embeddings().weight.dtype == torch.bfloat16 and vocab_size(chameleon) == CHAMELEON_VOCAB


def test_load_model_errors(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="no such model directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a usable Hugging Face config"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="cannot load the weights"):
        load_model(tmp_path)  # a config without weights
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for f in llama_dir.glob("*.safetensors"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="lacks .* weight"):
        load_model(tmp_path)  # weights of 2 layers for a 3-layer model


def test_modality_spec_for():
    assert modality_spec_for("chameleon", CHAMELEON_VOCAB) == mode.ModalitySpec.chameleon() \
        == modality_spec_for("Anole")
    spec = modality_spec_for("40:60, begin=61,end=60", VOCAB)
    assert spec == SPEC and modality_spec_for(SPEC) is SPEC
    assert modality_spec_for("1:3,10:12").image_token_ranges == ((1, 3), (10, 12))
    assert modality_spec_for({"image_token_ranges": [[40, 60]]}).image_token_ranges == ((40, 60),)
    with pytest.raises(ValueError, match="outside the model's vocabulary of 64"):
        modality_spec_for("chameleon", VOCAB)
    for bad in ("40-60", "top=3", "begin=x", "begin=1,begin=2"):
        with pytest.raises(ValueError, match="cannot read"):
            modality_spec_for(bad)
    with pytest.raises(ValueError, match="give both markers"):
        modality_spec_for("40:60,begin=61")


@torch.no_grad()
def greedy_without_cache(model, prompt, steps):
    """Reference: a full forward over the growing sequence at each step."""
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def record(prompt, answer):
    ids = prompt + answer
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + answer)}


def test_exact_match_accuracy_per_task():
    torch.manual_seed(0)
    model = randomize_adapters(mode.apply_mode(tiny_model("llama"), config()))
    # Prompts of two lengths, some ending inside an image (their answers route as image tokens).
    prompts = [image_sequence(1, seed=s)[0, :n].tolist() for s, n in ((0, 5), (1, 5), (2, 9), (3, 9))]
    answers = [greedy_without_cache(model, p, 3) for p in prompts]
    wrong = [(t + 1) % VOCAB for t in answers[3]]
    data = JsonlDataset([record(p, a) for p, a in zip(prompts, answers[:3] + [wrong])],
                        ["a", "b", "b", "b"], ["x:1", "x:2", "x:3", "x:4"])
    model.train()
    assert exact_match_accuracy(model, data, batch_size=2) == {"a": 1.0, "b": pytest.approx(2 / 3)}
    assert model.training  # restored


def test_generate_images_tokens_and_png(tmp_path, chameleon_dir):
    model = mode.apply_mode(load_model(chameleon_dir), mode.MoDEConfig(modality=modality_spec_for("chameleon")))
    randomize_adapters(model)
    (tmp_path / "cat.json").write_text(json.dumps([0, 17, 300]))
    torch.save(torch.tensor([0, 18, 301, 8197]), tmp_path / "dog.pt")
    prompts = [tmp_path / "cat.json", tmp_path / "dog.pt"]
    results = generate_images(model, prompts, tmp_path / "out", image_tokens=16, seed=1)
    assert [r["png"] for r in results] == [None, None]  # no VQ decoder given: tokens only
    cat = json.loads((tmp_path / "out" / "cat.image_tokens.json").read_text())
    assert cat["prompt"] == [0, 17, 300, 8197]  # begin-of-image appended
    codes = torch.tensor(cat["image_tokens"])
    assert len(codes) == 16 and bool(((codes >= 4) & (codes < 8196)).all())
    dog = json.loads((tmp_path / "out" / "dog.image_tokens.json").read_text())
    assert dog["prompt"] == [0, 18, 301, 8197]  # already there: not doubled

    again = generate_images(model, prompts, tmp_path / "again", image_tokens=16, seed=1,
                            decode_fn=lambda codes: ((codes - 4) % 17).float().view(4, 4) / 16)
    assert json.loads((tmp_path / "again" / "cat.image_tokens.json").read_text()) == cat  # seeded
    from PIL import Image
    with Image.open(again[0]["png"]) as image:
        assert image.size == (4, 4)


def test_generation_routes_codes_to_the_image_expert():
    """With greedy choice restricted to image codes, the cached generation equals full forwards."""
    from mode.hf.models import continue_sequences
    from mode.workloads.hf_model.generation import image_code_mask

    torch.manual_seed(0)
    model = randomize_adapters(mode.apply_mode(tiny_model("llama"), config()))
    prompt = torch.tensor([[1, 2, 3, BEGIN_IMAGE]])
    allowed = image_code_mask(SPEC, VOCAB, prompt.device)

    def pick(logits):
        return logits.masked_fill(~allowed, float("-inf")).argmax(-1)

    codes = continue_sequences(model, prompt, 4, pick)[0]
    seq = prompt[0].tolist()
    with torch.no_grad():
        for _ in range(4):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.masked_fill(~allowed, float("-inf")).argmax()))
    assert codes.tolist() == seq[4:]


def test_prompt_file_errors(tmp_path):
    cases = {"a.json": "[1, 2.5]", "b.json": "{}", "c.json": "[]", "d.json": "[1, 99999]", "e.txt": "[1]",
             "f.json": "[1,\n{bad", "h.pt": "not a tensor file"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    for name, reason in (("a.json", "list of token ids"), ("b.json", "list of token ids"), ("c.json", "non-empty"),
                         ("d.json", "outside the vocabulary"), ("e.txt", "expected a .json or .pt"),
                         ("f.json", r"f\.json:2: not valid JSON"), ("h.pt", r"h\.pt: not a tensor file")):
        with pytest.raises(ValueError, match=reason):
            load_prompt(tmp_path / name, VOCAB)
    (tmp_path / "g.json").write_text(json.dumps({"input_ids": [3]}))
    assert load_prompt(tmp_path / "g.json", VOCAB) == [3]
    with pytest.raises(FileNotFoundError):
        load_prompt(tmp_path / "none.json", VOCAB)
    torch.save(torch.tensor([[1, 2]]), tmp_path / "two_d.pt")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        load_prompt(tmp_path / "two_d.pt", VOCAB)



@pytest.mark.parametrize("kind", ["chameleon", "emu3"])
@torch.no_grad()
def test_answer_nll_is_on_the_scale_of_the_models_own_loss(kind):
    # Chameleon's forward masks the logits of its image codes; Emu3's masks none
    model = tiny_model(kind)
    ids = torch.tensor([[1, 8197, 5, 6, 8196, 8200, 8203, 8201]]) if kind == "chameleon" else \
        torch.tensor([[0, 25, 3, 9, 10, 6, 4, 27, 28]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -2:] = ids[:, -2:]
    own = model(input_ids=ids, labels=labels).loss.item()
    masked = masked_logit_ids(model)
    assert (masked is None) == (kind == "emu3")
    batch = {"input_ids": ids, "labels": labels}
    assert answer_nll(model, [batch], masked) == pytest.approx(own, rel=1e-5)
    if kind == "chameleon":  # over the whole vocabulary: another, larger number
        assert answer_nll(model, [batch]) > own + 1e-3
