"""Attention, three ways, side by side: time and peak memory of one causal forward pass.

    python benchmarks/bench_attention.py                     # T = 256, 1024, 4096
    python benchmarks/bench_attention.py --lengths 512 2048 --threads 1

- naive: `scratchlm.flash.naive_attention`, the textbook softmax(q kᵀ / √d) v that holds the whole
  (B, nh, T, T) matrix of scores (and its softmax) in memory;
- tiled: `scratchlm.flash.tiled_attention`, our FlashAttention-style forward in plain PyTorch
  (blocks of 128 queries and 128 keys, running max and sum, causal tiles above the diagonal skipped);
- SDPA: `torch.nn.functional.scaled_dot_product_attention`, PyTorch's fused kernels.

Shapes: batch 1, 8 heads of 64, float32, causal, on CUDA when there is a GPU, else the CPU. At
T = 4096 one (1, 8, T, T) float32 matrix is 512 MiB, so naive attention needs about 1 GiB.

Time: the best (minimum) of several calls after one untimed warm-up call; the minimum is the
measurement least disturbed by other work on the machine.

Peak memory, measured in a separate call: on a CPU, PyTorch keeps no allocator statistics, so
`scratchlm.flash.memory_profile` runs the call under `torch.profiler` with `profile_memory=True`,
which records every allocation and free of tensor memory in order; the largest running total is the
peak the call added on top of what was allocated before it (inputs not counted, the output counted),
and the largest single allocation shows whether a T x T tensor was ever created. Memory allocated
outside PyTorch's allocator (BLAS workspaces) is not counted. On CUDA: `torch.cuda.max_memory_allocated`
after `reset_peak_memory_stats`, minus what was allocated before the call (no largest-allocation column).
The tiled result is checked against the naive one (max abs difference, fp32) at every length.

On a machine shared with other jobs, run with `--threads 1`: with more threads than free cores the
many small operations of the tiled loop (and naive attention's softmax) wait on each other, and the
times say more about the other jobs than about attention (measured here: 2 threads on 2 busy cores
made tiled attention 4 to 60 times slower than 1 thread; SDPA and memory were hardly affected).
"""

import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from scratchlm.flash import memory_profile, naive_attention, tiled_attention

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 8, 64, 128
LENGTHS = (256, 1024, 4096)
METHODS = {
    "naive": lambda q, k, v: naive_attention(q, k, v, is_causal=True),
    "tiled": lambda q, k, v: tiled_attention(q, k, v, block_size=BLOCK, is_causal=True),
    "SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: first-call costs (allocator, kernel selection) are not what we measure
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def peak_memory(fn, device: str) -> tuple[int, int | None]:
    """(peak bytes added by the call, largest single allocation or None where it is not measured)."""
    if device == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated() - before, None
    return memory_profile(fn, device)


def main(lengths=LENGTHS, threads: int | None = None) -> None:
    if threads:
        torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"causal attention forward, batch {BATCH}, {HEADS} heads of {HEAD_DIM}, float32, {device}, "
          f"{torch.get_num_threads()} threads; tiled blocks {BLOCK}x{BLOCK}; time = best of several calls; "
          f"peak = most tensor memory the call had allocated at once (see the module docstring)")
    header = (f"{'T':>5} | {'method':<6} | {'time ms':>9} | {'x naive':>7} | {'peak MiB':>9} | "
              f"{'largest MiB':>11} | {'naive / this':>12} | {'T x T matrix MiB':>16}")
    print(header)
    print("-" * len(header))
    for T in lengths:
        g = torch.Generator().manual_seed(T)
        q, k, v = (torch.randn(BATCH, HEADS, T, HEAD_DIM, generator=g).to(device) for _ in range(3))
        diff = (tiled_attention(q, k, v, block_size=BLOCK, is_causal=True)
                - naive_attention(q, k, v, is_causal=True)).abs().max().item()
        if diff > 1e-5:
            raise AssertionError(f"tiled attention differs from naive by {diff:.2e} at T={T}")
        repeats = 3 if T >= 4096 else 5
        rows = {}
        for name, method in METHODS.items():
            run = partial(method, q, k, v)
            rows[name] = (best_time(run, device, repeats), *peak_memory(run, device))
        matrix_mib = BATCH * HEADS * T * T * 4 / 2**20
        naive_time, naive_peak, _ = rows["naive"]
        for name, (seconds, peak, largest) in rows.items():
            largest_text = f"{largest / 2**20:11.2f}" if largest is not None else f"{'-':>11}"
            print(f"{T:>5} | {name:<6} | {seconds * 1e3:9.1f} | {naive_time / seconds:6.2f}x | {peak / 2**20:9.1f} | "
                  f"{largest_text} | {naive_peak / max(peak, 1):11.1f}x | {matrix_mib:16.1f}")
        print(f"{T:>5} | tiled vs naive: max abs difference {diff:.1e}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="sequence lengths T")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    main(args.lengths, args.threads)
