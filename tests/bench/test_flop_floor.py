"""The routed-LoRA FLOP floor of the benchmark's summary: the formula on a hand-counted case, and the column."""
import pytest

from bench import run
from bench.roofline import routed_lora_flop_floor


def test_flop_floor_of_a_hand_counted_case():
    # K=2, N=3, rank 1, experts (2, 1); one text token, one image token.
    # text: shrink 2 A columns + 2 router logits = 4 columns over K, expand 2 columns over N:
    #       3 * (4 * 2 + 2 * 3) = 42 multiply-adds; image: 1 column each way: 3 * (1 * 2 + 1 * 3) = 15.
    # base: 2 tokens * 2 * K * N = 24. Floor: 1 + 57 / 24.
    assert routed_lora_flop_floor(2, 3, [1, 1], (2, 1), 1) == pytest.approx(1 + 57 / 24)
    # A single expert has no router: image tokens only, 3 * (1 * 2 + 1 * 3) per token over 2 * 6.
    assert routed_lora_flop_floor(2, 3, [0, 4], (2, 1), 1) == pytest.approx(1 + 15 / 12)
    assert routed_lora_flop_floor(2, 3, [0, 0], (2, 1), 1) == 1.0


def test_flop_floor_at_the_bench_shapes():
    # Experts (4, 1), rank 8: a text token 3 * (36 K + 32 N), an image token 3 * (8 K + 8 N) multiply-adds.
    # K=256 N=688, 358 text + 154 image tokens: (358 * 93696 + 154 * 22656) / (512 * 352256) = 0.20533.
    assert routed_lora_flop_floor(256, 688, [358, 154], (4, 1), 8) == pytest.approx(1.20533, abs=1e-5)
    # K=512 N=1376, 1536 text + 512 image: (1536 * 187392 + 512 * 45312) / (2048 * 1409024) = 0.10779.
    assert routed_lora_flop_floor(512, 1376, [1536, 512], (4, 1), 8) == pytest.approx(1.10779, abs=1e-5)


def test_summary_shows_the_flop_floor_on_the_first_row_of_its_group():
    rows = [{"op": "routed LoRA fwd+bwd", "shape": "s", "impl": impl, "status": "ok", "median_ms": 1.0,
             "peak_mem_mib": 1.0, "ratios": {}, "flop_floor": 1.2345} for impl in ("base linear (floor)", "ours")]
    rows.append({"op": "KD loss fwd+bwd", "shape": "k", "impl": "naive", "status": "ok", "median_ms": 1.0,
                 "peak_mem_mib": 1.0, "ratios": {}})  # no flop_floor, as in results.json of earlier runs
    header, _, first, second, kd = run.summary_table(rows)
    assert header.endswith("| FLOP floor (estimate) |")
    assert first.endswith("| 1.23x |") and second.endswith("|  |") and kd.endswith("|  |")
