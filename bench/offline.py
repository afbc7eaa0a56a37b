"""What each op's Triton kernels would execute on a GPU, counted without one.

    python -m bench.offline [--output DIR] [--filter TEXT]

Each workload calls an op's public API (``backend="triton"``, forward and backward) at small shapes
under Triton's interpreter (``TRITON_INTERPRET=1``, set here before triton is imported) and counts:

- launches: Triton kernel launches, plus the torch kernels the launchers run (each outermost ATen
  op that does work: copies, fills, reductions, casts, matmuls; views and allocations are not
  kernels);
- tensor-core FLOPs: 2 * M * N * K of every ``tl.dot`` (the interpreter builder's ``create_dot``
  is wrapped) and of every torch matmul;
- bytes under a perfect cache: for each Triton launch, the unique addresses its masked loads read
  and its masked stores write (each address once per launch, whatever the tile order); for a
  torch kernel, an estimate: its tensor inputs plus an output the size of its largest input.

Each launch is also marked as the backend's or the API's: the backend's are those launched inside the
backend implementation's functions (what ``mode_kernels.backends.implementation`` returns is wrapped in a
profiler scope while counting), the kernels of the op's strategy; the API's are the argument checks, the row
weights and reduction of the loss, and autograd's (its seed, the backward's scaling by the output gradient),
the same whatever the backend's strategy.

Each op is printed next to its ideal (routed LoRA: the frozen base GEMM alone, forward and input
gradient; decode: reading every weight once; KD: the three GEMMs of the fused loss, or one read of
both logits and one write of the gradient; top-k KD: the passes of its strategy in ``mode_kernels.kd_cost``).
The tool knows nothing of the kernels: it counts what any op's launchers do, so it can be rerun after the
kernels change. Results go to ``bench/results/<date>-offline-triton<version>.{json,md}``.
"""
from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# Leaf ATen ops that launch no kernel (metadata, allocation without initialisation).
_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::view", "aten::_reshape_alias", "aten::as_strided",
              "aten::t", "aten::transpose", "aten::permute", "aten::expand", "aten::slice", "aten::select",
              "aten::unsqueeze", "aten::squeeze", "aten::detach", "aten::alias", "aten::lift_fresh",
              "aten::_unsafe_view", "aten::resolve_conj", "aten::resolve_neg", "aten::set_", "aten::unbind",
              "aten::split", "aten::chunk", "aten::narrow", "aten::reshape", "aten::view_as", "aten::is_nonzero",
              "aten::item", "aten::_local_scalar_dense", "aten::result_type", "aten::size", "aten::stride",
              "aten::new_empty", "aten::new_empty_strided", "aten::empty_like", "aten::contiguous", "aten::detach_"}
_MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"}
_TORCH_ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
                   "bool": 1, "signed char": 1, "unsigned char": 1, "short int": 2}


@dataclass
class Launch:
    kernel: str
    flops: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    estimated: bool = False  # torch kernels: bytes estimated from input shapes
    backend: bool = True  # launched inside the backend implementation's functions (the strategy's kernels)

    @property
    def bytes(self) -> int:
        return self.read_bytes + self.write_bytes


class _UniqueBytes:
    """Unique (address, size) pairs, compacted as they come so memory stays bounded."""

    def __init__(self):
        self.keys, self.pending = np.empty(0, np.uint64), []

    def add(self, addresses: np.ndarray, itemsize: int):
        self.pending.append(np.unique(addresses.astype(np.uint64).ravel() * np.uint64(16) + np.uint64(itemsize)))
        if sum(p.size for p in self.pending) > 1 << 22:
            self._compact()

    def _compact(self):
        self.keys = np.unique(np.concatenate([self.keys, *self.pending]))
        self.pending = []

    def total(self) -> int:
        self._compact()
        return int((self.keys % np.uint64(16)).sum())


@dataclass
class _Recorder:
    launches: list[Launch] = field(default_factory=list)
    current: Launch | None = None
    reads: _UniqueBytes | None = None
    writes: _UniqueBytes | None = None


@contextmanager
def count_triton():
    """Wrap the interpreter: every kernel launch becomes a Launch with its dot FLOPs and unique bytes."""
    import triton.runtime.interpreter as interp

    rec = _Recorder()
    builder = interp.InterpreterBuilder
    saved = {name: getattr(builder, name) for name in ("create_dot", "create_masked_load", "create_masked_store")}
    saved_call = interp.GridExecutor.__call__

    def create_dot(self, a, b, d, *args, **kwargs):
        if rec.current is not None:
            m, k = a.data.shape[-2:]
            rec.current.flops += 2 * m * k * b.data.shape[-1] * math.prod(a.data.shape[:-2])
        return saved["create_dot"](self, a, b, d, *args, **kwargs)

    def _record(target, ptrs, mask):
        if rec.current is not None:
            itemsize = ptrs.get_element_ty().primitive_bitwidth // 8
            target.add(ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)], itemsize)

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        _record(rec.reads, ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        _record(rec.writes, ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *args, **kwargs)

    def call(self, *args, **kwargs):
        name = getattr(self.fn, "__name__", str(self.fn))
        rec.current, rec.reads, rec.writes = Launch(name), _UniqueBytes(), _UniqueBytes()
        try:
            with torch.profiler.record_function(f"triton::{name}"):
                return saved_call(self, *args, **kwargs)
        finally:
            rec.current.read_bytes, rec.current.write_bytes = rec.reads.total(), rec.writes.total()
            rec.launches.append(rec.current)
            rec.current = None

    for name, fn in (("create_dot", create_dot), ("create_masked_load", create_masked_load),
                     ("create_masked_store", create_masked_store)):
        setattr(builder, name, fn)
    interp.GridExecutor.__call__ = call
    try:
        yield rec
    finally:
        for name, fn in saved.items():
            setattr(builder, name, fn)
        interp.GridExecutor.__call__ = saved_call


def _shape_bytes(shape, dtype: str) -> int:
    return math.prod(shape) * _TORCH_ITEMSIZE.get(dtype, 4) if shape else 0


# Ops that do no work unless one of their callees does (a no-op conversion has no callee).
_WORK_IF_CALLEES = {"aten::to", "aten::contiguous", "aten::reshape", "aten::clone"}


def _does_work(ev) -> bool:
    if ev.name not in _NO_KERNEL and ev.name not in _WORK_IF_CALLEES:
        return True
    return any(_does_work(c) for c in ev.cpu_children if c.name.startswith("aten::"))


def _matmul_flops(name: str, shapes: list) -> int:
    mats = [s for s in shapes if len(s) >= 2]
    if name not in _MATMULS or len(mats) < 2:
        return 0
    a, b = mats[0], mats[1]
    return 2 * math.prod(a) * (b[0] if name == "aten::linear" else b[-1])


def _torch_kernels(events) -> list[tuple[float, Launch]]:
    """Outermost ATen ops that do work (each taken as one kernel), outside Triton launches (the
    interpreter's own copies) and outside other ATen ops (a composite op counts once)."""
    out = []
    for ev in events:
        if not ev.name.startswith("aten::") or not _does_work(ev):
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            nested = nested or parent.name.startswith(("triton::", "aten::"))
            parent = parent.cpu_parent
        if nested:
            continue
        types = ev.input_types if hasattr(ev, "input_types") else [""] * len(ev.input_shapes)
        tensors = [(s, t) for s, t in zip(ev.input_shapes, types) if isinstance(s, list) and s]
        sizes = [_shape_bytes(s, t) for s, t in tensors]
        flops = _matmul_flops(ev.name, [s for s, _ in tensors])
        out.append((ev.time_range.start, Launch(ev.name, flops, sum(sizes), max(sizes, default=0), estimated=True,
                                                backend=_in_backend(ev))))
    return out


BACKEND_SCOPE = "mode_kernels::backend"


class _Scoped:
    """A backend implementation module whose functions run inside the profiler scope ``BACKEND_SCOPE``."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if not callable(value):
            return value

        def scoped(*args, **kwargs):
            with torch.profiler.record_function(BACKEND_SCOPE):
                return value(*args, **kwargs)
        return scoped


@contextmanager
def backend_scope():
    """Every backend implementation the ops look up while this is active runs inside ``BACKEND_SCOPE``."""
    from mode_kernels import backends

    implementation = backends.implementation
    backends.implementation = lambda *args, **kwargs: _Scoped(implementation(*args, **kwargs))
    try:
        yield
    finally:
        backends.implementation = implementation


def _in_backend(ev) -> bool:
    parent = ev.cpu_parent
    while parent is not None:
        if parent.name == BACKEND_SCOPE:
            return True
        parent = parent.cpu_parent
    return False


def measure(run: Callable[[], None]) -> list[Launch]:
    """Every Triton and torch kernel ``run`` launches, in order, each marked as the backend's or the API's."""
    with backend_scope(), count_triton() as rec, torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    triton_events = sorted((ev for ev in prof.events() if ev.name.startswith("triton::")),
                           key=lambda ev: ev.time_range.start)
    for ev, launch in zip(triton_events, rec.launches):
        launch.backend = _in_backend(ev)
    timed = [(ev.time_range.start, launch) for ev, launch in zip(triton_events, rec.launches)]
    return [launch for _, launch in sorted(timed + _torch_kernels(prof.events()), key=lambda p: p[0])]


@dataclass(frozen=True)
class Ideal:
    what: str
    launches: int
    flops: int
    bytes: int


@dataclass(frozen=True)
class Workload:
    op: str
    shape: str
    build: Callable[[], tuple[Callable[[], None], Ideal]]


DTYPE = torch.bfloat16
_ITEM = 2


def _routed_lora(tokens: int, k: int, n: int, rank: int, experts: tuple, image_span: int, backward: bool):
    def build():
        import mode_kernels as mk

        torch.manual_seed(0)
        e = sum(experts)
        ids = torch.zeros(tokens, dtype=torch.long)
        start = (tokens - image_span) // 2
        ids[start:start + image_span] = 1
        x = torch.randn(tokens, k, dtype=DTYPE, requires_grad=backward)
        weight = torch.randn(n, k, dtype=DTYPE) * k ** -0.5
        lora_a = (torch.randn(e, rank, k, dtype=DTYPE) * k ** -0.5).requires_grad_(backward)
        lora_b = (torch.randn(e, n, rank, dtype=DTYPE) * 0.1).requires_grad_(backward)
        router = (torch.randn(e, k, dtype=DTYPE) * k ** -0.5).requires_grad_(backward)
        plan = mk.plan_routing(ids, len(experts))  # once per model forward, for every layer: not counted
        dy = torch.randn(tokens, n, dtype=DTYPE)

        def run():
            y = mk.modality_lora_linear(x, weight, None, plan, lora_a, lora_b, router, experts_per_modality=experts,
                                        scaling=2.0, backend="triton")
            if backward:
                torch.autograd.grad(y, [x, lora_a, lora_b, router], dy)

        gemm_bytes = (tokens * k + n * k + tokens * n) * _ITEM
        if backward:
            ideal = Ideal("base GEMM: y = x W^T and dx = dy W", 2, 2 * 2 * tokens * k * n, 2 * gemm_bytes)
        else:
            weights = (n * k + e * rank * (k + n) + e * k) * _ITEM
            ideal = Ideal("every weight read once (+ x, y)", 1, 2 * tokens * k * n,
                          weights + (tokens * k + tokens * n) * _ITEM)
        return run, ideal
    return build


def _kd(positions: int, vocab: int, hidden: int, lo: int, hi: int, fused: bool):
    def build():
        import mode_kernels as mk

        torch.manual_seed(0)
        v = hi - lo
        if fused:
            hs = torch.randn(positions, hidden, dtype=DTYPE, requires_grad=True)
            ht = torch.randn(positions, hidden, dtype=DTYPE)
            weight = torch.randn(vocab, hidden, dtype=DTYPE) * hidden ** -0.5

            def run():
                loss = mk.fused_linear_kd_kl_loss(hs, ht, weight, temperature=2.0, vocab_range=(lo, hi),
                                                  backend="triton")
                torch.autograd.grad(loss, [hs])

            ideal = Ideal("three GEMMs (student, teacher logits; dH), logits never stored", 3,
                          3 * 2 * positions * hidden * v, (3 * v * hidden + 3 * positions * hidden) * _ITEM)
        else:
            student = torch.randn(positions, vocab, dtype=DTYPE, requires_grad=True)
            teacher = torch.randn(positions, vocab, dtype=DTYPE)

            def run():
                loss = mk.kd_kl_loss(student, teacher, temperature=2.0, vocab_range=(lo, hi), backend="triton")
                torch.autograd.grad(loss, [student])

            ideal = Ideal("read both logits once, write the gradient once", 2, 0, 3 * positions * v * _ITEM)
        return run, ideal
    return build


def _kd_topk(positions: int, vocab: int, hidden: int, topk: int, given: bool):
    """The top-k KD loss (frozen weight, forward + d hidden) on the Triton backend, the teacher as hidden states
    (the op selects its top k first) or given as its top k (a cache's). Ideal: the passes of the strategy the
    backend runs (``mode_kernels.kd_cost.topk_strategy``: Triton keeps dense tiles), one launch each, the first
    also reading the teacher's k ids (int64) and float32 logits; without ``given`` one more pass before them,
    the teacher's selection inside its logits GEMM (``kd_cost.selection_cost``)."""
    def build():
        import mode_kernels as mk
        from mode_kernels.kd_cost import dense_cost, selection_cost, sparse_cost, topk_strategy

        torch.manual_seed(0)
        hs = torch.randn(positions, hidden, dtype=DTYPE, requires_grad=True)
        ht = torch.randn(positions, hidden, dtype=DTYPE)
        weight = torch.randn(vocab, hidden, dtype=DTYPE) * hidden ** -0.5
        teacher = mk.teacher_topk(ht, weight, topk, vocab_range=(0, vocab), backend="triton") if given else None

        def run():
            loss = mk.fused_linear_kd_kl_loss(hs, None if given else ht, weight, teacher_topk=teacher,
                                              topk=None if given else topk, temperature=2.0,
                                              vocab_range=(0, vocab), backend="triton")
            torch.autograd.grad(loss, [hs])

        strategy = topk_strategy("triton", positions, hidden, vocab, topk, trainable=False)
        cost = (dense_cost(positions, hidden, vocab, _ITEM, False) if strategy == "dense" else
                sparse_cost(positions, hidden, topk, _ITEM, False))
        flops, moved = cost[0]
        cost[0] = (flops, moved + positions * topk * 12)  # the teacher's top k read
        what = f"{strategy} student form: {len(cost)} passes of kd_cost, the teacher's top k read once"
        if not given:
            cost.insert(0, selection_cost(positions, hidden, vocab, topk, _ITEM))
            what = "the teacher's selection in its GEMM, then the " + what
        ideal = Ideal(what, len(cost), sum(f for f, _ in cost), sum(b for _, b in cost))
        return run, ideal
    return build


WORKLOADS = [
    Workload("routed LoRA fwd+bwd", "T=2048 K=128 N=256 r=8 E=(4,1) one 512-token image span",
             _routed_lora(2048, 128, 256, 8, (4, 1), 512, True)),
    Workload("routed LoRA decode fwd", "T=8 K=128 N=256 r=8 E=(4,1) text only",
             _routed_lora(8, 128, 256, 8, (4, 1), 0, False)),
    # KD: enough positions for one program per row, and few (16, a short batch or a small chunk:
    # the launchers plan the split over the vocabulary for 132 SMs under the interpreter).
    Workload("kd_kl_loss fwd+bwd", "P=1024 V=4100 slice [4, 4100) T=2", _kd(1024, 4100, 64, 4, 4100, False)),
    Workload("kd_kl_loss fwd+bwd", "P=16 V=8196 slice [4, 8196) T=2", _kd(16, 8196, 64, 4, 8196, False)),
    Workload("fused_linear_kd_kl_loss fwd+bwd", "P=1024 H=64 V=4096 T=2", _kd(1024, 4096, 64, 0, 4096, True)),
    Workload("fused_linear_kd_kl_loss fwd+bwd", "P=16 H=64 V=8196 slice [4, 8196) T=2",
             _kd(16, 8196, 64, 4, 8196, True)),
    Workload("fused_linear_kd_kl_loss top-k fwd+bwd", "P=128 H=64 V=512 k=32 frozen weight T=2",
             _kd_topk(128, 512, 64, 32, False)),
    Workload("fused_linear_kd_kl_loss given teacher fwd+bwd", "P=128 H=64 V=512 k=32 frozen weight T=2",
             _kd_topk(128, 512, 64, 32, True)),
]


def run_workload(w: Workload) -> dict:
    run, ideal = w.build()
    launches = measure(run)
    ours = [la for la in launches if la.backend]
    backend = {"launches": len(ours), "flops": sum(la.flops for la in ours), "bytes": sum(la.bytes for la in ours)}
    return {"op": w.op, "shape": w.shape, "ideal": asdict(ideal), "launches": [asdict(la) for la in launches],
            "backend": backend,
            "total": {"launches": len(launches), "flops": sum(la.flops for la in launches),
                      "bytes": sum(la.bytes for la in launches)},
            "ratio": {"launches": backend["launches"] / ideal.launches,
                      "flops": backend["flops"] / ideal.flops if ideal.flops else None,
                      "bytes": backend["bytes"] / ideal.bytes}}


def _kib(b: int) -> str:
    return f"{b / 1024:,.1f}"


def render(meta: dict, rows: list[dict]) -> str:
    lines = [f"# bench.offline: {meta['date']}, triton {meta['triton']}, torch {meta['torch']}", "",
             "Counted under Triton's interpreter (no GPU): launches, tensor-core FLOPs (2MNK of every dot), "
             "KiB touched per launch under a perfect cache (unique addresses of masked loads and stores; "
             "torch kernels estimated from their input shapes). bfloat16 tensors. The backend's columns count the "
             "launches inside the backend implementation (the strategy's kernels); the totals add the API's "
             "(argument checks, the loss's row weights and reduction, autograd's seed and output-gradient "
             "scaling).", "",
             "| op | shape | launches | ideal | MFLOP | ideal | KiB | ideal | / ideal (launches, FLOPs, bytes) "
             "| total launches | total KiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        b, i, t, q = r["backend"], r["ideal"], r["total"], r["ratio"]
        flops = "-" if q["flops"] is None else f"{q['flops']:.2f}"
        lines.append(f"| {r['op']} | {r['shape']} | {b['launches']} | {i['launches']} | {b['flops'] / 1e6:,.2f} | "
                     f"{i['flops'] / 1e6:,.2f} | {_kib(b['bytes'])} | {_kib(i['bytes'])} | "
                     f"{q['launches']:.2f}, {flops}, {q['bytes']:.2f} | {t['launches']} | {_kib(t['bytes'])} |")
    lines += ["", "Ideals: " + "; ".join(f"{r['op']}: {r['ideal']['what']}" for r in rows), ""]
    for r in rows:
        lines += [f"## {r['op']} ({r['shape']})", "", "| # | kernel | by | MFLOP | KiB read | KiB written |",
                  "|---:|---|---|---:|---:|---:|"]
        for j, la in enumerate(r["launches"], 1):
            est = " (est.)" if la["estimated"] else ""
            lines.append(f"| {j} | {la['kernel']}{est} | {'backend' if la['backend'] else 'API'} | "
                         f"{la['flops'] / 1e6:,.3f} | {_kib(la['read_bytes'])} | {_kib(la['write_bytes'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=RESULTS, help="folder for the .json and .md results")
    parser.add_argument("--filter", default="", help="only workloads whose op or shape contains this text")
    parser.add_argument("--tag", default="", help="suffix of the result file names")
    args = parser.parse_args(argv)
    import triton

    torch.set_num_threads(1)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "triton": triton.__version__, "torch": torch.__version__, "numpy": np.__version__}
    rows = [run_workload(w) for w in WORKLOADS if args.filter.lower() in f"{w.op} {w.shape}".lower()]
    table = render(meta, rows)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['date'][:10]}-offline-triton{triton.__version__}{'-' + args.tag if args.tag else ''}"
    (args.output / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    (args.output / f"{stem}.md").write_text(table + "\n")
    print(f"wrote {args.output / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
