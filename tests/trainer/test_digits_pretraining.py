"""The digits pretraining's configuration: its init scale and its questions about the image."""
from dataclasses import replace

import numpy as np
import pytest

from mode.workloads.digits import data as digits
from mode.workloads.digits import model as dm
from mode.workloads.digits.data import DigitsVocab


@pytest.fixture(scope="module")
def vocab():
    return DigitsVocab()


def test_initializer_range_sets_the_std_of_every_weight_matrix(vocab):
    config = dm.DigitsModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    for std in (0.02, 0.08):
        model = dm.build_model(vocab, replace(config, initializer_range=std))
        matrices = {name: p for name, p in model.named_parameters() if p.dim() == 2}
        assert len(matrices) == 9  # embeddings, q k v o, gate up down, lm_head
        for name, weight in matrices.items():
            assert abs(weight.std().item() - std) < 0.15 * std, name


def test_pretraining_questions_answer_in_their_own_formats():
    assert digits.PRETRAIN_QUESTIONS["one"] == (digits.DIGIT,)
    several = digits.PRETRAIN_QUESTIONS["several"]
    assert [t.name for t in several] == ["digit", "prime", "squared"]
    assert digits.PRIME.answer(None, 7) == ("seven", "is", "prime")
    assert digits.PRIME.answer(None, 9) == ("nine", "is", "not", "prime")
    assert digits.SQUARED.answer(None, 8) == ("eight", "squared", "is", "six", "four")
    continual_questions = {t.question for t in digits.CONTINUAL_TASKS}
    assert not continual_questions & {t.question for t in several}
    for label in range(10):  # every answer opens with the digit's name, as the continual answers do
        assert {t.answer(None, label)[0] for t in several} == {digits.DIGIT_NAMES[label]}


def test_the_vocabulary_holds_the_extra_questions_words_only_when_they_are_asked():
    one, several = DigitsVocab("one"), DigitsVocab("several")
    assert DigitsVocab().tokens == several.tokens and "prime" not in one.tokens
    assert set(several.tokens) - set(one.tokens) == {"prime", "squared"}
    with pytest.raises(ValueError, match="questions"):
        DigitsVocab("many")


def test_pretraining_streams_ask_every_configured_question_about_every_image():
    data = digits.load_digits_split()
    data = replace(data, train_images=data.train_images[:5], train_labels=data.train_labels[:5])
    for questions, tasks in digits.PRETRAIN_QUESTIONS.items():
        vocab = DigitsVocab(questions)  # also raises if a question's word were missing from it
        streams = dm.pretraining_streams(vocab, data, dm.PretrainConfig(questions=questions))
        rows, per_batch = streams["understanding"]
        assert per_batch == dm.PretrainConfig.understanding_rows
        expected = [digits.understanding_example(vocab, task, x, y).prompt
                    for task in tasks for x, y in zip(data.train_images, data.train_labels)]
        assert [r.prompt for r in rows] == expected
        assert len(streams["generation"][0]) == 5 and len(streams["text"][0]) == len(digits.text_facts())


def test_pretraining_questions_and_init_are_part_of_the_cache_key(vocab):
    key = dm.cache_key(vocab, dm.DigitsModelConfig(), dm.PretrainConfig())
    assert dm.cache_key(vocab, dm.DigitsModelConfig(), dm.PretrainConfig(questions="one")) != key
    assert dm.cache_key(vocab, dm.DigitsModelConfig(initializer_range=0.02), dm.PretrainConfig()) != key
    assert np.isclose(dm.DigitsModelConfig().initializer_range, 0.08)
