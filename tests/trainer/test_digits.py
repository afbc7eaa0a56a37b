"""The digits benchmark: vocabulary, encoding, tasks, batching, and the pretraining cache."""
import warnings

import numpy as np
import pytest
import torch

from mode.workloads.digits import data as digits
from mode.workloads.digits import evaluation, generation
from mode.workloads.digits import model as dm
from mode.workloads.digits.data import DigitsVocab


@pytest.fixture(scope="module")
def vocab():
    return DigitsVocab()


def _is_image_token(vocab, token_id):
    """What mode.ModalitySpec does with the spec args, for ids outside a begin/end pair."""
    args = vocab.modality_spec_args()
    in_range = any(lo <= token_id < hi for lo, hi in args["image_token_ranges"])
    return in_range or token_id in (args["begin_image"], args["end_image"])


def test_image_round_trips_through_tokens(vocab):
    data = digits.load_digits_split()
    for image in data.test_images[:50]:
        codes = vocab.image_to_codes(image)
        assert len(codes) == 64
        np.testing.assert_array_equal(vocab.codes_to_image(codes), image)
        with_markers = vocab.encode_image(image)
        assert with_markers[0] == vocab.begin_image and with_markers[-1] == vocab.end_image
        assert with_markers[1:-1] == codes
    every_level = np.arange(64).reshape(8, 8) % 17
    np.testing.assert_array_equal(vocab.codes_to_image(vocab.image_to_codes(every_level)), every_level)
    assert vocab.image_to_codes(every_level)[:3] == [vocab.image_code_base + i for i in range(3)]  # row-major


def test_text_round_trips(vocab):
    words = ["what", "digit", "is", "this", "?", "seven", "even", "times"]
    assert vocab.decode(vocab.encode_words(words)) == words


def test_bad_images_are_rejected(vocab):
    with pytest.raises(ValueError, match="8x8"):
        vocab.image_to_codes(np.zeros((4, 4), dtype=int))
    with pytest.raises(ValueError, match="0..16"):
        vocab.image_to_codes(np.full((8, 8), 17))
    with pytest.raises(ValueError, match="image codes"):
        vocab.codes_to_image([vocab.bos] * 64)


def test_modality_spec_args_split_image_from_text(vocab):
    args = vocab.modality_spec_args()
    (lo, hi), = args["image_token_ranges"]
    assert hi - lo == digits.GRAY_LEVELS
    image_ids = set(range(lo, hi)) | {args["begin_image"], args["end_image"]}
    assert all(_is_image_token(vocab, i) for i in image_ids)
    words = digits.WORDS + digits.PRETRAIN_QUESTION_WORDS[digits.DEFAULT_PRETRAIN_QUESTIONS]
    text_ids = [vocab.id_of[t] for t in digits.SPECIAL_TOKENS + words]
    assert not any(_is_image_token(vocab, i) for i in text_ids)
    assert sorted(image_ids | set(text_ids)) == list(range(len(vocab)))  # every id is one or the other


def test_modality_spec_args_build_a_mode_spec(vocab):
    import mode

    spec = mode.ModalitySpec(**vocab.modality_spec_args())
    example = digits.understanding_example(vocab, digits.DIGIT, np.zeros((8, 8), dtype=int), 3)
    ids = torch.tensor([example.prompt + example.target])
    expected = [int(_is_image_token(vocab, i)) for i in ids[0].tolist()]
    assert spec.modality_ids(ids)[0].tolist() == expected


def _hand_made_digit(top_ink, bottom_ink):
    image = np.zeros((8, 8), dtype=np.int64)
    image[:4, 3] = top_ink
    image[4:, 3] = bottom_ink
    return image


def test_task_answers():
    image = _hand_made_digit(16, 1)  # answers depend on the label only
    answers = {task.name: task.answer for task in (digits.DIGIT,) + digits.CONTINUAL_TASKS}
    assert answers["digit"](image, 7) == ("seven",)
    assert answers["parity"](image, 7) == ("seven", "is", "odd")
    assert answers["parity"](image, 0) == ("zero", "is", "even")
    assert answers["greater_than_four"](image, 4) == ("four", "is", "not", "greater", "than", "four")
    assert answers["greater_than_four"](image, 5) == ("five", "is", "greater", "than", "four")
    assert answers["plus_one"](image, 3) == ("three", "plus", "one", "is", "four")
    assert answers["plus_one"](image, 9) == ("nine", "plus", "one", "is", "one", "zero")
    assert answers["times_two"](image, 4) == ("four", "times", "two", "is", "eight")
    assert answers["times_two"](image, 7) == ("seven", "times", "two", "is", "one", "four")
    assert [t.name for t in digits.CONTINUAL_TASKS] == ["parity", "greater_than_four", "plus_one", "times_two"]
    assert len({t.question for t in digits.CONTINUAL_TASKS + (digits.DIGIT,)}) == 5  # every task asks its own question


def test_every_answer_word_is_in_the_vocabulary(vocab):
    data = digits.load_digits_split()
    for task in digits.TASKS.values():
        for image, label in zip(data.train_images[:100], data.train_labels[:100]):
            example = digits.understanding_example(vocab, task, image, label)
            assert len(example.target) <= digits.MAX_ANSWER_TOKENS
            assert example.target[-1] == vocab.eos


def test_text_facts_are_every_continual_answer(vocab):
    facts = digits.text_facts()
    answers = {task.answer(None, d) for task in digits.CONTINUAL_TASKS for d in range(10)}
    assert len(facts) == 40 and set(facts) == answers
    assert ("seven", "is", "odd") in facts and ("nine", "times", "two", "is", "one", "eight") in facts
    example = digits.text_example(vocab, ("two", "is", "even"))
    assert example.prompt == [vocab.bos] and vocab.decode(example.target) == ["two", "is", "even", "<eos>"]


def test_examples_layout(vocab):
    image = _hand_made_digit(3, 4)
    u = digits.understanding_example(vocab, digits.CONTINUAL_TASKS[0], image, 6)
    question = list(digits.CONTINUAL_TASKS[0].question)
    assert u.prompt[0] == vocab.bos and vocab.decode(u.prompt[1:1 + len(question)]) == question
    assert u.prompt[1 + len(question):] == vocab.encode_image(image) + [vocab.sep]
    assert vocab.decode(u.target) == ["six", "is", "even", "<eos>"]
    g = digits.generation_example(vocab, image, 6)
    assert vocab.decode(g.prompt) == ["<bos>", "draw", "a", "six", "<sep>", "<boi>"]
    assert g.target[:64] == vocab.image_to_codes(image) and g.target[64:] == [vocab.end_image, vocab.eos]


def test_collate_pads_and_masks_the_prompt(vocab):
    image = _hand_made_digit(2, 2)
    short = digits.Example(prompt=[vocab.bos, 5], target=[6, vocab.eos])
    examples = [digits.understanding_example(vocab, digits.CONTINUAL_TASKS[2], image, 9), short]
    batch = digits.collate(examples, vocab.pad)
    length = len(examples[0].prompt) + len(examples[0].target)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, length)
    n_prompt = len(examples[0].prompt)
    assert (batch["labels"][0, :n_prompt] == digits.IGNORE_INDEX).all()
    answer = vocab.encode_words(["nine", "plus", "one", "is", "one", "zero"]) + [vocab.eos]
    assert batch["labels"][0, n_prompt:].tolist() == answer
    assert batch["labels"][1].tolist() == [-100, -100, 6, vocab.eos] + [-100] * (length - 4)
    assert batch["input_ids"][1, 4:].eq(vocab.pad).all() and batch["attention_mask"][1].sum() == 4


def test_split_is_fixed_and_stratified():
    a, b = digits.load_digits_split(seed=0), digits.load_digits_split(seed=0)
    np.testing.assert_array_equal(a.test_images, b.test_images)
    assert len(a.train_images) + len(a.test_images) == 1797
    assert set(a.test_labels.tolist()) == set(range(10))


# ----------------------------------------------------------------------------- model, cache, evaluation

TINY_MODEL = dm.DigitsModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY_PRETRAIN = dm.PretrainConfig(steps=3, understanding_rows=4, generation_rows=4, text_rows=2, warmup_steps=1)


def test_pretraining_cache_is_written_reused_and_corruption_detected(tmp_path):
    first = dm.load_or_pretrain(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path, progress=False)
    assert not first.from_cache and first.cache_path.exists()
    assert not list(tmp_path.glob("*.tmp"))  # the temp file was renamed, not left behind

    second = dm.load_or_pretrain(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path, progress=False)
    assert second.from_cache
    for name, tensor in first.model.state_dict().items():
        torch.testing.assert_close(second.model.state_dict()[name], tensor, rtol=0, atol=0)

    other = dm.PretrainConfig(steps=4, understanding_rows=4, generation_rows=4, text_rows=2, warmup_steps=1)
    assert dm.cache_key(first.vocab, TINY_MODEL, other) != dm.cache_key(first.vocab, TINY_MODEL, TINY_PRETRAIN)

    raw = bytearray(first.cache_path.read_bytes())
    raw[-10] ^= 0xFF  # flip a byte inside the last tensor: still parses, checksum catches it
    first.cache_path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="checksum"):
        rebuilt = dm.load_or_pretrain(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path, progress=False)
    assert not rebuilt.from_cache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dm.load_or_pretrain(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path, progress=False).from_cache

    first.cache_path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert not dm.load_or_pretrain(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path, progress=False).from_cache


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("MODE_CACHE_DIR", str(tmp_path))
    assert dm.default_cache_dir() == tmp_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dm.load_or_pretrain(TINY_MODEL, TINY_PRETRAIN, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


def test_greedy_decode_matches_full_forward(tiny):
    """KV-cached greedy decoding picks the argmax of a full forward over the final sequence."""
    vocab, data = tiny.vocab, tiny.data
    prompts = torch.tensor([digits.understanding_prompt(vocab, digits.DIGIT, x) for x in data.test_images[:4]])
    new = evaluation.greedy_decode(tiny.model, prompts, 3, eos_id=-1)  # never stops early
    full = torch.cat([prompts, new], dim=1)
    with torch.no_grad():
        logits = tiny.model(input_ids=full).logits
    expected = logits[:, prompts.shape[1] - 1:-1].argmax(-1)
    assert torch.equal(new, expected)


def test_task_scores_exact_match_digit_named_and_teacher_forced_answer_nll(tiny, monkeypatch):
    vocab, data = tiny.vocab, tiny.data
    images, labels = data.test_images[:6], data.test_labels[:6]
    task = digits.CONTINUAL_TASKS[2]
    examples = [digits.understanding_example(vocab, task, x, y) for x, y in zip(images, labels)]
    targets = [e.target for e in examples]
    # the gold NLL: the model's own full-vocabulary logits, one example at a time
    with torch.no_grad():
        nlls = [torch.nn.functional.cross_entropy(
            tiny.model(input_ids=torch.tensor([e.prompt + e.target])).logits[0, len(e.prompt) - 1:-1],
            torch.tensor(e.target), reduction="sum").item() for e in examples]

    # decoding replaced: rows 0, 3: right; rows 1, 4: the right digit in a wrong format; rows 2, 5: wrong
    def fake_decode(model, prompts, max_new_tokens, eos_id, prefilled=None):
        answers = {tuple(e.prompt): (e.target if i % 3 == 0 else e.target[:1] + [vocab.sep] if i % 3 == 1
                                     else [vocab.sep]) + [eos_id] * max_new_tokens for i, e in enumerate(examples)}
        return torch.tensor([answers[tuple(p)][:max_new_tokens] for p in prompts.tolist()])

    monkeypatch.setattr(evaluation, "greedy_decode", fake_decode)
    scores = evaluation.task_scores(tiny.model, vocab, task, images, labels, batch_size=4)
    assert scores["acc"] == pytest.approx(2 / 6) and scores["digit_acc"] == pytest.approx(4 / 6)
    assert scores["answer_nll"] == pytest.approx(sum(nlls) / sum(len(t) for t in targets), rel=1e-5)


def test_task_scores_decode_from_the_prompts_they_score(tiny, monkeypatch):
    """task_scores runs the prompts once, scores the answers on a copy of their KV cache, then decodes
    from the same prompts: the same greedy answers as decoding alone."""
    vocab, data = tiny.vocab, tiny.data
    images, labels = data.test_images[:7], data.test_labels[:7]
    task = digits.CONTINUAL_TASKS[1]
    prompts = torch.tensor([digits.understanding_prompt(vocab, task, x) for x in images])
    alone = [evaluation.greedy_decode(tiny.model, rows, digits.MAX_ANSWER_TOKENS, vocab.eos)
             for rows in prompts.split(4)]
    decoded, greedy_decode = [], evaluation.greedy_decode

    def recorded(*args, **kwargs):
        assert kwargs.get("prefilled") is not None
        decoded.append(greedy_decode(*args, **kwargs))
        return decoded[-1]

    monkeypatch.setattr(evaluation, "greedy_decode", recorded)
    evaluation.task_scores(tiny.model, vocab, task, images, labels, batch_size=4)
    assert len(decoded) == 2 and all(torch.equal(a, b) for a, b in zip(decoded, alone))


def test_sampled_images_are_valid_and_seeded(tiny):
    labels = np.array([0, 3, 9])
    a = generation.sample_images(tiny.model, tiny.vocab, labels, seed=1)
    b = generation.sample_images(tiny.model, tiny.vocab, labels, seed=1)
    assert a.shape == (3, 8, 8) and a.min() >= 0 and a.max() <= 16
    np.testing.assert_array_equal(a, b)


def test_generation_metrics(tiny):
    classifier = generation.fit_digit_classifier(tiny.data)
    assert classifier.test_accuracy > 0.95
    result = generation.evaluate_generation(tiny.model, tiny.vocab, tiny.data, classifier,
                                    generation.GenerationConfig(samples_per_digit=2))
    assert 0.0 <= result["gen_acc"] <= 1.0
    assert 0.0 < result["image_nll"] < 10.0


def test_decoding_works_on_a_mode_model(tiny):
    """Decoding calls the model with input_ids only, so MoDE layers route every generated token.

    A fresh apply_mode (B = 0) equals its base model: same greedy answers, same seeded samples.
    The adapters are then perturbed so that routing matters, and sampling must still run.
    """
    import copy

    import mode

    vocab, data = tiny.vocab, tiny.data
    labels = np.array([1, 7])
    prompts = torch.tensor([digits.understanding_prompt(vocab, digits.DIGIT, x) for x in data.test_images[:4]])
    base_samples = generation.sample_images(tiny.model, vocab, labels, seed=3)
    base_answers = evaluation.greedy_decode(tiny.model, prompts, 3, eos_id=-1)
    model = copy.deepcopy(tiny.model)
    config = mode.MoDEConfig(rank=2, alpha=4, dropout=0.0, modality=mode.ModalitySpec(**vocab.modality_spec_args()))
    mode.apply_mode(model, config)
    np.testing.assert_array_equal(generation.sample_images(model, vocab, labels, seed=3), base_samples)
    assert torch.equal(evaluation.greedy_decode(model, prompts, 3, eos_id=-1), base_answers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    assert generation.sample_images(model, vocab, labels, seed=3).shape == (2, 8, 8)


def test_domains_design_shows_each_task_its_own_view_of_the_same_images(vocab):
    data = digits.load_digits_split()
    image, label = data.test_images[0], data.test_labels[0]
    shared, domains = digits.TASK_DESIGNS["shared"], digits.TASK_DESIGNS["domains"]
    assert [t.name for t in shared] == [t.name for t in domains] == [t.name for t in digits.CONTINUAL_TASKS]
    images = [vocab.codes_to_image(digits.understanding_prompt(vocab, t, image)[-66:-2]) for t in domains]
    np.testing.assert_array_equal(images[0], image)
    np.testing.assert_array_equal(images[1], 16 - image)
    np.testing.assert_array_equal(images[2], image.T)
    assert (images[3] >= image).all() and images[3].sum() > image.sum()  # dilated strokes
    assert len({im.tobytes() for im in images}) == 4
    for task in shared:  # the shared design keeps every task's images upright
        assert digits.understanding_example(vocab, task, image, label).prompt[-66:-2] == vocab.image_to_codes(image)
    marked = [t.view(image) for t in digits.TASK_DESIGNS["marked"]]
    for view, border in zip(marked, ("top", "left", "bottom", "right")):
        bar = digits.BORDERS[border]
        assert (view[bar] == 16).all()
        view[bar] = image[bar]
        np.testing.assert_array_equal(view, image)  # the rest of the image untouched
    for task in domains + digits.TASK_DESIGNS["marked"]:  # answers do not depend on the view
        same = next(t for t in shared if t.name == task.name)
        assert task.answer(image, label) == same.answer(image, label)
        for x in data.test_images[:50]:
            vocab.image_to_codes(task.view(x))  # valid gray levels
