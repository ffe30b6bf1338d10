"""Generation throughput of `evaluate` against the naive loop, in one run on the same model and prompts.

    python benchmarks/generation.py [--prompts 48] [--max-new-tokens 64] [--batch-size 16]
                                    [--layers 4] [--width 256] [--device cpu] [--threads N]

Model: a randomly initialised GPT-2 (--layers x --width) with a byte-level BPE (vocabulary 4096)
trained here on the prompts' text, so nothing comes from the Hub. Prompts: the Dolly sample in
the shared data folder when present (Dolly template, prompts over 256 tokens dropped, as evaluate
does), else synthetic instructions. Both sides sample with the paper's protocol (temperature 1,
top-k 0, top-p 1, no-repeat-ngram 6, cut at EOS) and decode the text.
Ours: `eval.generate.generate_batches` (length-sorted left-padded batches, KV cache, per-row
generators): exactly what `evaluate` runs for one seed. Naive: one `model.generate(do_sample=True)`
call per prompt. A random model rarely emits EOS, so both produce about --max-new-tokens per prompt;
tokens/s counts the tokens each side actually generated.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DOLLY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dolly-sample.jsonl"


def load_prompt_examples(n: int):
    from minillm_cli.data.examples import Example, load_examples

    for path in (DOLLY, Path("/work/shared/data/dolly-sample.jsonl")):
        if path.exists():
            return load_examples(str(path)), str(path)
    topics = ["rivers", "bread", "chess", "volcanoes", "jazz", "tides", "bees", "glass"]
    return [Example(f"Explain in two sentences how {topics[i % 8]} relate to {topics[(i * 3 + 1) % 8]}.")
            for i in range(4 * n)], "synthetic"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()

    import torch

    from minillm_cli.data.template import render_prompt
    from minillm_cli.data.tokenize import encode_prompts
    from minillm_cli.engine.sampler import SamplingParams
    from minillm_cli.eval.generate import generate_batches
    from minillm_cli.models import load_model, load_tokenizer
    from minillm_cli.toy.tiny import make_gpt2, train_bpe_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    examples, source = load_prompt_examples(args.prompts)
    with tempfile.TemporaryDirectory() as tmp:
        texts = [render_prompt(e) + " ".join(e.references) for e in examples]
        tok0 = train_bpe_tokenizer(texts, Path(tmp) / "tok", vocab_size=4096)
        make_gpt2(tok0, Path(tmp) / "model", n_layer=args.layers, n_embd=args.width, n_head=max(1, args.width // 64))
        tok = load_tokenizer(str(Path(tmp) / "model"))
        model = load_model(str(Path(tmp) / "model"), tokenizer=tok, device=device, trainable=False)
    prompts, kept, _ = encode_prompts(tok, examples, "dolly", 256)
    prompts, kept = prompts[: args.prompts], kept[: args.prompts]
    params = SamplingParams(args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, no_repeat_ngram_size=6)
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def ours() -> int:
        n_tok = 0
        for b in generate_batches(model, prompts, params=params, seed=0, example_ids=kept, eos_id=eos, pad_id=pad,
                                  vocab_size=len(tok), device=device, batch_size=args.batch_size, max_length=512):
            for t in b.token_lists():
                tok.decode(t, skip_special_tokens=True)
                n_tok += len(t)
        return n_tok

    def naive() -> int:
        n_tok = 0
        torch.manual_seed(0)
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, no_repeat_ngram_size=6, max_new_tokens=args.max_new_tokens,
                                 eos_token_id=eos, pad_token_id=pad)
            new = out[0, len(p):].tolist()
            new = new[: new.index(eos)] if eos in new else new
            tok.decode(new, skip_special_tokens=True)
            n_tok += len(new)
        return n_tok

    # warm both paths up once (first calls allocate and pick kernels)
    next(generate_batches(model, prompts[:2], params=SamplingParams(2), seed=0, eos_id=eos, pad_id=pad,
                          vocab_size=len(tok), device=device, batch_size=2, max_length=512))
    model.generate(input_ids=torch.tensor([prompts[0]], device=device), max_new_tokens=2, do_sample=True,
                   pad_token_id=pad)
    rows = []
    for name, fn in (("evaluate (batched, KV cache)", ours), ("naive model.generate loop", naive)):
        t0 = time.perf_counter()
        n_tok = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append((name, len(prompts) / dt, n_tok / dt, dt))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"model: GPT-2 {args.layers} layers x {args.width}, vocabulary {len(tok)}; prompts: {len(prompts)} from "
          f"{source} (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens); max new tokens {args.max_new_tokens}; "
          f"batch size {args.batch_size}")
    print(f"{'':32s} {'examples/s':>11s} {'tokens/s':>10s} {'seconds':>8s}")
    for name, eps, tps, dt in rows:
        print(f"{name:32s} {eps:11.2f} {tps:10.1f} {dt:8.1f}")
    speedup = rows[0][1] / rows[1][1]
    print(f"speedup: {speedup:.1f}x examples/s")
    return 0 if speedup > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
