"""The `digits` benchmark: data, unified vocabulary, tasks and training examples.

Real data: scikit-learn's bundled `load_digits` (1797 handwritten 8x8 digits, gray levels
0..16; no download). One tiny unified vocabulary holds text words and image codes, so a
single decoder both answers questions about an image and draws one:

    understanding:  bos what digit is this ? <boi> c_0 .. c_63 <eoi> sep  ->  seven eos
    generation:     bos draw a seven sep <boi>                            ->  c_0 .. c_63 <eoi> eos

An image is 64 codes, one per pixel in row-major order, code = IMAGE_CODE_BASE + gray level.
The codes form one contiguous id range and the markers sit right after it, which is what
`mode.ModalitySpec` needs to tell image tokens from text tokens by id alone
(see `DigitsVocab.modality_spec_args`).

    text:           bos seven is odd eos

Pretraining teaches questions about the image (`PRETRAIN_QUESTIONS`: by default what the digit
is, whether it is prime, and its square), generation and the text facts; the continual tasks
(`CONTINUAL_TASKS`, understanding only, in this fixed order) each ask something else about the
same images and answer with one of those facts ("is this digit even or odd ?" -> seven is odd).
The pretrained model and the evaluation functions are in `mode.digits_model`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from ...constants import IGNORE_INDEX

IMAGE_SIDE = 8
IMAGE_PIXELS = IMAGE_SIDE * IMAGE_SIDE
GRAY_LEVELS = 17  # load_digits pixels are integers 0..16

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# ----------------------------------------------------------------------------- vocabulary

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<sep>")
WORDS = DIGIT_NAMES + (
    "what", "digit", "is", "this", "?", "draw", "a",
    "even", "or", "odd", "greater", "than", "not", "plus", "times",
)
# Words that only the extra pretraining questions use (`PRETRAIN_QUESTIONS`): in the vocabulary
# only when pretraining asks those questions, so the default model is the same with or without them.
PRETRAIN_QUESTION_WORDS = {"one": (), "several": ("prime", "squared")}
DEFAULT_PRETRAIN_QUESTIONS = "several"  # see `PRETRAIN_QUESTIONS`


class DigitsVocab:
    """Token ids: specials, then words (with those of the pretraining ``questions``), then the 17
    image codes, then <boi> and <eoi>.

    Every id below `image_code_base` is text; ids in [image_code_base, image_code_base + 17)
    are gray levels 0..16; `begin_image` / `end_image` are the markers around the 64 codes.
    """

    def __init__(self, questions: str = DEFAULT_PRETRAIN_QUESTIONS):
        if questions not in PRETRAIN_QUESTION_WORDS:
            raise ValueError(f"questions must be one of {sorted(PRETRAIN_QUESTION_WORDS)}, got {questions!r}")
        self.tokens: list[str] = list(SPECIAL_TOKENS) + list(WORDS) + list(PRETRAIN_QUESTION_WORDS[questions])
        self.image_code_base = len(self.tokens)
        self.tokens += [f"<img{level}>" for level in range(GRAY_LEVELS)]
        self.begin_image = len(self.tokens)
        self.end_image = self.begin_image + 1
        self.tokens += ["<boi>", "<eoi>"]
        self.id_of = {token: i for i, token in enumerate(self.tokens)}
        self.pad, self.bos, self.eos, self.sep = (self.id_of[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def image_code_range(self) -> tuple[int, int]:
        """[lo, hi) of the image codes."""
        return self.image_code_base, self.image_code_base + GRAY_LEVELS

    def modality_spec_args(self) -> dict:
        """Keyword arguments of `mode.ModalitySpec` for this vocabulary."""
        return {"image_token_ranges": (self.image_code_range,),
                "begin_image": self.begin_image, "end_image": self.end_image}

    def encode_words(self, words: Sequence[str]) -> list[int]:
        return [self.id_of[w] for w in words]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.tokens[i] for i in ids]

    def image_to_codes(self, image: np.ndarray) -> list[int]:
        """An 8x8 image of gray levels 0..16 -> its 64 codes, row-major (no markers)."""
        image = np.asarray(image)
        if image.shape != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(f"expected an {IMAGE_SIDE}x{IMAGE_SIDE} image, got shape {image.shape}")
        levels = image.reshape(-1).astype(np.int64)
        if levels.min() < 0 or levels.max() >= GRAY_LEVELS or not np.array_equal(levels, image.reshape(-1)):
            raise ValueError(f"image pixels must be integers in 0..{GRAY_LEVELS - 1}")
        return (levels + self.image_code_base).tolist()

    def codes_to_image(self, codes: Sequence[int]) -> np.ndarray:
        """64 image codes -> the 8x8 image of gray levels (int64)."""
        codes = np.asarray(codes, dtype=np.int64)
        lo, hi = self.image_code_range
        if codes.shape != (IMAGE_PIXELS,) or codes.min() < lo or codes.max() >= hi:
            raise ValueError(f"expected {IMAGE_PIXELS} image codes in [{lo}, {hi})")
        return (codes - lo).reshape(IMAGE_SIDE, IMAGE_SIDE)

    def encode_image(self, image: np.ndarray) -> list[int]:
        """<boi> 64 codes <eoi>."""
        return [self.begin_image] + self.image_to_codes(image) + [self.end_image]


# ----------------------------------------------------------------------------- data

@dataclass
class DigitsData:
    """The fixed train/test split; images are int64 [N, 8, 8] gray levels, labels int64 [N]."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """load_digits, split once with a seeded stratified shuffle (every digit in both parts)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.int64)  # stored as float, values are exact integers
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    return DigitsData(train_x, train_y, test_x, test_y)


# ----------------------------------------------------------------------------- tasks

def upright(image: np.ndarray) -> np.ndarray:
    """The image as load_digits has it: the only view pretraining shows."""
    return image


def inverted(image: np.ndarray) -> np.ndarray:
    """Light strokes on a dark ground: every gray level g becomes 16 - g."""
    return (GRAY_LEVELS - 1) - image


def transposed(image: np.ndarray) -> np.ndarray:
    """Mirrored across the main diagonal (a quarter turn and a flip)."""
    return image.T.copy()


def thickened(image: np.ndarray) -> np.ndarray:
    """Strokes dilated by a 2x2 maximum filter."""
    padded = np.pad(image, ((0, 1), (0, 1)))
    return np.maximum.reduce([padded[:-1, :-1], padded[1:, :-1], padded[:-1, 1:], padded[1:, 1:]])


BORDERS = {"top": (0, slice(None)), "left": (slice(None), 0), "bottom": (-1, slice(None)), "right": (slice(None), -1)}


def barred(border: str) -> Callable[[np.ndarray], np.ndarray]:
    """A view: the upright image with one border line (top, left, bottom, right) at full ink;
    load_digits' strokes seldom reach the border, so the digit stays as readable as upright."""
    def view(image: np.ndarray) -> np.ndarray:
        out = image.copy()
        out[BORDERS[border]] = GRAY_LEVELS - 1
        return out

    return view


@dataclass(frozen=True)
class Task:
    """An understanding task: a fixed question about the image (shown in its ``view``) and its answer words."""
    name: str
    question: tuple[str, ...]
    answer: Callable[[np.ndarray, int], tuple[str, ...]]  # (image [8, 8], digit label) -> words
    view: Callable[[np.ndarray], np.ndarray] = upright  # how the task shows its images


def _digit_name(image, label):
    return (DIGIT_NAMES[label],)


def _spelled(number: int) -> tuple[str, ...]:
    # numbers past nine are spelled digit by digit: 14 -> "one four"
    return tuple(DIGIT_NAMES[int(ch)] for ch in str(number))


# The continual tasks answer with a sentence that starts with the digit's name and states a
# fact about it ("seven is odd"). Pretraining teaches the same sentences as text
# (`text_facts`), so the answer words are pretraining targets and a task teaches a new
# question about the image, not new words. Measured before this design: with one-word answers
# ("odd") never seen in pretraining and the question after the image, LoRA on the MLPs stayed
# near chance (0.47-0.62 on parity in 60-150 steps) although a linear probe of the hidden state
# read parity at 0.85; with these sentences and the question first it learns each task to
# 0.42-0.78 in 60 steps.
def _parity(image, label):
    return (DIGIT_NAMES[label], "is", "even" if label % 2 == 0 else "odd")


def _greater_than_four(image, label):
    verdict = ("is",) if label > 4 else ("is", "not")
    return (DIGIT_NAMES[label],) + verdict + ("greater", "than", "four")


def _plus_one(image, label):
    return (DIGIT_NAMES[label], "plus", "one", "is") + _spelled(label + 1)


def _times_two(image, label):
    return (DIGIT_NAMES[label], "times", "two", "is") + _spelled(2 * label)


def _prime(image, label):
    verdict = ("is",) if label in (2, 3, 5, 7) else ("is", "not")
    return (DIGIT_NAMES[label],) + verdict + ("prime",)


def _squared(image, label):
    return (DIGIT_NAMES[label], "squared", "is") + _spelled(label * label)


DIGIT = Task("digit", ("what", "digit", "is", "this", "?"), _digit_name)
# Pretraining questions about the image (--pretrain-questions). 'one' asks only what the digit is,
# so the answer never depends on the question; 'several' (the default) adds two questions, each with
# its own answer format after the digit's name and disjoint from the continual tasks' skills, so that
# the frozen attention learns to carry the question to the answer positions. Measured (pretraining
# seed 0, seed 0, 60 steps a task): sequential LoRA learns the four continual tasks to 0.71 0.74 0.62
# 0.53 exact match after 'several' against 0.34 0.28 0.17 0.21 after 'one', and joint training ends
# at 0.73 0.79 0.72 0.64 against 0.51 0.45 0.18 0.40; sequential LoRA still forgets every earlier task.
PRIME = Task("prime", ("is", "this", "digit", "prime", "?"), _prime)
SQUARED = Task("squared", ("what", "is", "this", "digit", "squared", "?"), _squared)
PRETRAIN_QUESTIONS = {"one": (DIGIT,), "several": (DIGIT, PRIME, SQUARED)}
CONTINUAL_TASKS = (
    Task("parity", ("is", "this", "digit", "even", "or", "odd", "?"), _parity),
    Task("greater_than_four", ("is", "this", "digit", "greater", "than", "four", "?"), _greater_than_four),
    Task("plus_one", ("what", "is", "this", "digit", "plus", "one", "?"), _plus_one),
    Task("times_two", ("what", "is", "this", "digit", "times", "two", "?"), _times_two),
)
# The continual tasks of each benchmark design (--digits-tasks):
#   shared   every task on the same upright images: a task is told apart by its question alone,
#            which comes 66 tokens before the answer (pretrained with --pretrain-questions one, every
#            sequential method forgot each earlier task completely: answer-format collapse, the right
#            digit in the last task's format)
#   domains  each task shows its images its own way (upright, inverted, transposed, thickened), as
#            real task sequences differ in their images: the task is visible in 64 of the prompt's tokens
#   marked   upright images with a bar of full ink on one border per task (top, left, bottom, right):
#            the task is visible in 8 image tokens, the digit as readable as in pretraining
TASK_DESIGNS = {
    "shared": CONTINUAL_TASKS,
    "domains": tuple(replace(task, view=view)
                     for task, view in zip(CONTINUAL_TASKS, (upright, inverted, transposed, thickened))),
    "marked": tuple(replace(task, view=barred(border)) for task, border in zip(CONTINUAL_TASKS, BORDERS)),
}
TASKS = {task.name: task for task in (DIGIT,) + CONTINUAL_TASKS}
MAX_ANSWER_TOKENS = 7  # longest answer ("nine times two is one eight") + eos


def text_facts() -> list[tuple[str, ...]]:
    """The text-only sentences of pretraining: every continual answer, for every digit."""
    return [task.answer(None, digit) for task in CONTINUAL_TASKS for digit in range(10)]


# ----------------------------------------------------------------------------- examples

@dataclass
class Example:
    """A prompt and its target; the loss is on the target only."""
    prompt: list[int]
    target: list[int]


def understanding_prompt(vocab: DigitsVocab, task: Task, image: np.ndarray) -> list[int]:
    # The question comes first, so the positions that read the image and answer end every prompt
    # in the same way (<eoi> sep): what pretraining learnt there carries over to new questions.
    return [vocab.bos] + vocab.encode_words(task.question) + vocab.encode_image(task.view(image)) + [vocab.sep]


def understanding_example(vocab: DigitsVocab, task: Task, image: np.ndarray, label: int) -> Example:
    answer = vocab.encode_words(task.answer(image, int(label)))
    return Example(understanding_prompt(vocab, task, image), answer + [vocab.eos])


def generation_prompt(vocab: DigitsVocab, digit: int) -> list[int]:
    return [vocab.bos] + vocab.encode_words(("draw", "a", DIGIT_NAMES[digit])) + [vocab.sep, vocab.begin_image]


def generation_example(vocab: DigitsVocab, image: np.ndarray, label: int) -> Example:
    return Example(generation_prompt(vocab, int(label)),
                   vocab.image_to_codes(image) + [vocab.end_image, vocab.eos])


def text_example(vocab: DigitsVocab, words: Sequence[str]) -> Example:
    """A text-only sentence, scored on every token after bos."""
    return Example([vocab.bos], vocab.encode_words(words) + [vocab.eos])


def task_examples(vocab: DigitsVocab, task: Task, images: np.ndarray, labels: np.ndarray) -> list[Example]:
    return [understanding_example(vocab, task, x, y) for x, y in zip(images, labels)]


def generation_examples(vocab: DigitsVocab, images: np.ndarray, labels: np.ndarray) -> list[Example]:
    """The generation stream: "draw a <digit>" -> the image (also the KD stream of MoDE)."""
    return [generation_example(vocab, x, y) for x, y in zip(images, labels)]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (IGNORE_INDEX on prompt and pad).

    labels are aligned with input_ids (Hugging Face causal LMs shift them internally).
    """
    length = max(len(e.prompt) + len(e.target) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, e in enumerate(examples):
        n_prompt, n = len(e.prompt), len(e.prompt) + len(e.target)
        input_ids[row, :n] = torch.tensor(e.prompt + e.target)
        labels[row, n_prompt:n] = torch.tensor(e.target)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
