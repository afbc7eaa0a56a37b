"""mode.jsonl_data: pre-tokenized JSONL records, per-line validation (skip / refuse), collate."""
import json

import pytest
import torch

from mode.constants import IGNORE_INDEX
from mode.modality import ModalitySpec
from mode.workloads.hf_model.data import TokenChecks, collate, load_jsonl

VOCAB = 50


def write_lines(path, lines):
    """Each entry: a dict (dumped as JSON) or a raw string, one per line."""
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def test_labels_and_answer_start_records(tmp_path):
    path = write_lines(tmp_path / "vqa.jsonl", [
        {"input_ids": [1, 2, 3, 4], "answer_start": 2},
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "id": "extra fields are ignored"},
        {"input_ids": [8, 9], "answer_start": 1, "task": "other"},
    ])
    data = load_jsonl(path, VOCAB)
    assert len(data) == 3
    assert data[0]["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 3, 4]
    assert data[1]["labels"].tolist() == [IGNORE_INDEX, 6, 7]
    assert data[0]["input_ids"].dtype == torch.long
    assert data.tasks == ["vqa", "vqa", "other"]  # the file's stem when a record names no task
    assert data.task_names() == ["vqa", "other"]
    assert data.sources[2].endswith("vqa.jsonl:3")
    other = data.task("other")
    assert len(other) == 1 and other[0]["input_ids"].tolist() == [8, 9]
    with pytest.raises(KeyError, match="no task 'missing'"):
        data.task("missing")


def test_several_files_keep_their_order(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [{"input_ids": [1, 2], "answer_start": 1}])
    b = write_lines(tmp_path / "b.jsonl", [{"input_ids": [3, 4], "answer_start": 1}])
    assert load_jsonl([b, a], VOCAB).task_names() == ["b", "a"]


BAD_RECORDS = [
    ("", "empty line"),
    ("{not json", "bad JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"answer_start": 1}, "missing field 'input_ids'"),
    ({"input_ids": "1 2 3", "answer_start": 1}, "input_ids: expected a list of ints"),
    ({"input_ids": [1, 2.0], "answer_start": 1}, "input_ids: expected a list of ints"),
    ({"input_ids": [1, True], "answer_start": 1}, "input_ids: expected a list of ints"),
    ({"input_ids": [], "answer_start": 1}, "input_ids: empty"),
    ({"input_ids": [1, VOCAB], "answer_start": 1}, f"input_ids\\[1\\] = {VOCAB} is outside the vocabulary"),
    ({"input_ids": [-1, 2], "answer_start": 1}, "input_ids\\[0\\] = -1 is outside"),
    ({"input_ids": [1, 2]}, "expected exactly one of 'labels' and 'answer_start', got neither"),
    ({"input_ids": [1, 2], "labels": [-100, 2], "answer_start": 1},
     "expected exactly one of 'labels' and 'answer_start', got both"),
    ({"input_ids": [1, 2, 3], "labels": [-100, 2]}, "labels: 2 entries for 3 input_ids"),
    ({"input_ids": [1, 2], "labels": [-100, -100]}, "labels: every position is -100, nothing is scored"),
    ({"input_ids": [1, 2], "labels": [-100, -5]}, "labels\\[1\\] = -5 is neither -100"),
    ({"input_ids": [1, 2], "labels": [1, 2]}, "labels\\[0\\] must be -100"),
    ({"input_ids": [1, 2], "answer_start": 2}, "answer_start = 2 is out of range \\[1, 2\\)"),
    ({"input_ids": [1, 2], "answer_start": 0}, "answer_start = 0 is out of range"),
    ({"input_ids": [1, 2], "answer_start": "1"}, "answer_start: expected an int"),
    ({"input_ids": [1, 2], "answer_start": 1, "task": 3}, "task: expected a non-empty string"),
]


@pytest.mark.parametrize("bad, reason", BAD_RECORDS)
def test_each_bad_record_is_refused_with_line_and_reason(tmp_path, bad, reason):
    path = write_lines(tmp_path / "t.jsonl", [{"input_ids": [1, 2], "answer_start": 1}, bad])
    with pytest.raises(ValueError, match=f"t.jsonl:2: {reason}"):
        load_jsonl(path, VOCAB)


def test_skip_warns_with_count_and_first_reasons(tmp_path):
    good = {"input_ids": [1, 2, 3], "answer_start": 2}
    lines = [good] + [bad for bad, _ in BAD_RECORDS] + [good]
    path = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.warns(UserWarning) as caught:
        data = load_jsonl(path, VOCAB, on_error="skip")
    assert len(data) == 2 and data.sources[1].endswith(f"t.jsonl:{len(lines)}")
    message = str(caught[0].message)
    assert f"skipped {len(BAD_RECORDS)} bad record(s)" in message and "kept 2" in message
    assert "t.jsonl:2: empty line" in message and f"and {len(BAD_RECORDS) - 10} more" in message


def test_not_utf8_and_too_long(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"input_ids": [1, 2], "answer_start": 1}\n\xff\xfe\n')
    with pytest.raises(ValueError, match="t.jsonl:2: not UTF-8 text"):
        load_jsonl(path, VOCAB)
    path = write_lines(tmp_path / "long.jsonl", [{"input_ids": [1, 2, 3], "answer_start": 1}])
    with pytest.raises(ValueError, match="long.jsonl:1: input_ids: 3 tokens, longer than the maximum 2"):
        load_jsonl(path, VOCAB, max_length=2)


def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_jsonl(tmp_path / "missing.jsonl", VOCAB)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no record"):
        load_jsonl(tmp_path / "empty.jsonl", VOCAB, on_error="skip")
    path = write_lines(tmp_path / "allbad.jsonl", ["{", "{"])
    with pytest.raises(ValueError, match="no valid record"):
        load_jsonl(path, VOCAB, on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        load_jsonl(path, VOCAB, on_error="ignore")


def test_collate_right_pads():
    records = [{"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, 3])},
               {"input_ids": torch.tensor([4, 5]), "labels": torch.tensor([-100, 5])}]
    batch = collate(records, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, -100]]
    with pytest.raises(ValueError, match="no records"):
        collate([], pad_id=0)


# codes 10..19, begin 21, end 20, placeholder 22
CHECKS = TokenChecks(ModalitySpec(image_token_ranges=((10, 20),), begin_image=21, end_image=20), placeholder_id=22,
                     image_logits_masked=True)


@pytest.mark.parametrize("bad, message", [
    ({"input_ids": [1, 21, 22, 22, 20, 3], "answer_start": 5},
     r"t.jsonl:2: input_ids\[2\] = 22 is the processor's image placeholder, inside an image span \(2 such ids\): "
     "the image's VQ codes were not spliced in"),
    ({"input_ids": [1, 22, 4, 3], "answer_start": 3},
     r"t.jsonl:2: input_ids\[1\] = 22 is the processor's image placeholder, in the text \(1 such ids\): an image the "
     "processor never expanded"),
])
def test_placeholder_left_in_the_data_is_refused(tmp_path, bad, message):
    path = write_lines(tmp_path / "t.jsonl", [{"input_ids": [1, 21, 11, 12, 20, 4, 3], "answer_start": 6}, bad])
    with pytest.raises(ValueError, match=message):
        load_jsonl(path, VOCAB, checks=CHECKS)
    assert len(load_jsonl(path, VOCAB)) == 2  # without the model's checks both pass


def test_labels_on_masked_image_codes_are_refused(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [
        {"input_ids": [1, 21, 11, 20, 3], "answer_start": 4},
        {"input_ids": [1, 21, 11, 20, 3], "labels": [-100, -100, 11, -100, 3]},
    ])
    with pytest.raises(ValueError, match=r"t.jsonl:2: labels\[2\] = 11 scores an image code: this model's forward "
                                         "masks the logits of image codes .* the loss would be infinite"):
        load_jsonl(path, VOCAB, checks=CHECKS)
    unmasked = TokenChecks(CHECKS.spec, placeholder_id=22, image_logits_masked=False)  # e.g. Emu3, or --gen-data
    assert len(load_jsonl(path, VOCAB, checks=unmasked)) == 2
