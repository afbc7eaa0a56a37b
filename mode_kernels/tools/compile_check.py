"""Compile every Triton kernel of the package for NVIDIA GPUs, on any machine (no GPU needed).

    python -m mode_kernels.tools.compile_check --arch 80 90 [--default-only]

Each Triton module in ``mode_kernels/triton/`` that has kernels defines ``compile_targets()``,
a list of :class:`CompileTarget` (or plain tuples in its field order), one per kernel, variant
and config its launcher or autotuner can pick. Optional parameters: ``arch`` (the compute
capability, for configs chosen per GPU family) and ``default_only`` (what ``--default-only``,
the test suite's run, compiles; without it the first target of each kernel function). Each is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
(ptxas and cuobjdump ship inside the triton wheel) and reported as one row: registers, spilled
bytes (stack frame + local memory, from ``cuobjdump -res-usage``), shared memory, whether it fits
the arch's shared memory, and on sm_90 whether the PTX uses wgmma and TMA (``cp.async.bulk.tensor``).
The exit status is non-zero on a compile error, a spill, a shared-memory overflow, an sm_90 GEMM
target (``gemm=True``) without wgmma, or an sm_90 TMA target (``tma=True``) without TMA copies.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, NamedTuple

# Modules scanned for compile_targets(); one that does not exist (yet) is skipped with a note.
MODULES = (
    "mode_kernels.tools.targets.routed_lora",
    "mode_kernels.tools.targets.kd_kl",
    "mode_kernels.tools.targets.fused_linear_kd_kl",
    "mode_kernels.tools.targets.kd_topk",
)

# Shared memory per block an opt-in kernel may use, bytes.
MAX_SHARED = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448, 120: 101376}


class CompileTarget(NamedTuple):
    """One kernel compilation.

    name: row label, e.g. ``"expand[fwd bf16] BM128 BN256 BK64"``.
    fn: the ``@triton.jit`` function (for an ``@triton.autotune`` kernel, its ``.fn``).
    signature: runtime argument name -> Triton type, as in ``triton.tools.compile``: ``"*bf16"``,
        ``"*fp32"``, ``"*i64"``, ``"i32"``, ``"fp32"``, ``"tensordesc<bf16[128,64]>"`` (a host TMA
        descriptor and its block shape); ``"i32:16"`` marks an int known to be a
        multiple of 16 (Triton's launcher specialises those; pointers are always taken as 16-byte
        aligned). Arguments listed in ``constexprs`` are left out.
    constexprs: argument name -> value for every ``tl.constexpr`` argument, and for int arguments
        equal to 1 (unit strides), which Triton's launcher also specialises to constants.
    num_warps, num_stages: launch options.
    gemm: a tensor-core GEMM: on sm_90 its PTX must use wgmma (else it runs at a fraction of Hopper's rate).
    tma: copies tiles by TMA: on sm_90 its PTX must hold cp.async.bulk.tensor.
    """

    name: str
    fn: Any
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    gemm: bool = False
    tma: bool = False


class Row(NamedTuple):
    module: str
    name: str
    arch: int
    registers: int
    spilled: int
    shared: int
    wgmma: bool | None
    error: str | None
    needs_wgmma: bool = False
    tma: bool | None = None
    needs_tma: bool = False

    @property
    def ok(self) -> bool:
        return (self.error is None and self.spilled == 0 and self.shared <= MAX_SHARED.get(self.arch, 0)
                and not (self.needs_wgmma and self.wgmma is False) and not (self.needs_tma and self.tma is False))


def _tool(name: str) -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    found = bundled if os.path.exists(bundled) else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found (neither in the triton wheel nor on PATH)")
    return found


def _source(target: CompileTarget):
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    fn = target.fn
    while not isinstance(fn, JITFunction):  # unwrap @triton.autotune / @triton.heuristics
        fn = fn.fn
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in target.constexprs:
            signature[arg] = "constexpr"
            continue
        if arg not in target.signature:
            raise ValueError(f"{target.name}: argument {arg} is in neither signature nor constexprs")
        ty, _, hint = target.signature[arg].partition(":")
        signature[arg] = ty
        if ty.startswith("*") or hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    # Constexprs keyed by argument position: the form ASTSource accepts from Triton 3.3 on.
    constexprs = {(fn.arg_names.index(arg),): value for arg, value in target.constexprs.items()}
    return ASTSource(fn, signature, constexprs, attrs)


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, spilled bytes) of the single kernel in a cubin, from cuobjdump -res-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if usage is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{out}")
    registers, stack, local = (int(v) for v in usage.groups())
    return registers, stack + local


def compile_one(module: str, target: CompileTarget, arch: int) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget

    try:
        kernel = triton.compile(_source(target), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": target.num_warps, "num_stages": target.num_stages})
        registers, spilled = _resource_usage(kernel.asm["cubin"])
    except Exception as exc:  # a compile error is a result to report, not a crash
        return Row(module, target.name, arch, 0, 0, 0, None, f"{type(exc).__name__}: {exc}".splitlines()[0])
    wgmma = ("wgmma" in kernel.asm["ptx"]) if arch >= 90 else None
    tma = ("cp.async.bulk.tensor" in kernel.asm["ptx"]) if arch >= 90 else None
    return Row(module, target.name, arch, registers, spilled, kernel.metadata.shared, wgmma, None,
               target.gemm and arch >= 90, tma, target.tma and arch >= 90)


def _targets_of(module, default_only: bool, arch: int) -> list[CompileTarget]:
    """The module's targets for one arch. compile_targets may take ``default_only`` and ``arch``
    (configs per GPU family); without ``default_only``, --default-only keeps the first target of
    each kernel function."""
    params = inspect.signature(module.compile_targets).parameters
    kwargs = {"arch": arch} if "arch" in params else {}
    if "default_only" in params:
        return [CompileTarget(*t) for t in module.compile_targets(default_only=default_only, **kwargs)]
    targets = [CompileTarget(*t) for t in module.compile_targets(**kwargs)]
    if not default_only:
        return targets
    firsts = {}
    for t in targets:
        firsts.setdefault(id(t.fn), t)
    return list(firsts.values())


def collect(default_only: bool, arch: int) -> list[tuple[str, CompileTarget]]:
    targets = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            print(f"note: {name} does not exist yet: skipped")
            continue
        if not hasattr(module, "compile_targets"):
            print(f"note: {name} has no compile_targets(): skipped")
            continue
        short = name.rsplit(".", 1)[-1]
        targets += [(short, t) for t in _targets_of(module, default_only, arch)]
    return targets


def _format(row: Row) -> str:
    if row.error:
        return f"{row.arch:>4}  {'ERROR':>4}  {row.module}.{row.name}: {row.error}"
    wgmma, tma = ("-" if v is None else ("yes" if v else "no") for v in (row.wgmma, row.tma))
    flag = "" if row.ok else ("  <-- SPILL" if row.spilled else "  <-- NO WGMMA" if row.needs_wgmma and not row.wgmma
                              else "  <-- NO TMA" if row.needs_tma and not row.tma
                              else "  <-- SHARED MEMORY OVER LIMIT")
    return (f"sm{row.arch:<3} {row.registers:>4} {row.spilled:>6} {row.shared:>7} {wgmma:>5} {tma:>4}  "
            f"{row.module}.{row.name}{flag}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mode_kernels.tools.compile_check",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--default-only", action="store_true", help="only each kernel's default config")
    parser.add_argument("--filter", default="", help="only targets whose module.name contains this text")
    args = parser.parse_args(argv)
    from ..triton._common import INTERPRET

    if INTERPRET:
        print("error: unset TRITON_INTERPRET: the interpreter replaces the kernels the check compiles")
        return 2
    rows = []
    print(f"{'arch':<5} {'regs':>4} {'spill':>6} {'shared':>7} {'wgmma':>5} {'tma':>4}  kernel")
    for arch in args.arch:
        for module, target in collect(args.default_only, arch):
            if args.filter not in f"{module}.{target.name}":
                continue
            rows.append(compile_one(module, target, arch))
            print(_format(rows[-1]), flush=True)
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows)} compilations, {len(bad)} failed (compile error, spill, shared memory over the limit, "
          f"an sm_90 GEMM without wgmma or an sm_90 TMA kernel without TMA copies)")
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
