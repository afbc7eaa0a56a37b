"""TeacherCache: the teacher's top k from the cache equals the teacher computed on the batch; a second build
reads the file; any change of the key computes another."""
import pytest
import torch
from tiny_models import IMAGE_HI, IMAGE_LO, config, image_sequence, randomize_adapters, tiny_model

import mode
from mode.kd_cache import ROW_IDS, TeacherCache


@pytest.fixture(scope="module")
def stream():
    """A model (random adapters) and five rows of its stream: a caption (no target), then image codes; row 1
    with fewer distilled positions."""
    ids = image_sequence(5, seed=3)
    labels = ids.masked_fill(torch.arange(ids.shape[1]) < 4, -100)
    labels[1, 12:] = -100
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels)]
    return randomize_adapters(mode.apply_mode(tiny_model(), config()), std=0.5), rows


def collate(rows):
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]}


def _build(directory, model, rows, k=20, temperature=2.0, vocab_range=(IMAGE_LO, IMAGE_HI), logsumexp=False):
    return TeacherCache.load_or_build(directory, model, rows, collate, k=k, temperature=temperature,
                                      vocab_range=vocab_range, logsumexp=logsumexp, batch_size=2, progress=False)


@pytest.mark.parametrize("k, tail", [(20, False), (6, True)])
def test_the_loss_from_the_cache_equals_the_loss_from_the_teacher(tmp_path, stream, k, tail):
    model, rows = stream
    cache = _build(tmp_path, model, rows, k=k, logsumexp=tail)
    assert cache.indices.dtype == torch.uint8  # ids relative to the 20-code slice
    picked = [3, 1, 1, 0]
    batch = {**collate([rows[i] for i in picked]), ROW_IDS: torch.tensor(picked)}
    computed = mode.kd_teacher_topk(model, batch, k, logsumexp=tail)
    for reduction in ("sum", "none"):
        want = mode.kd_loss(model, batch, teacher=computed, topk_tail=tail, reduction=reduction)
        got = mode.kd_loss(model, batch, teacher=cache.lookup(batch), topk_tail=tail, reduction=reduction)
        assert torch.equal(got, want)


def test_a_second_build_reads_the_file_and_a_changed_key_computes_another(tmp_path, stream):
    model, rows = stream
    first = _build(tmp_path, model, rows)
    again = _build(tmp_path, model, rows)
    assert first.computed and not again.computed and again.path == first.path and first.nbytes > 0
    assert torch.equal(again.logits, first.logits) and torch.equal(again.indices, first.indices)
    changed_weights = mode.apply_mode(tiny_model(), config())
    with torch.no_grad():
        changed_weights.get_output_embeddings().weight[IMAGE_LO] += 1.0
    changes = [_build(tmp_path, model, rows, k=8), _build(tmp_path, model, rows, temperature=1.0),
               _build(tmp_path, model, rows, vocab_range=(IMAGE_LO, IMAGE_HI - 1), k=8),
               _build(tmp_path, model, rows, logsumexp=True), _build(tmp_path, model, rows[:4]),
               _build(tmp_path, changed_weights, rows)]
    assert all(c.computed for c in changes)
    assert len({c.path for c in [first, *changes]}) == 7 == len(list(tmp_path.glob("*.safetensors")))


def test_a_batch_without_row_ids_or_of_other_rows_raises(tmp_path, stream):
    model, rows = stream
    cache = _build(tmp_path, model, rows)
    with pytest.raises(ValueError, match="row_ids"):
        cache.lookup(collate(rows[:2]))
    with pytest.raises(ValueError, match="distilled positions differ"):
        cache.lookup({**collate(rows[:2]), ROW_IDS: torch.tensor([1, 0])})
