"""Decoding with grouped-query attention and with a sliding-window cache (chapter 04, notebooks 3 and 4).

    python benchmarks/bench_llama.py                 # both tables
    python benchmarks/bench_llama.py --threads 2     # torch threads (default 1: batch-1 decoding is tiny)

1. MHA vs GQA vs MQA at the same width: a Llama of 4 layers, 1024 wide, 16 query heads of 64, with 16, 4 and 1
   key/value heads. For each: KV-cache bytes per token (from the formula and measured on the cache) and greedy
   decoding tokens/s after prompts of several lengths (the fastest of 3 rounds), batch 1, float32, with the KV cache;
   ratios against MHA.
2. Mistral-style sliding window: a small model with a window of 128 decodes 1024 tokens with the plain KVCache and
   with SlidingWindowCache; the bytes each holds at several lengths, and their decoding speed.
All numbers are measured in this run, on this machine.
"""

import argparse
import time

import torch

from scratchlm.generation import KVCache
from scratchlm.gqa import kv_cache_bytes_per_token
from scratchlm.llama import Llama, LlamaConfig, SlidingWindowCache


def model_for(n_kv_heads: int, **changes) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(**{**dict(vocab_size=2048, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=n_kv_heads,
                                   max_position_embeddings=8192), **changes})
    return Llama(config).eval()


@torch.no_grad()
def decode(model: Llama, cache, prompt_len: int, steps: int, rounds: int = 1) -> tuple[float, list[tuple[int, int]]]:
    """Greedy decoding after a random prompt (prefill not timed): `rounds` rounds of `steps` tokens, one after the
    other on the same cache. Returns (tokens/s of the fastest round, [(positions, cache bytes)] after every token).
    The fastest round is the one least disturbed by other work on the machine."""
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    next_id = model(ids, cache=cache)[:, -1:].argmax(-1)
    sizes, best = [], float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(steps):
            next_id = model(next_id, cache=cache)[:, -1:].argmax(-1)
            sizes.append((cache.seq_len, cache.nbytes))
        best = min(best, time.perf_counter() - start)
    return steps / best, sizes


def gqa_table(prompts: list[int], steps: int) -> None:
    print(f"Llama, 4 layers, 1024 wide, 16 query heads of 64, float32, batch 1; greedy tokens/s after the prompt "
          f"(the fastest of 3 rounds of {steps} tokens)")
    header = "| attention | KV heads | cache bytes/token (formula) | measured | " + " | ".join(
        f"tok/s @ {p}" for p in prompts) + " | " + " | ".join(f"speed-up @ {p}" for p in prompts) + " |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    baseline = None
    for label, n_kv in (("MHA", 16), ("GQA 4:1", 4), ("MQA", 1)):
        model = model_for(n_kv)
        rates, measured = [], None
        for prompt_len in prompts:
            cache = KVCache(max_len=prompt_len + 3 * steps + 1)
            rate, sizes = decode(model, cache, prompt_len, steps, rounds=3)
            rates.append(rate)
            measured = sizes[-1][1] // sizes[-1][0]
        formula = kv_cache_bytes_per_token(4, n_kv, 64, torch.float32)
        baseline = baseline or rates
        print(f"| {label} | {n_kv} | {formula:,} | {measured:,} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
              + " | ".join(f"{r / b:.2f}x" for r, b in zip(rates, baseline, strict=True)) + " |")


def window_table(window: int, total: int) -> None:
    print(f"\nMistral-style model (4 layers, 1024 wide, 16 query heads, 4 KV heads), sliding window {window}, "
          f"greedy decoding to {total} positions after an 8-token prompt, float32, batch 1")
    model = model_for(4, sliding_window=window)
    rate_full, sizes_full = decode(model, KVCache(), 8, total - 8)
    rate_rolling, sizes_rolling = decode(model, SlidingWindowCache.for_model(model), 8, total - 8)
    print("| positions | KVCache bytes | SlidingWindowCache bytes | ratio |")
    print("|---|---|---|---|")
    checkpoints = [n for n in (window // 2, window, 2 * window, 4 * window, total) if n <= total]
    for (n, full), (_, rolling) in zip(sizes_full, sizes_rolling, strict=True):
        if n in checkpoints:
            print(f"| {n:,} | {full:,} | {rolling:,} | {full / rolling:.1f}x |")
    print(f"decoding tokens/s over the whole run: KVCache {rate_full:.1f}, SlidingWindowCache {rate_rolling:.1f} "
          f"({rate_rolling / rate_full:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps per timed round (default 16)")
    parser.add_argument("--quick", action="store_true", help="short prompts and sequences, for a smoke test")
    args = parser.parse_args([] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print(f"torch threads: {args.threads}")
        gqa_table([64, 256] if args.quick else [256, 1024, 4096], 4 if args.quick else args.steps)
        window_table(32 if args.quick else 256, 128 if args.quick else 2048)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
