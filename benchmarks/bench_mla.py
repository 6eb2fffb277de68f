"""Multi-head latent attention (chapter 05, notebook 3): plain vs absorbed decoding, and cache bytes per token.

    python benchmarks/bench_mla.py                 # both tables
    python benchmarks/bench_mla.py --threads 2     # torch threads (default 1)

1. Cache bytes per token, float32, 4 layers of width 1024 with 16 query heads of 64 (the sizes of bench_llama.py):
   MHA (16 key/value heads), GQA 4:1, MQA, and MLA with DeepSeek-V2's ratios (latent d_c = 4 * 64 = 256, rotary
   key of 64 / 2 = 32), by the formulas and measured on the caches after a 64-token prompt.
2. Decoding with MLA: a stack of 4 MLA layers (attention only, with residuals) of that width, latent 256, rotary
   slice 32, non-rotary 64, values 64, batch 1, float32: tokens/s after contexts of 256, 1024 and 4096 positions,
   three designs with the same weights: the plain path (every cached latent up-projected at every step, as
   transformers does), the absorbed one (attention over the latents), and ExpandedCacheMLA (every head's keys and
   values up-projected once and cached, DeepSeek's attn_impl="naive"); the prompt prefilled in the expanded form, then
   the fastest of 5 rounds of 8 tokens, the three designs taking turns in each round. The outputs are checked equal
   first.
All numbers are measured in this run, on this machine.
"""

import argparse
import time

import torch

from scratchlm.generation import KVCache
from scratchlm.gqa import GroupedQueryAttention, kv_cache_bytes_per_token
from scratchlm.mla import ExpandedCacheMLA, MultiHeadLatentAttention, mla_cache_elements_per_token
from scratchlm.rope import RotaryEmbedding

LAYERS, WIDTH, HEADS, HEAD_DIM = 4, 1024, 16, 64
LATENT, ROPE = 4 * HEAD_DIM, HEAD_DIM // 2  # DeepSeek-V2: d_c = 4 d_h, d_h^R = d_h / 2


def mla_stack(cls=MultiHeadLatentAttention) -> list[MultiHeadLatentAttention]:
    torch.manual_seed(0)  # the same weights for either class
    return [cls(WIDTH, HEADS, LATENT, HEAD_DIM, ROPE, HEAD_DIM, layer_idx=i).eval() for i in range(LAYERS)]


@torch.no_grad()
def run(layers, x, rotary, cache, offset=0):
    cos, sin = rotary(x.size(1), offset=offset)
    for layer in layers:
        x = x + layer(x, cos, sin, cache=cache)
    return x


def cache_table(prompt: int = 64) -> None:
    print(f"Cache bytes per token, float32, {LAYERS} layers, width {WIDTH}, {HEADS} query heads of {HEAD_DIM}")
    print("| attention | cached per layer | bytes/token (formula) | measured | vs MHA |")
    print("|---|---|---|---|---|")
    x = torch.randn(1, prompt, WIDTH)
    rows = []
    for name, kv_heads in (("MHA", 16), ("GQA 4:1", 4), ("MQA", 1)):
        torch.manual_seed(0)
        layers = [GroupedQueryAttention(WIDTH, HEADS, kv_heads, HEAD_DIM, layer_idx=i) for i in range(LAYERS)]
        cache = KVCache()
        run(layers, x, RotaryEmbedding(HEAD_DIM), cache)
        rows.append((name, f"K and V, {kv_heads} head{'s' if kv_heads > 1 else ''} of {HEAD_DIM}",
                     kv_cache_bytes_per_token(LAYERS, kv_heads, HEAD_DIM, torch.float32), cache.nbytes // prompt))
    cache = KVCache()
    run(mla_stack(), x, RotaryEmbedding(ROPE), cache)
    rows.append(("MLA", f"latent {LATENT} + rotary key {ROPE}", 4 * mla_cache_elements_per_token(LAYERS, LATENT, ROPE),
                 cache.nbytes // prompt))
    for name, what, formula, measured in rows:
        if formula != measured:
            raise AssertionError(f"{name}: the cache holds {measured} bytes per token, the formula says {formula}")
        print(f"| {name} | {what} | {formula:,} | {measured:,} | {formula / rows[0][2]:.2%} |")


@torch.no_grad()
def decode_rates(designs: dict, context: int, steps: int = 8, rounds: int = 5) -> dict[str, float]:
    """Tokens/s of each design (name: (layers, absorb)) after `context` positions, prefilled in the expanded form (not
    timed); the fastest of `rounds` rounds, the designs taking turns within each round so that load hits all alike."""
    rotary, caches = RotaryEmbedding(ROPE), {name: KVCache() for name in designs}
    for name, (layers, _) in designs.items():
        for layer in layers:
            layer.absorb = False
        run(layers, torch.randn(1, context, WIDTH, generator=torch.Generator().manual_seed(0)), rotary, caches[name])
    best = dict.fromkeys(designs, float("inf"))
    for _ in range(rounds):
        for name, (layers, absorb) in designs.items():
            for layer in layers:
                layer.absorb = absorb
            caches[name].crop(context)
            token = torch.randn(1, 1, WIDTH, generator=torch.Generator().manual_seed(1))
            start = time.perf_counter()
            for t in range(steps):
                token = run(layers, token, rotary, caches[name], offset=context + t)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: steps / seconds for name, seconds in best.items()}


@torch.no_grad()
def check_equal(layers, expanded) -> float:
    x = torch.randn(1, 40, WIDTH)
    outputs = []
    for stack, absorb in ((layers, False), (layers, True), (expanded, False)):
        for layer in stack:
            layer.absorb = absorb
        cache = KVCache()
        prompt = run(stack, x[:, :32], RotaryEmbedding(ROPE), cache)
        steps = [run(stack, x[:, t : t + 1], RotaryEmbedding(ROPE), cache, offset=t) for t in range(32, 40)]
        outputs.append(torch.cat([prompt, *steps], dim=1))
    return max((outputs[0] - other).abs().max().item() for other in outputs[1:])


def decode_table(contexts: list[int]) -> None:
    layers, expanded = mla_stack(), mla_stack(ExpandedCacheMLA)
    gap = check_equal(layers, expanded)
    if gap > 1e-4:
        raise AssertionError(f"the three designs' decoding outputs differ by {gap:.1e}")
    print(f"\nMLA decoding, {LAYERS} attention layers, width {WIDTH}, {HEADS} heads, latent {LATENT}, batch 1, float32; "
          f"tokens/s after the context, prefilled in the expanded form (fastest of 5 rounds of 8 tokens, the designs "
          f"in turn); the three designs' outputs agree within 1e-4. "
          f"Cached per token and layer: latent {LATENT + ROPE} numbers (plain, absorbed), expanded keys and values "
          f"{HEADS * (HEAD_DIM + ROPE + HEAD_DIM):,}")
    print("| context | plain tok/s | absorbed tok/s | cached K/V tok/s | absorbed vs plain | absorbed vs cached K/V |")
    print("|---|---|---|---|---|---|")
    designs = {"plain": (layers, False), "absorbed": (layers, True), "cached K/V": (expanded, False)}
    for context in contexts:
        rates = decode_rates(designs, context)
        plain, absorbed, cached = rates["plain"], rates["absorbed"], rates["cached K/V"]
        print(f"| {context} | {plain:.1f} | {absorbed:.1f} | {cached:.1f} | {absorbed / plain:.2f}x | "
              f"{absorbed / cached:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_table()
    decode_table([256, 1024, 4096])


if __name__ == "__main__":
    main()
