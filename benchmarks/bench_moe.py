"""Mixture-of-experts dispatch (chapter 05, notebook 1): a Python loop over the experts against vectorised dispatch.

    python benchmarks/bench_moe.py                 # the table
    python benchmarks/bench_moe.py --threads 2     # torch threads (default 1)

One MoE layer, 512 tokens (8 sequences of 64), width 256, experts of width 128, top-2, float32, with 8 and with 64
experts: the arithmetic per token is the same in every row, only the number of experts changes. For each: the
forward pass (inference) and forward + backward (training), the fastest of 5 runs, for
- scratchlm's dispatch_loop (one expert at a time),
- dispatch_sorted (slots sorted by expert into a padded buffer, two torch.bmm),
- dispatch_grouped (the sorted slots through F.grouped_mm, no padding; where this PyTorch has it),
- transformers' Qwen3MoeExperts with experts_implementation="eager" (its own loop over the experts hit) and, where
  it runs, "grouped_mm",
all on the same weights and routing (the outputs are checked equal first). Ratios are against our loop.
All numbers are measured in this run, on this machine.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from scratchlm.moe import dispatch_grouped, dispatch_loop, dispatch_sorted, grouped_mm_usable

TOKENS, WIDTH, EXPERT_WIDTH, TOP_K = 512, 256, 128, 2


def hf_experts(gate_up: torch.Tensor, down: torch.Tensor, implementation: str):
    """transformers' Qwen3MoeExperts holding these weights, run with the given experts implementation."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    E, two_i, hidden = gate_up.shape
    config = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=two_i // 2, num_experts=E)
    config._experts_implementation = implementation
    experts = Qwen3MoeExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    return lambda x, idx, w, *_: experts(x, idx, w)


def inputs(num_experts: int):
    torch.manual_seed(0)
    x = torch.randn(TOKENS, WIDTH, requires_grad=True)
    gate_up = (torch.randn(num_experts, 2 * EXPERT_WIDTH, WIDTH) * 0.05).requires_grad_()
    down = (torch.randn(num_experts, WIDTH, EXPERT_WIDTH) * 0.05).requires_grad_()
    weights, experts = torch.randn(TOKENS, num_experts).softmax(-1).topk(TOP_K, dim=-1)
    return x, experts, weights, gate_up, down


def fastest_ms(fn, args, backward: bool, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        for t in args:
            if isinstance(t, torch.Tensor) and t.grad is not None:
                t.grad = None
        start = time.perf_counter()
        y = fn(*args)
        if backward:
            y.square().sum().backward()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def candidates(args) -> dict:
    x, _, _, gate_up, down = args
    found = {"ours: loop": dispatch_loop, "ours: sorted + bmm": dispatch_sorted}
    if grouped_mm_usable(x, gate_up, down):
        found["ours: sorted + grouped_mm"] = dispatch_grouped
    found["transformers: eager"] = hf_experts(gate_up.detach(), down.detach(), "eager")
    if hasattr(F, "grouped_mm"):
        found["transformers: grouped_mm"] = hf_experts(gate_up.detach(), down.detach(), "grouped_mm")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"One MoE layer: {TOKENS} tokens, width {WIDTH}, experts of width {EXPERT_WIDTH}, top-{TOP_K}, float32, "
          f"{torch.get_num_threads()} torch thread(s); fastest of 5 runs")
    print("| experts | dispatch | forward ms | forward + backward ms | forward: loop / this | training: loop / this |")
    print("|---|---|---|---|---|---|")
    for num_experts in (8, 64):
        data = inputs(num_experts)
        x, experts, weights, gate_up, down = data
        with torch.no_grad():
            expected = dispatch_loop(x, experts, weights, gate_up, down)
        rows = {}
        for name, fn in candidates(data).items():
            with torch.no_grad():
                gap = (fn(*data) - expected).abs().max().item()
            if gap > 1e-5:
                raise AssertionError(f"{name} differs from the loop by {gap:.1e}")
            rows[name] = (fastest_ms(fn, data, backward=False), fastest_ms(fn, data, backward=True))
        loop_fwd, loop_train = rows["ours: loop"]
        for name, (fwd, train) in rows.items():
            print(f"| {num_experts} | {name} | {fwd:.1f} | {train:.1f} | {loop_fwd / fwd:.2f}x | {loop_train / train:.2f}x |")


if __name__ == "__main__":
    main()
