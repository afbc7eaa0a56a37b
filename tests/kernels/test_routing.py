import pytest
import torch

import mode_kernels as mk
from mode_kernels.routing import max_tiles


def _check_plan(ids, num_modalities, block_m):
    plan = mk.plan_routing(ids, num_modalities, block_m=block_m)
    flat = ids.reshape(-1)
    # order is a stable sort by modality
    assert torch.equal(plan.order, torch.sort(flat, stable=True).indices)
    counts = torch.bincount(flat, minlength=num_modalities)
    assert plan.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert plan.tiles.shape == (max_tiles(flat.numel(), num_modalities, block_m), 3)
    covered = []
    for m, start, end in plan.tiles.tolist():
        assert 0 <= end - start <= block_m
        if end > start:
            assert plan.offsets[m] <= start and end <= plan.offsets[m + 1]
            assert (flat[plan.order[start:end]] == m).all()
            covered.extend(range(start, end))
    assert covered == list(range(flat.numel()))  # every ordered row in exactly one tile, in order
    return plan


@pytest.mark.parametrize("shape", [(0,), (1,), (5, 37), (300,)])
@pytest.mark.parametrize("num_modalities", [1, 2, 3, 8])
def test_plan_covers_every_token_once(shape, num_modalities):
    torch.manual_seed(0)
    _check_plan(torch.randint(0, num_modalities, shape), num_modalities, 16)


def test_plan_spans_and_absent_modality():
    ids = torch.cat([torch.zeros(40), torch.full((70,), 2), torch.zeros(3)]).long()
    plan = _check_plan(ids, 3, 32)
    assert plan.counts().tolist() == [43, 0, 70]
    real = [t for t in plan.tiles.tolist() if t[2] > t[1]]
    assert [t[0] for t in real] == [0, 0, 2, 2, 2]  # 43 -> 2 tiles, 70 -> 3 tiles, none for modality 1


def test_plan_rejects_bad_ids():
    with pytest.raises(ValueError, match="modality"):
        mk.plan_routing(torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="modality"):
        mk.plan_routing(torch.tensor([-1, 0]), 2)
    with pytest.raises(ValueError, match="modality"):
        mk.plan_routing(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="num_modalities"):
        mk.plan_routing(torch.tensor([0]), 0)
    with pytest.raises(ValueError, match="block_m"):
        mk.plan_routing(torch.tensor([0]), 1, block_m=24)
