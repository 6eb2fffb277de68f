"""Self-speculative decoding with DeepSeek-V3's MTP module (chapter 05, notebook 4) against plain greedy decoding.

    python benchmarks/bench_mtp.py                  # train briefly, then the table
    python benchmarks/bench_mtp.py --steps 600      # train longer (default 300 steps)
    python benchmarks/bench_mtp.py --threads 2      # torch threads (default 1)

The model: the chapter's character-level DeepSeek at the `cpu` profile (4 layers, width 128, MLA, DeepSeekMoE with 16
routed experts, context 64) with one MTP module, trained here on TinyShakespeare for --steps steps (next-token loss +
0.3 x MTP loss, the profile's learning rate, cosine schedule over those steps), and the same model untrained. For each:
10 prompts of 16 characters from the validation split, each continued by 48 characters, greedily with
scratchlm.generate (KV cache) and with scratchlm.mtp.speculative_generate; the outputs are checked identical. Reported:
the share of drafts the main model accepted, new tokens per forward pass of the main model, and tokens per second of
both (the fastest of 2 rounds over all prompts; batch 1, float32). All numbers are measured in this run, on this
machine: nothing is loaded from disk except the text.
"""

import argparse
import time
from dataclasses import replace

import torch

from scratchlm.data import get_batch
from scratchlm.deepseek import char_deepseek_config
from scratchlm.generation import generate
from scratchlm.mtp import mtp_loss, speculative_generate
from scratchlm.train import (
    build_model,
    configure_optimizer,
    lr_at,
    next_token_loss,
    shakespeare_char_config,
    shakespeare_char_data,
)

PROMPTS, PROMPT_LEN, ROUNDS = 10, 16, 2


def train(model, train_data, cfg) -> float:
    """Train `model` with the next-token and MTP losses; returns the seconds taken."""
    opt = configure_optimizer(model, cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), verbose=False)
    batches = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start = time.perf_counter()
    for step in range(cfg.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(train_data, cfg.block_size, cfg.batch_size, batches)
        logits, ahead = model(x, with_mtp=True)
        (next_token_loss(logits, y) + mtp_loss(ahead, y, 0.3)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def measure(model, prompts, new_tokens):
    """(accepted / drafted, new tokens per main forward, greedy tokens/s, speculative tokens/s), outputs checked."""
    model.eval()
    totals = dict(drafted=0, accepted=0, main_forwards=0, new_tokens=0)
    for prompt in prompts:
        ids, stats = speculative_generate(model, prompt, new_tokens)
        if not torch.equal(ids, generate(model, prompt, new_tokens)):
            raise AssertionError("self-speculative decoding differs from greedy decoding")
        totals = {key: totals[key] + stats[key] for key in totals}
    seconds = {"greedy": float("inf"), "speculative": float("inf")}
    for _ in range(ROUNDS):
        for name, decode in (("greedy", generate), ("speculative", speculative_generate)):
            start = time.perf_counter()
            for prompt in prompts:
                decode(model, prompt, new_tokens)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    tokens = len(prompts) * new_tokens
    return (totals["accepted"] / totals["drafted"], totals["new_tokens"] / totals["main_forwards"],
            tokens / seconds["greedy"], tokens / seconds["speculative"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, train_data, val_data = shakespeare_char_data()
    gpt_kwargs, cfg = shakespeare_char_config("cpu", tokenizer.vocab_size)
    cfg = replace(cfg, max_steps=args.steps, warmup_steps=min(cfg.warmup_steps, args.steps // 5))
    config = {**char_deepseek_config(gpt_kwargs), "num_nextn_predict_layers": 1}
    torch.manual_seed(cfg.seed)
    trained = build_model("deepseek", config)
    seconds = train(trained, train_data, cfg)
    torch.manual_seed(0)
    untrained = build_model("deepseek", config)
    new_tokens = trained.config.block_size - PROMPT_LEN
    starts = torch.linspace(0, len(val_data) - PROMPT_LEN - 1, PROMPTS).long().tolist()
    prompts = [val_data[s : s + PROMPT_LEN] for s in starts]
    print(f"Character DeepSeek ({trained.num_parameters():,} parameters with the MTP module), trained {args.steps} steps "
          f"in {seconds:.0f} s; {PROMPTS} prompts of {PROMPT_LEN} characters + {new_tokens} new, batch 1, float32, "
          f"{torch.get_num_threads()} torch thread(s); fastest of {ROUNDS} rounds; outputs identical to greedy")
    print("| model | drafts accepted | tokens per main forward | greedy tok/s | self-speculative tok/s | speed-up |")
    print("|---|---|---|---|---|---|")
    for name, model in ((f"trained {args.steps} steps", trained), ("untrained", untrained)):
        acceptance, per_forward, greedy, speculative = measure(model, prompts, new_tokens)
        print(f"| {name} | {acceptance:.1%} | {per_forward:.2f} | {greedy:.0f} | {speculative:.0f} | "
              f"{speculative / greedy:.2f}x |")


if __name__ == "__main__":
    main()
