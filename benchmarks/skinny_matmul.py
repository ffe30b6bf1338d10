"""The decode step's matmuls on their own: cuBLAS against a split-K Triton matmul, at a decode
step's rows (the batch) and the layer shapes of gpt2-xl and gpt2.

    python benchmarks/skinny_matmul.py [--batches 64,256] [--device cuda] [--tiny]

Why: run 4's H200 profile of the batch-64 decode step (gpt2-xl + gpt2, bf16) spent 1.94 of its
5.21 ms of kernel time in the 242 matmuls and their split-K reductions, which read 3.36 GB of
weights: 1.7 TB/s, where a copy moves 4.2. With 64 rows a matmul has one tile row, and cuBLAS's
64-column tiles give the teacher's layers 25-100 tiles for 132 SMs. A split-K matmul hands every
SM a slice of the weights. This measures, per shape and over more configs than the engine's
`decode_matmul.plan` tries when it picks the kernel or cuBLAS for a decoder, how close each
comes: each shape as the step runs it (GPT-2's Conv1D, `torch.addmm(bias, x, W)` with W [in,
out]) against `splitk_matmul` in each config below, all replayed from CUDA graphs over copies of
the weights that exceed L2 together (as in the step, where every other layer's weights pass
through L2 between two visits of this one). Prints microseconds and the weights' bytes per
second per shape, the best config, and both summed over one decode step's layers.

The kernel is the engine's (engine/decode_matmul.py): the split-K partial sums go to a float32
buffer and a second kernel adds them in a fixed order with the bias (deterministic, unlike atomic
adds). `--tiny`: small shapes in float32 through Triton's interpreter on the CPU, outputs
checked, nothing timed.
"""
from __future__ import annotations

import itertools

from _common import base_parser, emit, low_dtype, machine, setup, table

import torch

# one row per layer matmul: (model, name, in, out, per decode step)
SHAPES = [("teacher", "c_attn", 1600, 4800, 48), ("teacher", "attn.c_proj", 1600, 1600, 48),
          ("teacher", "c_fc", 1600, 6400, 48), ("teacher", "mlp.c_proj", 6400, 1600, 48),
          ("student", "c_attn", 768, 2304, 12), ("student", "attn.c_proj", 768, 768, 12),
          ("student", "c_fc", 768, 3072, 12), ("student", "mlp.c_proj", 3072, 768, 12)]
TINY_SHAPES = [("teacher", "c_fc", 64, 256, 2), ("teacher", "mlp.c_proj", 256, 64, 2)]
# (BLOCK_N, BLOCK_K, SPLIT): 64-row tiles at the batches 64 and 256 (decode_matmul._block_m)
CONFIGS = list(itertools.product((32, 64, 128), (64, 128), (1, 2, 4, 8)))
TINY_CONFIGS = [(32, 32, 1), (32, 32, 4)]


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--batches", default=None, help="comma list (default 64,256; tiny 4)")
    args = setup(ap.parse_args(), "skinny_matmul")
    from minillm_cli.engine.decode_attention import _l2_bytes, _time, available
    from minillm_cli.engine.decode_matmul import splitk_matmul, tolerance

    if not available(args.device):
        print("needs Triton (on CPU: TRITON_INTERPRET=1 before it is imported)")
        return 1
    cuda = args.device.type == "cuda"
    tiny = args.tiny or not cuda
    dt = low_dtype(args) if cuda else torch.float32
    batches = [int(b) for b in (args.batches or ("4" if tiny else "64,256")).split(",")]
    shapes, configs = (TINY_SHAPES, TINY_CONFIGS) if tiny else (SHAPES, CONFIGS)
    emit(args, {"kind": "machine", **machine(args), "dtype": str(dt), "l2_bytes": _l2_bytes(args.device)})
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    rows, totals = [], {}
    for B, (model, name, K, N, per_step) in itertools.product(batches, shapes):
        w_bytes = K * N * torch.empty((), dtype=dt).element_size()
        # enough copies that the ones a timed graph cycles through exceed L2 three times
        copies = max(1, min(160, -(-3 * _l2_bytes(args.device) // w_bytes))) if cuda else 1
        reps = max(24, copies)
        ws = [torch.randn(K, N, generator=g, device=args.device, dtype=dt) / K ** 0.5 for _ in range(copies)]
        bias = torch.randn(N, generator=g, device=args.device, dtype=dt)
        x = torch.randn(B, K, generator=g, device=args.device, dtype=dt)
        want = torch.addmm(bias.float(), x.float(), ws[0].float())
        rec = {"kind": "shape", "batch": B, "model": model, "layer": name, "in": K, "out": N,
               "per_step": per_step, "weight_bytes": w_bytes}
        out = torch.empty(B, N, dtype=dt, device=args.device)
        partial = torch.empty(8, B, N, dtype=torch.float32, device=args.device)
        if cuda:
            def cublas(i):
                return torch.addmm(bias, x, ws[i])
            rec["cublas_us"] = 1e6 * _time(cublas, copies, reps)
        best = None
        for config in configs:
            def ours(i, config=config):
                return splitk_matmul(x, ws[i], bias, config, out=out,
                                     partial=partial[: config[2]] if config[2] > 1 else None)
            try:
                err = float((ours(0).float() - want).abs().max())
                if not err <= tolerance(dt, float(want.abs().max())):
                    rec.setdefault("wrong", []).append([list(config), err])
                    continue
                if cuda:
                    t = _time(ours, copies, reps)
                    if best is None or t < best[0]:
                        best = (t, config)
                else:
                    rec.setdefault("checked", []).append(list(config))
            except Exception as e:  # a config Triton cannot build here: reported, the rest go on
                rec.setdefault("errors", []).append([list(config), f"{type(e).__name__}: {e}"[:200]])
        if best is not None:
            rec.update(triton_us=1e6 * best[0], config=list(best[1]))
        for side in ("cublas", "triton"):
            if f"{side}_us" in rec:
                rec[f"{side}_TBps"] = w_bytes / rec[f"{side}_us"] / 1e6
        if cuda:  # per decode step: cuBLAS throughout, and each shape's faster side (where a
            # shape has no working config, cuBLAS)
            for side, us in (("cublas", rec["cublas_us"]),
                             ("faster_per_shape", min(rec["cublas_us"], rec.get("triton_us", float("inf"))))):
                totals[(B, side)] = totals.get((B, side), 0.0) + per_step * us / 1e3
        emit(args, rec)
        rows.append(rec)
        ws.clear()  # (the copies: together three times L2)
    for (B, side), ms in sorted(totals.items()):
        emit(args, {"kind": "step_total", "batch": B, "side": side, "ms_per_step": ms})
    if cuda:
        table(rows, [("batch", "batch", ""), ("model", "model", ""), ("layer", "layer", ""),
                     ("cublas_us", "cuBLAS us", "{:.1f}"), ("cublas_TBps", "TB/s", "{:.2f}"),
                     ("triton_us", "Triton us", "{:.1f}"), ("triton_TBps", "TB/s", "{:.2f}"),
                     ("config", "config", "")])
        for (B, side), ms in sorted(totals.items()):
            print(f"batch {B}: matmuls {ms:.3f} ms per decode step, {side} (layers only, no LM heads)")
    else:
        print(f"checked {sum(len(r.get('checked', [])) for r in rows)} shape x config outputs on the CPU")
    wrong = [r for r in rows if r.get("wrong") or (not cuda and r.get("errors"))]
    if wrong:
        print(f"{len(wrong)} shapes with a config that gives a wrong result" + ("" if cuda else " or fails"))
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
