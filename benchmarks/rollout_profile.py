"""Where a decode step's time goes: a kernel profile of one teacher-mixed step, and the captured
step's time under switches that change the kernels (same models and shapes as rollout.py).

    python benchmarks/rollout_profile.py [--batch 64] [--prompt-len 128] [--new-tokens 128]
                                         [--variants base,gelu_new,...] [--device cuda] [--tiny]

Profile: `torch.profiler` over a few eager static-cache steps (the kernels a CUDA graph replays),
the top kernels by device time, kernels per step, and device time per step; with SDPA, then
again with the decode-attention kernel where Triton is at hand. Variants (each the
"graph" engine, warmed, then one timed rollout):
  base          the engine as shipped (GPT-2's gelu_new runs as torch's fused tanh GELU; an
                additive attention mask, built once per model and step)
  gelu_new      the sampler's fusion off: the composed GELU (~7 elementwise kernels)
  math_bf16     torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True) (math SDPA without
                the float32 upcast)
  efficient     SDPA forced to the memory-efficient kernel
  cudnn         SDPA forced to cuDNN attention
  bool_mask     a boolean mask (SDPA converts it in every layer)
  fp32_student  the student as `distill` holds it: float32 master weights sampled under bf16
                autocast (bf16 copies of its matmul weights cast once per call,
                engine/sampling_weights.py)
  per_step_casts  no such copies: autocast casts the float32 weights in every decode step (the
                engine before them; use with fp32_student)
  plain_head    the LM heads as they are (odd vocabulary rows: cuBLAS's align1 kernels) instead
                of the copies padded to 64 rows that ship on CUDA (sampling_weights.PaddedHead)
  streams       fast_sampler.PARALLEL_MODELS: the student's forward on a second CUDA stream,
                concurrent with the teacher's, inside the captured step (the default since the
                H200's run 3: 6.28 -> 5.76 ms/step at batch 64)
  one_stream    both forwards on one stream (the default before run 3)
  buckets       fast_sampler.KV_BUCKETS = 4: attention over the used prefix of the caches, one
                captured graph per bucket (off by default; first_call_s shows the captures)
  kernel_attn   fast_sampler.DECODE_ATTENTION = "kernel": every decode attention through the
                Triton kernel (engine/decode_attention.py: reads the columns in use only)
  sdpa_attn     DECODE_ATTENTION = "sdpa": SDPA over the whole cache ("base" runs "auto", which
                times both per model and picks; each record says what it ran)
  separate_writes  fast_sampler.FUSED_CACHE_WRITES = False: where the kernel attends, the step's
                key and value are written by two copy kernels per layer first (the engine before
                the kernel wrote them itself)
  cublas_mm     fast_sampler.DECODE_MATMUL = "cublas": every decode matmul through cuBLAS
                ("base" runs "auto": engine/decode_matmul.py's split-K kernel for the shapes it
                measures faster; each record's "matmuls" says which)
  splitk_mm     DECODE_MATMUL = "kernel": every decode matmul shape through the split-K kernel
Variants combine with "+" (e.g. gelu_new+efficient). The 2026-11-28 H200 run predates both
defaults: its "base" was today's gelu_new+bool_mask, its "gelu_tanh" today's bool_mask, and its
"float_mask" today's gelu_new.
Failures are reported and skipped.
"""
from __future__ import annotations

import contextlib
import copy
import time

from _common import (base_parser, build_pair, decode_step_fields, emit, kernel_profile, low_dtype, machine, random_prompts, setup,
                     sync)


@contextlib.contextmanager
def _patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def main() -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--alpha", type=float, default=0.2)
    ap.add_argument("--variants", default="base,cublas_mm,splitk_mm,kernel_attn,sdpa_attn,separate_writes,kernel_attn+separate_writes,plain_head,one_stream,buckets,fp32_student,"
                                           "fp32_student+per_step_casts,fp32_student+one_stream,gelu_new,bool_mask")
    ap.add_argument("--profile-steps", type=int, default=4)
    args = setup(ap.parse_args(), "rollout_profile")
    import torch

    from minillm_cli.engine import fast_sampler as fs
    from minillm_cli.engine.sampler import SamplingParams, sample

    B = args.batch or (4 if args.tiny else 64)
    P = args.prompt_len or (16 if args.tiny else 128)
    T = args.new_tokens or (16 if args.tiny else 128)
    student, teacher, spec = build_pair(args)
    V = spec["vocab"]
    eos = V - 1
    info = machine(args)
    emit(args, {"kind": "machine", **info, "batch": B, "prompt": P, "new_tokens": T})
    ids, mask = random_prompts(B, P, V, args.device, args.seed)

    # -- profile of eager static steps ---------------------------------------------------------
    L = -(-(P + T) // 16) * 16
    models = {"student": fs.make_model(student, V, B, L, args.device),
              "teacher": fs.make_model(teacher, V, B, L, args.device)}
    dec = fs.make_decoder(models, B=B, P=P, T=T, L=L, alpha=args.alpha, params=SamplingParams(T), eos_id=eos,
                          pad_id=eos, vocab_size=V, device=args.device)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        stack.enter_context(fs.fused_activations([student, teacher]))  # as the sampler runs them
        for m in models.values():  # (the padded heads; float32 weights' copies)
            m.refresh_copies()
        for m in models.values():
            stack.enter_context(m.installed_copies())
        dec.load(ids, mask.bool(), torch.rand(B, T).to(args.device))
        for _ in range(2):
            dec.step()
        sync(args.device)
        prof = kernel_profile(dec.step, args.profile_steps, args.device)
        emit(args, {"kind": "profile", "attention": "sdpa", **prof})
        if fs.decode_attention.available(args.device):  # the same steps through the kernel
            for m in models.values():
                m.decode_kernel = True
            # (the kernel reads the columns in use: profile steps at the rollout's mean width, P + T/2,
            # where SDPA above read all L at every step)
            dec.t.fill_(T // 2)
            try:
                for _ in range(2):
                    dec.step()
                sync(args.device)
                prof = kernel_profile(dec.step, args.profile_steps, args.device)
                emit(args, {"kind": "profile", "attention": "kernel", **prof})
            except Exception as e:  # report and go on
                emit(args, {"kind": "profile", "attention": "kernel", "error": f"{type(e).__name__}: {e}"[:300]})
    del dec, models
    fs.release()

    # -- variants of the captured step -----------------------------------------------------------
    def sdpa_only(name):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([getattr(SDPBackend, name)])

    for variant in args.variants.split(","):
        parts = variant.split("+")
        ctx = contextlib.ExitStack()
        try:
            if "gelu_new" in parts:
                ctx.enter_context(_patched(fs, "fused_activations", lambda models: contextlib.nullcontext()))
            if "math_bf16" in parts:
                f = getattr(torch.backends.cuda, "allow_fp16_bf16_reduction_math_sdp", None)
                if f is None:
                    raise RuntimeError("torch has no allow_fp16_bf16_reduction_math_sdp")
                f(True)
                ctx.callback(f, False)
            if "efficient" in parts:
                ctx.enter_context(sdpa_only("EFFICIENT_ATTENTION"))
            if "cudnn" in parts:
                ctx.enter_context(sdpa_only("CUDNN_ATTENTION"))
            if "bool_mask" in parts:
                ctx.enter_context(_patched(fs.StaticModel, "mask", lambda self, allow: allow))
            if "per_step_casts" in parts:
                ctx.enter_context(_patched(fs, "SAMPLING_WEIGHTS", False))
            if "plain_head" in parts:
                ctx.enter_context(_patched(fs, "PAD_HEAD_DEVICES", ()))
            if "streams" in parts:
                ctx.enter_context(_patched(fs, "PARALLEL_MODELS", True))
            if "one_stream" in parts:
                ctx.enter_context(_patched(fs, "PARALLEL_MODELS", False))
            if "buckets" in parts:
                ctx.enter_context(_patched(fs, "KV_BUCKETS", 4))
            if "kernel_attn" in parts:
                ctx.enter_context(_patched(fs, "DECODE_ATTENTION", "kernel"))
            if "sdpa_attn" in parts:
                ctx.enter_context(_patched(fs, "DECODE_ATTENTION", "sdpa"))
            if "separate_writes" in parts:
                ctx.enter_context(_patched(fs, "FUSED_CACHE_WRITES", False))
            if "cublas_mm" in parts:
                ctx.enter_context(_patched(fs, "DECODE_MATMUL", "cublas"))
            if "splitk_mm" in parts:
                ctx.enter_context(_patched(fs, "DECODE_MATMUL", "kernel"))
            s_model = student
            if "fp32_student" in parts:
                s_model = copy.deepcopy(student).float()
                ctx.enter_context(torch.autocast(args.device.type, dtype=low_dtype(args)))
            fs.static_check._CHECKED.clear()

            def run():
                gens = [torch.Generator().manual_seed(b) for b in range(B)]
                return sample(s_model, teacher, ids, mask, params=SamplingParams(T), alpha=args.alpha, eos_id=eos,
                              pad_id=eos, generators=gens, vocab_size=V, engine="graph")
            sync(args.device)
            t0 = time.perf_counter()
            run()
            sync(args.device)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = run()
            sync(args.device)
            secs = time.perf_counter() - t0
            steps = r.response_ids.shape[1]
            rec = {"kind": "variant", "variant": variant, "batch": B, "ms_per_step": 1e3 * secs / steps,
                   "tokens_per_s": B * steps / secs, "first_call_s": first, **decode_step_fields()}
        except Exception as e:  # report and go on
            rec = {"kind": "variant", "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]}
        finally:
            ctx.close()  # every switch undone
            fs.release()
        emit(args, rec)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
