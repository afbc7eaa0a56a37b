"""ModalitySpec: which tokens are image tokens, batched, on device, continued across chunks."""
import subprocess
import sys

import pytest
import torch
from host_sync import NoHostSync

import mode

SPEC = mode.ModalitySpec(image_token_ranges=((10, 20),), begin_image=21, end_image=20)


def test_rule_ranges_markers_and_between():
    #            text text <boi> code text code <eoi> text code(outside) text
    ids = torch.tensor([[1, 2, 21, 12, 3, 19, 20, 4, 15, 5]])
    assert SPEC.modality_ids(ids).tolist() == [[0, 0, 1, 1, 1, 1, 1, 0, 1, 0]]


def test_batched_rows_are_independent_and_any_leading_shape():
    ids = torch.tensor([[21, 3, 3, 20, 3], [3, 3, 21, 3, 3]])
    expected = [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert SPEC.modality_ids(ids).tolist() == expected
    ids3 = torch.stack([ids, ids.flip(0)])  # [2, 2, T]
    assert SPEC.modality_ids(ids3).tolist() == [expected, expected[::-1]]
    assert SPEC.modality_ids(ids).dtype == torch.int64


def test_stray_end_marker_and_repeated_begin():
    ids = torch.tensor([[3, 20, 3, 21, 21, 3, 20, 20, 3]])
    assert SPEC.modality_ids(ids).tolist() == [[0, 1, 0, 1, 1, 1, 1, 1, 0]]


@pytest.mark.parametrize("split", range(0, 11))
def test_chunks_with_carried_state_equal_the_whole(split):
    torch.manual_seed(split)
    ids = torch.randint(0, 24, (3, 10))
    ids[0, 2], ids[1, 0], ids[2, 7] = 21, 21, 21
    whole = SPEC.modality_ids(ids)
    first, inside = SPEC.modality_ids_and_state(ids[:, :split])
    second, after = SPEC.modality_ids_and_state(ids[:, split:], inside)
    assert torch.equal(torch.cat([first, second], dim=1), whole)
    _, whole_after = SPEC.modality_ids_and_state(ids)
    assert torch.equal(after, whole_after)


def test_one_token_steps_as_in_cached_generation():
    ids = torch.tensor([[3, 21, 3, 12, 20, 3]])
    inside, steps = None, []
    for t in range(ids.shape[1]):
        step, inside = SPEC.modality_ids_and_state(ids[:, t:t + 1], inside)
        steps.append(step)
    assert torch.cat(steps, dim=1).tolist() == [[0, 1, 1, 1, 1, 0]]


def test_chameleon_preset():
    spec = mode.ModalitySpec.chameleon()
    assert spec.image_token_ranges == ((4, 8196),) and (spec.begin_image, spec.end_image) == (8197, 8196)
    ids = torch.tensor([[3, 4, 8195, 8198, 8197, 5, 8196, 8198]])
    assert spec.modality_ids(ids).tolist() == [[0, 1, 1, 0, 1, 1, 1, 0]]


def test_ranges_only_spec():
    spec = mode.ModalitySpec(image_token_ranges=((10, 20), (30, 32)))
    assert spec.modality_ids(torch.tensor([9, 10, 19, 20, 30, 31, 32])).tolist() == [0, 1, 1, 0, 1, 1, 0]


def test_no_host_sync():
    ids = torch.randint(0, 24, (4, 9))
    with NoHostSync():
        out, inside = SPEC.modality_ids_and_state(ids, torch.zeros(4, dtype=torch.bool))
    assert torch.equal(out, SPEC.modality_ids(ids)) and inside.shape == (4,)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        ids.sum().item()


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_token_ranges=((5, 5),)), "lo < hi"),
    (dict(image_token_ranges=((1, 2),), begin_image=3), "both markers"),
    (dict(image_token_ranges=((1, 2),), begin_image=3, end_image=3), "must differ"),
    (dict(), "every token is text"),
    (dict(image_token_ranges=(5,)), "pairs"),
])
def test_bad_spec(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mode.ModalitySpec(**kwargs)


def test_bad_input_ids():
    with pytest.raises(ValueError, match="input_ids: expected an integer tensor"):
        SPEC.modality_ids(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="inside_image: expected shape \\[2\\]"):
        SPEC.modality_ids(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, dtype=torch.bool))


def test_import_mode_is_cheap():
    code = ("import sys, mode; assert 'apply_mode' in dir(mode); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'mode.digits', 'mode.train') "
            "if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
