import pytest
import torch

import mode_kernels as mk


def _check_plan(ids, num_modalities):
    plan = mk.plan_routing(ids, num_modalities)
    flat = ids.reshape(-1)
    # order is a stable sort by modality
    assert torch.equal(plan.order, torch.sort(flat, stable=True).indices)
    counts = torch.bincount(flat, minlength=num_modalities)
    assert plan.offsets.tolist() == [0] + torch.cumsum(counts, 0).tolist()
    assert plan.modality.dtype == torch.int32 and plan.modality.tolist() == flat.tolist()
    assert plan.num_tokens == flat.numel() and plan.counts().tolist() == counts.tolist()
    return plan


@pytest.mark.parametrize("shape", [(0,), (1,), (5, 37), (300,)])
@pytest.mark.parametrize("num_modalities", [1, 2, 3, 8])
def test_plan_covers_every_token_once(shape, num_modalities):
    torch.manual_seed(0)
    _check_plan(torch.randint(0, num_modalities, shape), num_modalities)


def test_plan_spans_and_absent_modality():
    ids = torch.cat([torch.zeros(40), torch.full((70,), 2), torch.zeros(3)]).long()
    plan = _check_plan(ids, 3)
    assert plan.counts().tolist() == [43, 0, 70]


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


def test_plan_never_syncs_by_default_on_cuda(monkeypatch):
    """On CUDA the id range check is a device assertion unless sync checks are on: no .item(), no int()."""
    from mode_kernels import _validation

    calls = []
    monkeypatch.setattr(_validation, "sync_checks_enabled", lambda device: False)
    monkeypatch.setattr(torch, "_assert_async", lambda *a, **k: calls.append(a))
    ids = torch.tensor([0, 1, 1])
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("host sync"))
    monkeypatch.setattr(torch.Tensor, "__int__", lambda self: pytest.fail("host sync"))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("host sync"))
    plan = mk.plan_routing(ids, 2)
    assert len(calls) == 1 and plan.num_modalities == 2
