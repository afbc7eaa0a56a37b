"""Roofline ESTIMATES of the routed-LoRA kernels, the KD ideals and the fused-linear KD's launches at
Anole-7B shapes (no GPU run).

    python -m bench.roofline

Per launch: tensor-core FLOPs (dots at the padded widths the kernels use: 64 rank columns for
E * RANK_P = 40, 16 router logits) and the bytes a launch must move at least (each operand read
once, each output written once), then time = max(FLOPs / peak, bytes / bandwidth), summed over
launches, against the frozen base linear (forward GEMM + input-gradient GEMM). Peaks are the
vendors' dense bf16 figures; real kernels reach a fraction of them, so these are lower bounds
and the ratios are what they are for: comparing designs. Launch overheads are not counted.
"""
from __future__ import annotations

GPUS = {"H100 SXM": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}  # dense bf16 FLOP/s, HBM bytes/s
TOKENS, EXPERTS, RANK, RANK_P, ITEM = 8192, 5, 8, 8, 2
COLS = EXPERTS * RANK_P                 # H's width
GRAD_COLS = COLS + EXPERTS              # G = [dh | dlogit]
PADDED_COLS, LOGIT_COLS = 64, 16        # dot widths


def routed_lora_launches(t: int, k: int, n: int, backward: bool = True):
    """(name, FLOPs, bytes) per launch of the v2 kernels (the weight-grads pass apart; v3's forward is
    the same): experts (4, 1), rank 8, bf16."""
    a_r = (EXPERTS * RANK * k + EXPERTS * k) * ITEM   # A and the router (read, or their gradients written)
    b = EXPERTS * RANK * n * ITEM
    h, g, gates = t * COLS * ITEM, t * GRAD_COLS * ITEM, t * EXPERTS * 4
    x, y = t * k * ITEM, t * n * ITEM
    launches = [
        ("shrink: H, gates", 2 * t * k * (PADDED_COLS + LOGIT_COLS), x + a_r + h + gates),
        ("GEMM [x | H] . [W | B_cat]^T", 2 * t * n * (k + PADDED_COLS), x + n * k * ITEM + h + b + y),
    ]
    if backward:
        launches += [
            ("grad rows: Z = dy B_cat -> G", 2 * t * n * PADDED_COLS, y + b + h + gates + g),
            ("GEMM dx = [dy | G] . [W ; A ; R]", 2 * t * k * (n + PADDED_COLS), y + n * k * ITEM + g + a_r + x),
            ("weight grads: G^T u, H^T dy", 2 * t * PADDED_COLS * (k + n), g + x + h + y + a_r + b),
        ]
    return launches


def db_in_grad_rows_launches(t: int, k: int, n: int, rows_per_program: int):
    """The v2 backward with dB = H^T dy moved into grad rows (a design considered, not built): each
    grad-rows program streams dy for rows_per_program tokens once, for Z and for its float32 partial
    of dB [C, N]; the weight-grads pass reduces the T / rows_per_program partials in a fixed order
    instead of reading dy again."""
    grad_rows, dx, weight_grads = routed_lora_launches(t, k, n)[2:]
    partials = t // rows_per_program * COLS * n * 4
    db_flops = 2 * t * n * PADDED_COLS
    return [("grad rows + dB partials", grad_rows[1] + db_flops, grad_rows[2] + partials), dx,
            ("weight grads: G^T u, sum of dB partials", weight_grads[1] - db_flops,
             weight_grads[2] - t * n * ITEM + partials)]


def routed_lora_flop_floor(k: int, n: int, tokens_per_modality, experts_per_modality, rank: int) -> float:
    """ESTIMATE: the least time routed LoRA forward + backward can take over the frozen base linear's (forward +
    input gradient) if every GEMM ran at the same efficiency: 1 + the adapters' multiply-adds over the base's.

    A token of a modality with e experts needs only their columns: c_s = e * rank shrink columns plus e router
    logits when e > 1 (each over K), c_e = e * rank expand columns (each over N). Forward: shrink c_s K, expand
    c_e N; backward: dH = dy B (c_e N), dB (c_e N), the adapters' share of dx (c_s K), dA and dR (c_s K): in all
    3 (c_s K + c_e N) per token, against the base's 2 K N. Gates, softmax and memory traffic are not counted.
    """
    adapters = 0
    for tokens, experts in zip(tokens_per_modality, experts_per_modality, strict=True):
        shrink_cols = experts * rank + (experts if experts > 1 else 0)
        adapters += tokens * 3 * (shrink_cols * k + experts * rank * n)
    base = sum(tokens_per_modality) * 2 * k * n
    return 1 + adapters / base if base else 1.0


def fused_weight_grads_launches(t: int, k: int, n: int, sms: int = 132):
    """The v3 backward: the weight gradients summed by the dx GEMM (``WEIGHT_GRADS``) at its sm_90
    tile, in the segments ``weight_grad_segments`` plans. A persistent grid of (token segment, column
    block of dx) programs, each walking its segment's row blocks; per row block it adds G^T u (u's
    tile has dx's tile shape) and, for the dy column chunks it owns, H^T dy (dy's tiles have just
    streamed through the K loops of the segment's programs, so L2-resident) into its segment's
    float32 partials of [dA ; dR] and dB; one launch sums the S partials in a fixed order.
    Bytes: u read once; the partials written once (their per-row-block read-modify-writes are each
    program's own, L2-resident: not counted), read once by the sum; and W re-streamed once per row
    block of a segment (column blocks of all segments run together, and W does not fit in L2)."""
    import triton

    from mode_kernels.triton.routed_lora import T_BUCKETS, gemm_configs, weight_grad_segments

    tile = gemm_configs(90, 2 * T_BUCKETS[-1], False, weight_grads=True)[0].kwargs
    block_m, block_n = tile["BLOCK_M"], tile["BLOCK_N"]
    segments = weight_grad_segments(t, triton.cdiv(k, block_n), sms, block_m)
    w_reads = triton.cdiv(triton.cdiv(t, block_m), segments)
    grad_rows, dx = routed_lora_launches(t, k, n)[2:4]
    partials = segments * (GRAD_COLS * k + COLS * n) * 4
    a_r = (EXPERTS * RANK * k + EXPERTS * k) * ITEM
    b = EXPERTS * RANK * n * ITEM
    fused = ("GEMM dx + weight-grad partials (persistent)", dx[1] + 2 * t * PADDED_COLS * (k + n),
             dx[2] + (w_reads - 1) * n * k * ITEM + t * k * ITEM + t * COLS * ITEM + partials)
    return [grad_rows, fused, ("sum of segment partials -> dA, dR, dB", 0, partials + a_r + b)], segments, w_reads


def base_launches(t: int, k: int, n: int, backward: bool = True):
    gemm = (2 * t * k * n, (t * k + n * k + t * n) * ITEM)
    return [("base GEMM y = x W^T", *gemm)] + ([("base GEMM dx = dy W", *gemm)] if backward else [])


def fused_kd_launches(positions: int, hidden: int, vocab: int):
    """(name, FLOPs, bytes) of the fused-linear KD's Triton launches with a frozen weight and reduction
    "mean", bf16 inputs, summed over its chunks of positions (``chunk_plan``: the memory bound):
    per chunk the logits kernel (both dots; writes float32 logits), the row pass (reads them, writes
    bf16 d logits; a long row stays in L2 between its two sweeps) and d hidden = d logits @ W."""
    import torch

    from mode_kernels.triton.fused_linear_kd_kl import chunk_plan

    chunk = chunk_plan(positions, vocab, None, torch.bfloat16, torch.bfloat16)[0]
    launches = []
    for r0 in range(0, positions, chunk):
        rows = min(chunk, positions - r0)
        logits = rows * vocab * 4
        launches += [
            ("logits (student, teacher)", 2 * 2 * rows * hidden * vocab,
             2 * rows * hidden * ITEM + vocab * hidden * ITEM + 2 * logits),
            ("row pass: KL, d logits", 0, 2 * logits + rows * vocab * ITEM),
            ("d hidden = d logits @ W", 2 * rows * vocab * hidden, rows * vocab * ITEM + vocab * hidden * ITEM
             + rows * hidden * ITEM),
        ]
    return chunk, launches


def seconds(launches, gpu: str) -> float:
    flops_peak, bandwidth = GPUS[gpu]
    return sum(max(f / flops_peak, b / bandwidth) for _, f, b in launches)


def _launch_table(launches) -> None:
    print("| launch | GFLOP | MB | H100 us | H200 us |\n|---|---:|---:|---:|---:|")
    for name, f, b in launches:
        print(f"| {name} | {f / 1e9:.1f} | {b / 1e6:.1f} | {seconds([(name, f, b)], 'H100 SXM') * 1e6:.0f} | "
              f"{seconds([(name, f, b)], 'H200') * 1e6:.0f} |")


def main() -> None:
    print("ESTIMATES (roofline lower bounds, no GPU run). bf16, experts (4, 1), rank 8.\n")
    for k, n in ((4096, 11008), (11008, 4096)):
        base, v2 = base_launches(TOKENS, k, n), routed_lora_launches(TOKENS, k, n)
        backward, segments, w_reads = fused_weight_grads_launches(TOKENS, k, n)
        ours = v2[:2] + backward
        print(f"### Routed LoRA forward + backward, T={TOKENS}, K={k}, N={n}\n")
        print(f"v3: the weight gradients summed by the dx GEMM ({segments} token segments, W read {w_reads} times "
              "by it):\n")
        _launch_table(ours + base)
        for gpu in GPUS:
            print(f"\n{gpu}: ours {seconds(ours, gpu) * 1e3:.3f} ms, base {seconds(base, gpu) * 1e3:.3f} ms, "
                  f"ratio {seconds(ours, gpu) / seconds(base, gpu):.3f}x (v2, weight-grads pass apart: "
                  f"{seconds(v2, gpu) / seconds(base, gpu):.3f}x)", end="")
        print("\n\nv2's backward (the weight-grads pass apart: float32, a separate lora_input, few tokens):\n")
        _launch_table(v2[2:])
        print(f"\ndB fused into grad rows (not built), backward after the forward, T={TOKENS}, K={k}, N={n}:\n")
        print("| rows per program | programs | dB partials MB | H100 us (v2: "
              f"{seconds(v2[2:], 'H100 SXM') * 1e6:.0f}) | H200 us (v2: {seconds(v2[2:], 'H200') * 1e6:.0f}) |")
        print("|---:|---:|---:|---:|---:|")
        for rows in (128, 256, 512):
            fused = db_in_grad_rows_launches(TOKENS, k, n, rows)
            print(f"| {rows} | {TOKENS // rows} | {TOKENS // rows * COLS * n * 4 / 1e6:.1f} | "
                  f"{seconds(fused, 'H100 SXM') * 1e6:.0f} | {seconds(fused, 'H200') * 1e6:.0f} |")
        print()
    print("### Routed LoRA decode forward (text tokens)\n")
    print("| T | K | N | MB ours | MB base | H100 us ours | H100 us base | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in (1, 16, 64):
        for k, n in ((4096, 11008), (11008, 4096)):
            ours, base = routed_lora_launches(t, k, n, False), base_launches(t, k, n, False)
            mb = sum(b for *_, b in ours) / 1e6, sum(b for *_, b in base) / 1e6
            so, sb = seconds(ours, "H100 SXM"), seconds(base, "H100 SXM")
            print(f"| {t} | {k} | {n} | {mb[0]:.1f} | {mb[1]:.1f} | {so * 1e6:.1f} | {sb * 1e6:.1f} | {so / sb:.3f}x |")
    positions, hidden, vocab = 16384, 4096, 8192
    fused = [("three GEMMs", 3 * 2 * positions * hidden * vocab, (3 * vocab * hidden + 3 * positions * hidden) * ITEM)]
    logits = [("read both logits, write the gradient", 0, 3 * positions * vocab * ITEM)]
    print(f"\n### KD ideals, P={positions}, H={hidden}, image-code slice V={vocab}\n")
    for name, launches in (("fused_linear_kd_kl_loss", fused), ("kd_kl_loss on logits", logits)):
        print(f"- {name} ({launches[0][0]}): " + ", ".join(f"{gpu} {seconds(launches, gpu) * 1e3:.3f} ms"
                                                       for gpu in GPUS))
    for vocab in (8192, 65536):
        chunk, ours = fused_kd_launches(positions, hidden, vocab)
        ideal = [("three GEMMs", 3 * 2 * positions * hidden * vocab,
                  (3 * vocab * hidden + 3 * positions * hidden) * ITEM)]
        print(f"\n### fused_linear_kd_kl_loss launches, P={positions}, H={hidden}, V={vocab} "
              f"(chunks of {chunk} positions)\n")
        print("| launch (summed over chunks) | GFLOP | MB | H100 us | H200 us |\n|---|---:|---:|---:|---:|")
        for name in dict.fromkeys(n for n, _, _ in ours):
            part = [la for la in ours if la[0] == name]
            f, b = sum(la[1] for la in part), sum(la[2] for la in part)
            print(f"| {name} | {f / 1e9:.1f} | {b / 1e6:.1f} | {seconds(part, 'H100 SXM') * 1e6:.0f} | "
                  f"{seconds(part, 'H200') * 1e6:.0f} |")
        for gpu in GPUS:
            ours_s, ideal_s = seconds(ours, gpu), seconds(ideal, gpu)
            print(f"\n{gpu}: ours {ours_s * 1e3:.3f} ms, three-GEMM ideal {ideal_s * 1e3:.3f} ms, "
                  f"ratio {ours_s / ideal_s:.3f}x", end="")
        print()

    kd_topk_strategies()


def kd_topk_strategies(positions: int = 8192, hidden: int = 4096, n_vocab: int = 8192, topk: int = 256) -> None:
    """The student's part of the top-k KD loss in each form (``mode_kernels.kd_cost``, whose reuse assumption:
    the dense GEMM reads each operand once, the gather re-reads its k rows for every position)."""
    from mode_kernels import kd_cost

    print(f"\n### Top-k KD, the student's part: dense tiles vs gathered rows, P={positions}, H={hidden}, "
          f"slice {n_vocab}, k={topk}, bf16\n")
    print("| weight | machine | dense ms | sparse ms | sparse / dense |\n|---|---|---:|---:|---:|")
    for trainable in (False, True):
        for machine in ("H100 SXM", "H200"):
            t = kd_cost.estimates(machine, positions, hidden, n_vocab, topk, ITEM, trainable)
            print(f"| {'trainable' if trainable else 'frozen'} | {machine} | {t['dense'] * 1e3:.3f} | "
                  f"{t['sparse'] * 1e3:.3f} | {t['sparse'] / t['dense']:.1f}x |")
    gathered = kd_cost.sparse_cost(positions, hidden, topk, ITEM, False)[0][1]
    print(f"\nGathered rows read per pass: {gathered / 1e9:.1f} GB (no reuse across positions); one dense GEMM: "
          f"{kd_cost.dense_cost(positions, hidden, n_vocab, ITEM, False)[0][0] / 1e12:.2f} TFLOP.")
    kd_selection_l2_reads(positions, hidden, n_vocab, topk)


def kd_selection_l2_reads(positions: int, hidden: int, n_vocab: int, topk: int) -> None:
    """What the Triton teacher selection (``_select_kernel``) reads from L2: each program sweeps the whole slice
    for its BLOCK_P positions (the launcher's config for this k), so the slice is read once per row block (HBM
    serves it about once while the programs sweep in step; the rest are L2 hits)."""
    import torch

    from mode_kernels.triton.kd_topk import k_pad, select_config

    block_p = select_config(k_pad(topk), torch.bfloat16)["BLOCK_P"]
    blocks = -(-positions // block_p)
    slice_bytes = n_vocab * hidden * ITEM
    print(f"\nTeacher selection in its GEMM (Triton, k={topk}: {block_p} positions per program): the slice "
          f"({slice_bytes / 1e6:.1f} MB) read by {blocks} row blocks, {blocks * slice_bytes / 1e9:.1f} GB from L2, "
          f"for a {2 * positions * n_vocab * hidden / 1e12:.2f} TFLOP GEMM.")


if __name__ == "__main__":
    main()
