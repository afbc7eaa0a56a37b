"""bench.run --interleave: each (op, shape) group timed round-robin in one pass, rows and ratios as usual."""
import json

import torch

from bench import run


def test_interleaved_groups_give_rows_with_medians_and_ratios(tmp_path):
    threads = torch.get_num_threads()
    try:
        assert run.main(["--device", "cpu", "--tiny", "--interleave", "2", "--filter", "routed LoRA",
                         "--output", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["interleaved_rounds"] == 2
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    assert rows and all(0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"] and r["peak_mem_mib"] >= 0 for r in rows)
    assert all(r["note"] == "interleaved, 2 rounds" for r in rows)
    ours = [r for r in rows if r["impl"].startswith("ours")]
    assert ours and all("base linear (floor)" in r["ratios"] for r in ours)
