"""Time every benchmark case side by side with its baselines; write results.json and results.md.

    python -m bench.run [--quick] [--device cuda|cpu] [--output DIR] [--filter TEXT] [--interleave N]

Rows: one per (op, shape, implementation) with median/min/max time, peak extra memory and the ratio
of time and memory to each baseline of the same op and shape measured in the same run. On CPU the
shapes are scaled down automatically (the table says so). A case that runs out of memory is recorded
as OOM; one that cannot run here (e.g. no Liger-Kernel) as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from bench.cases import FLOOR, Case, CaseSkipped, Sizes, all_cases, sizes_for
from bench.timing import TimingBudget, _cpu_peak_bytes, measure

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "latest"
TINY_BUDGET = TimingBudget(warmup_ms=1, rep_ms=5, cpu_min_run_time_s=0.01)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    message = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    return f"CPU {model} ({threads} thread{'s' if threads > 1 else ''})"


def _package_version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return "not installed"


def environment(device: torch.device, sizes: Sizes, quick: bool) -> dict:
    return {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "dtype": str(sizes.dtype).removeprefix("torch."),
        "shapes": sizes.description,
        "scaled_down": sizes.scaled_down,
        "quick": quick,
    }


def _new_row(case: Case) -> dict:
    return {"op": case.op, "shape": case.shape, "impl": case.impl, "baseline": case.is_baseline, "status": "ok",
            "note": "", "median_ms": None, "min_ms": None, "max_ms": None, "peak_mem_mib": None,
            "tokens_per_s": None, "ratios": {}, "flop_floor": case.flop_floor}


def _record_failure(row: dict, case: Case, exc: BaseException) -> None:
    if isinstance(exc, CaseSkipped):
        row.update(status="skipped", note=str(exc))
        return
    first_line = (str(exc).splitlines() or [""])[0][:300]
    if _is_out_of_memory(exc):
        row.update(status="OOM", note=first_line)
    else:
        row.update(status="error", note=f"{type(exc).__name__}: {first_line}")
        tqdm.write(f"error in {case.op} | {case.shape} | {case.impl}:\n{traceback.format_exc()}", file=sys.stderr)


def run_case(case: Case, device: torch.device, budget: TimingBudget) -> dict:
    row = _new_row(case)
    try:
        measurement = measure(case.build(), device, budget)
        row.update(asdict(measurement))
        if case.tokens:
            row["tokens_per_s"] = case.tokens / (measurement.median_ms / 1e3)
    except Exception as exc:  # noqa: BLE001 - one failing case must not end the run; it is recorded
        _record_failure(row, case, exc)
    finally:
        # The closure and any exception traceback hold the case's tensors; free them before the next case.
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def run_group_interleaved(cases: list[Case], rounds: int) -> list[dict]:
    """CPU: the cases of one (op, shape) group timed round-robin, one call each per round, so that the load
    of a shared machine, which changes from second to second, falls on every implementation alike; median,
    min and max over the rounds. Peak memory as in ``measure``."""
    rows, timed = [], []
    for case in cases:
        row = _new_row(case)
        try:
            fn = case.build()
            fn()  # warm-up, as measure() does
            row["peak_mem_mib"] = _cpu_peak_bytes(fn) / 2 ** 20
            timed.append((row, case, fn, []))
        except Exception as exc:  # noqa: BLE001 - recorded, as in run_case
            _record_failure(row, case, exc)
        rows.append(row)
    for _ in range(rounds):
        for _row, _case, fn, times in timed:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    for row, case, _fn, times in timed:
        median = statistics.median(times)
        row.update(median_ms=median * 1e3, min_ms=min(times) * 1e3, max_ms=max(times) * 1e3,
                   note=f"interleaved, {rounds} rounds")
        if case.tokens:
            row["tokens_per_s"] = case.tokens / median
    del timed
    gc.collect()
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratios[baseline impl] = {"time": ours / baseline, "memory": ours / baseline} within (op, shape)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["op"], row["shape"]), []).append(row)
    for group in groups.values():
        references = [r for r in group if r["baseline"] and r["status"] == "ok"]
        for row in group:
            row["ratios"] = {}
            if row["status"] != "ok":
                continue
            for ref in references:
                if ref is row:
                    continue
                memory = row["peak_mem_mib"] / ref["peak_mem_mib"] if ref["peak_mem_mib"] > 0 else None
                row["ratios"][ref["impl"]] = {"time": row["median_ms"] / ref["median_ms"], "memory": memory}


def _format_ratios(ratios: dict) -> str:
    parts = []
    for impl, ratio in ratios.items():
        memory = "" if ratio["memory"] is None else f", mem {ratio['memory']:.2f}x"
        parts.append(f"{impl}: {ratio['time']:.2f}x{memory}")
    return "; ".join(parts)


def _format_number(value: float | None, digits: int = 3) -> str:
    if value is None:
        return ""
    return f"{value:.{digits}g}" if value < 100 else f"{value:.0f}"


def summary_table(rows: list[dict]) -> list[str]:
    """Forward + backward rows (and training steps) with time and memory over the group's naive path,
    time over the frozen base linear where there is one, and on a group's first row the least time over
    the base linear that its multiply-adds allow (routed LoRA: ``flop_floor``): the table README shows."""
    lines = ["| op | shape | implementation | median ms | peak MiB | time / naive | memory / naive | time / floor "
             "| FLOP floor (estimate) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    previous_group = None
    for row in rows:
        if row["status"] != "ok" or not ("fwd+bwd" in row["op"] or row["op"].startswith("training step")):
            continue
        naive = next((impl for impl in row["ratios"] if impl.startswith("naive")), None)
        if row["impl"].startswith("naive"):
            time_ratio = memory_ratio = "1.00x"
        elif naive is not None:
            ratio = row["ratios"][naive]
            time_ratio = f"{ratio['time']:.2f}x"
            memory_ratio = "" if ratio["memory"] is None else f"{ratio['memory']:.2f}x"
        else:
            time_ratio = memory_ratio = ""
        floor = row["ratios"].get(FLOOR)
        group = (row["op"], row["shape"])
        first = group != previous_group
        op, shape = group if first else ("", "")
        previous_group = group
        flop_floor = row.get("flop_floor") if first else None  # results.json of earlier runs have none
        cells = [op, shape, row["impl"], _format_number(row["median_ms"]), _format_number(row["peak_mem_mib"]),
                 time_ratio, memory_ratio, "" if floor is None else f"{floor['time']:.2f}x",
                 "" if flop_floor is None else f"{flop_floor:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# mode-kernels benchmark: {meta['device_name']}, {meta['date']}", ""]
    lines.append(f"torch {meta['torch']}, triton {meta['triton']}, python {meta['python']}, {meta['shapes']}.")
    if len(rows) < meta.get("cases_planned", len(rows)):
        lines.append(f"**Incomplete run: {len(rows)} of {meta['cases_planned']} cases measured.**")
    if meta["device"] == "cpu":
        lines.append("**CPU run at scaled-down shapes**: timings on a shared CPU are noisy and say nothing about "
                     "GPU speed; peak memory is the torch CPU allocator's, from the profiler.")
    else:
        lines.append("Times: `triton.testing.do_bench` (L2 flushed); peak memory: `torch.cuda.max_memory_allocated` "
                     "above what was allocated before the case.")
    lines += ["", "Ratios are this row's time (and peak memory) over the named baseline's, same op and shape, "
              "same run: below 1 is faster (smaller). FLOP floor (estimate): 1 + the multiply-adds routed LoRA's "
              "adapters need (each token on its own experts' columns only) over the base linear's, the least "
              "time / floor possible at equal GEMM efficiency (`bench.roofline.routed_lora_flop_floor`).", "",
              "## Summary: forward + backward against the naive path",
              "", *summary_table(rows), "", "## Every case", "",
              "| op | shape | implementation | median ms | min ms | max ms | peak MiB | vs baselines | note |",
              "|---|---|---|---:|---:|---:|---:|---|---|"]
    # The table shows ours against every baseline, and each other baseline against the group's first
    # (the floor or the naive path); results.json has every ratio.
    first_baseline = {}
    for row in rows:
        if row["baseline"]:
            first_baseline.setdefault((row["op"], row["shape"]), row["impl"])
    for row in rows:
        ratios = row["ratios"]
        if row["baseline"]:
            first = first_baseline[(row["op"], row["shape"])]
            ratios = {impl: r for impl, r in ratios.items() if impl == first}
        note = row["note"] if row["status"] == "ok" else f"**{row['status']}** {row['note']}"
        if row["status"] == "ok" and row["tokens_per_s"] and row["op"].startswith("training step"):
            note = f"{row['tokens_per_s']:,.0f} tokens/s"
        cells = [row["op"], row["shape"], row["impl"], _format_number(row["median_ms"]),
                 _format_number(row["min_ms"]), _format_number(row["max_ms"]),
                 _format_number(row["peak_mem_mib"]), _format_ratios(ratios), note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(output: Path, meta: dict, rows: list[dict]) -> str:
    """Compute the ratios, write results.json and results.md under ``output``; return the markdown."""
    add_ratios(rows)
    output.mkdir(parents=True, exist_ok=True)
    table = markdown(meta, rows)
    for name, text in (("results.json", json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n"),
                       ("results.md", table)):
        partial = output / f".{name}.partial"
        partial.write_text(text)
        os.replace(partial, output / name)  # atomic: a run killed mid-write leaves the previous file whole
    return table


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few representative cases only")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available, else cpu (CPU shapes are scaled down)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default: {DEFAULT_OUTPUT}")
    parser.add_argument("--filter", default=None, help="only cases whose 'op shape implementation' contains this")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for --device cpu (default 1: on a shared machine more threads spin-wait "
                             "on each other and timings explode)")
    parser.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                        help="only rewrite the markdown of an earlier results.json (next to it) and print it")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and timing budget (smoke test)")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="CPU: time each (op, shape) group's implementations round-robin for ROUNDS rounds "
                             "(same-run ratios that a shared machine's changing load does not skew)")
    parser.add_argument("--min-run-time", type=float, default=TimingBudget.cpu_min_run_time_s, metavar="SECONDS",
                        help="CPU: sample each case at least this long (default %(default)s; longer gives steadier "
                             "medians on a shared machine)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        table = markdown(results["meta"], results["rows"])
        args.render.with_suffix(".md").write_text(table)
        print(table)
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = sizes_for(device, args.quick, args.tiny)
    budget = TINY_BUDGET if args.tiny else TimingBudget(cpu_min_run_time_s=args.min_run_time)
    cases = all_cases(sizes, device)
    if args.filter:
        cases = [c for c in cases if args.filter.lower() in f"{c.op} {c.shape} {c.impl}".lower()]
    meta = {**environment(device, sizes, args.quick), "cases_planned": len(cases)}
    rows = []
    table = write_results(args.output, meta, rows)
    stamp = {key: meta[key] for key in ("device_name", "torch", "triton", "date")}
    if args.interleave and device.type == "cpu":
        meta["interleaved_rounds"] = args.interleave
        groups: dict[tuple[str, str], list[Case]] = {}
        for case in cases:
            groups.setdefault((case.op, case.shape), []).append(case)
        for group in tqdm(list(groups.values()), desc="bench", unit="group", dynamic_ncols=True):
            rows += [{**row, **stamp} for row in run_group_interleaved(group, args.interleave)]
            table = write_results(args.output, meta, rows)
    else:
        for case in tqdm(cases, desc="bench", unit="case", dynamic_ncols=True):
            rows.append({**run_case(case, device, budget), **stamp})
            # Written after every case, so a run stopped by a timeout keeps what it measured.
            table = write_results(args.output, meta, rows)
    print(table)
    print(f"wrote {args.output / 'results.json'} and {args.output / 'results.md'}")
    failed = [r for r in rows if r["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
