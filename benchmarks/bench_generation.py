"""KV-cache decoding vs recomputation: tokens per second for greedy generation of 256 and 1,024 new tokens.

The model is a random character-level GPT (the size of the CPU-profile models of chapter 03, a little
wider): n_layer=4, n_head=4, n_embd=256, vocab_size=65, block_size=2048 (room for a 16-token prompt and
1,024 new tokens), float32, batch 1, on CUDA when there is a GPU, else the CPU. Weights are random: the
speed does not depend on them, and greedy decoding gives the same tokens either way, which is checked.
Run alone with `python benchmarks/bench_generation.py`, or with the others by `make bench`.
"""

import time

import torch

from scratchlm.generation import generate
from scratchlm.gpt import GPT, GPTConfig

CONFIG = GPTConfig(vocab_size=65, block_size=2048, n_layer=4, n_head=4, n_embd=256)
PROMPT_LEN = 16
NEW_TOKENS = (256, 1024)


def _timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT(CONFIG).to(device).eval()
    prompt = torch.randint(0, CONFIG.vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).to(device)
    generate(model, prompt, 8, use_cache=True)  # warm-up (kernels, allocator)
    generate(model, prompt, 8, use_cache=False)
    print(f"model: GPT {CONFIG.n_layer} layers, {CONFIG.n_head} heads, n_embd {CONFIG.n_embd}, vocab {CONFIG.vocab_size}, "
          f"{model.num_parameters():,} parameters; prompt {PROMPT_LEN} tokens, batch 1, greedy, float32, {device}")
    print(f"{'new tokens':>10} | {'KV cache tok/s':>14} | {'recompute tok/s':>15} | {'speed-up':>8}")
    for n in NEW_TOKENS:
        cached_s, cached = _timed(lambda n=n: generate(model, prompt, n, use_cache=True), device)
        recompute_s, recomputed = _timed(lambda n=n: generate(model, prompt, n, use_cache=False), device)
        if not torch.equal(cached, recomputed):
            raise AssertionError("the KV cache changed the generated tokens")
        print(f"{n:>10} | {n / cached_s:>14.1f} | {n / recompute_s:>15.1f} | {recompute_s / cached_s:>7.1f}x")


if __name__ == "__main__":
    main()
