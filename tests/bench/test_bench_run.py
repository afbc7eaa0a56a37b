"""bench.run end to end at tiny CPU shapes: both result files, with the schema the README relies on."""
import json

import pytest
import torch

from bench import run
from bench.cases import Case, all_cases, sizes_for
from bench.model import image_span_modality

ROW_KEYS = {"op", "shape", "impl", "baseline", "status", "note", "median_ms", "min_ms", "max_ms", "peak_mem_mib",
            "tokens_per_s", "ratios", "device_name", "torch", "triton", "date"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()  # bench.run pins CPU threads; the rest of the session keeps its own
    try:
        assert run.main(["--quick", "--device", "cpu", "--tiny", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_every_op_and_baseline_is_measured(results):
    data, _ = results
    assert data["meta"]["device"] == "cpu" and data["meta"]["scaled_down"] is True
    rows = data["rows"]
    assert len(rows) == data["meta"]["cases_planned"]
    for row in rows:
        assert ROW_KEYS <= row.keys()
    ok = {(r["op"].split()[0], r["impl"]) for r in rows if r["status"] == "ok"}
    for impl in ("base linear (floor)", "naive MoDE layer", "PEFT loop", "ours (torch)"):
        assert ("routed", impl) in ok
    for impl in ("naive", "reference chunked (torch)", "ours on logits (torch)", "ours fused-linear (torch)"):
        assert ("KD", impl) in ok
    training = {impl for op, impl in ok if op == "training"}
    assert training == {"naive MoDE layers + naive KD", "mode.MoDELinear + fused-linear KD",
                        "ours, top-32 KD, teacher forward (no cache)", "ours, top-32 KD, teacher cache"}
    # Liger-Kernel is GPU-only: on CPU it is recorded as skipped with the reason, not dropped.
    liger = [r for r in rows if r["impl"] == "Liger fused linear JSD"]
    assert liger and all(r["status"] == "skipped" and r["note"] for r in liger)


def test_rows_carry_times_memory_and_ratios_to_baselines(results):
    data, _ = results
    for row in data["rows"]:
        if row["status"] != "ok":
            continue
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"]
        assert row["peak_mem_mib"] >= 0
        assert row["device_name"] and row["torch"] and row["date"]
    ours = next(r for r in data["rows"] if r["op"] == "routed LoRA fwd+bwd" and r["impl"] == "ours (torch)")
    assert {"base linear (floor)", "naive MoDE layer", "PEFT loop"} <= ours["ratios"].keys()
    floor = next(r for r in data["rows"] if r["op"] == "routed LoRA fwd+bwd" and r["impl"] == "base linear (floor)")
    assert ours["ratios"]["base linear (floor)"]["time"] == pytest.approx(ours["median_ms"] / floor["median_ms"])
    step = [r for r in data["rows"] if r["op"].startswith("training step")]
    assert all(r["tokens_per_s"] > 0 for r in step)


def _table_rows(markdown_section):
    return [line for line in markdown_section.splitlines() if line.startswith("| ") and not line.startswith("| op ")]


def test_markdown_has_a_summary_and_one_row_per_case_and_says_cpu_shapes_are_scaled_down(results):
    data, md = results
    assert "scaled-down shapes" in md
    summary, every_case = md.split("## Every case")
    assert len(_table_rows(every_case)) == len(data["rows"])
    fwd_bwd_ok = [r for r in data["rows"] if r["status"] == "ok" and "fwd+bwd" in r["op"]]
    assert len(_table_rows(summary)) == len(fwd_bwd_ok) + 4  # and the four training steps


def test_render_rewrites_the_markdown_of_a_results_file(results, tmp_path, capsys):
    data, md = results
    saved = tmp_path / "results.json"
    saved.write_text(json.dumps(data))
    assert run.main(["--render", str(saved)]) == 0
    assert (tmp_path / "results.md").read_text() == md


def test_a_failing_case_is_recorded_not_raised():
    def build():
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")

    row = run.run_case(Case("op", "shape", "impl", build), torch.device("cpu"), run.TINY_BUDGET)
    assert row["status"] == "OOM" and row["median_ms"] is None


def test_quick_cuda_profile_covers_the_issue_targets():
    # Enumerating cases allocates nothing, so the CUDA profile can be checked without a GPU.
    cases = all_cases(sizes_for(torch.device("cuda"), quick=True), torch.device("cuda"))
    shapes = {(c.op, c.shape) for c in cases}
    for k, n in ((4096, 11008), (11008, 4096)):
        for direction in ("fwd", "bwd", "fwd+bwd"):
            assert (f"routed LoRA {direction}", f"K={k} N={n} T=8192 img=30% r=8 E=(4,1)") in shapes
    for vocab in (8194, 65536):
        assert ("KD loss fwd+bwd (from hidden states)", f"P=16384 V={vocab} H=4096 T=2") in shapes
    assert sum(c.op.startswith("training step") for c in cases) == 4  # naive, ours; top-k without / with cache
    for k, n in ((4096, 11008), (11008, 4096)):
        for tokens in (1, 16, 64):
            decode = [c.impl for c in cases if (c.op, c.shape) == ("routed LoRA decode fwd",
                                                                   f"K={k} N={n} T={tokens} text r=8 E=(4,1)")]
            assert decode[0] == "base linear (floor)" and decode[1].startswith("ours") and len(decode) == 2
    # With the CUDA tests and the compile check, in 8 minutes (decode cases take milliseconds each).
    assert sum(not c.op.endswith("decode fwd") for c in cases) <= 50


@pytest.mark.parametrize("tokens,share,span", [(2048, 0.3, 1024), (8192, 0.3, 1024), (2048, 1.0, 1024),
                                               (2048, 0.0, 1024), (512, 0.3, 64)])
def test_image_spans_have_the_share_and_span_length(tokens, share, span):
    ids = image_span_modality(2, tokens, share, span, "cpu")
    assert ids.shape == (2, tokens)
    assert int(ids[0].sum()) == round(share * tokens)
    assert torch.equal(ids[0], ids[1])
    if share < 1:  # (all-image sequences are back-to-back spans, one run)
        edges = torch.diff(ids[0], prepend=ids[0, :1] * 0, append=ids[0, :1] * 0)
        starts, ends = torch.nonzero(edges == 1).squeeze(1), torch.nonzero(edges == -1).squeeze(1)
        assert ((ends - starts) <= span).all()
