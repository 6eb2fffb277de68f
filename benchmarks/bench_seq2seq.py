"""T5 decoding (chapter 07, notebook 03_encoder_decoder): scratchlm's generate_seq2seq against transformers' generate.

    python benchmarks/bench_seq2seq.py                # the table
    python benchmarks/bench_seq2seq.py --threads 2    # torch threads (default 1)
    python benchmarks/bench_seq2seq.py --quick        # a smaller model and fewer tokens, for a smoke test

A T5 of t5-small's shape (6 + 6 layers, 512 wide, 8 heads of 64, ReLU feed-forward 2048, 32,128-token vocabulary)
with random weights, in transformers' T5ForConditionalGeneration and loaded into scratchlm with from_hf: the same
weights. For each setting, both decode the same 32-token inputs (greedy with both caches, beam search with 4
beams) and must return identical tokens (asserted); the table gives decoder tokens per second (new tokens x rows
/ seconds, the encoder included, the fastest of 5 rounds, transformers' and scratchlm's alternating so that both
meet the same load) and the ratio. A row without any cache (the whole
decoder rerun over every prefix, the naive loop) shows what the two caches buy. float32, measured in this run.
"""

import argparse
import tempfile
import time
import warnings
from functools import partial

import torch

from scratchlm.gpt import from_hf
from scratchlm.seq2seq import T5, generate_seq2seq


def models(quick: bool):
    from transformers import T5Config, T5ForConditionalGeneration
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    sizes = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_heads=4) if quick else \
        dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8)
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(vocab_size=32128, feed_forward_proj="relu", dropout_rate=0.0,
                                             decoder_start_token_id=0, **sizes)).eval()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = from_hf(folder)
    return hf, ours


@torch.no_grad()
def naive_greedy(model: T5, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy decoding with no cache at all: encoder and decoder rerun on every prefix (no EOS stop: for timing)."""
    out = torch.zeros(ids.size(0), 1, dtype=torch.long)
    for _ in range(max_new_tokens):
        out = torch.cat((out, model(ids, out)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


def timed(fn, rounds: int = 3):
    best, result = float("inf"), None
    for _ in range(rounds):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def timed_pair(first, second, rounds: int = 5):
    """The fastest of `rounds` runs of each, alternating first and second, so that both meet the same load on a
    shared machine. Returns (seconds of first, its result, seconds of second, its result)."""
    best, results = [float("inf"), float("inf")], [None, None]
    for _ in range(rounds):
        for k, fn in enumerate((first, second)):
            start = time.perf_counter()
            results[k] = fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best[0], results[0], best[1], results[1]


def table(quick: bool) -> None:
    hf, ours = models(quick)
    new_tokens = 16 if quick else 64
    shape = "a small T5 (2 + 2 layers, 128 wide)" if quick else "t5-small's shape (60M parameters)"
    print(f"{shape}, random weights, float32; {new_tokens} new tokens after 32 input tokens; tokens/s = new "
          f"tokens x rows / s (the encoder included), the fastest of 5 rounds, the two alternating")
    print("| decoding | rows | transformers tok/s | scratchlm tok/s | speed-up | identical tokens |")
    print("|---|---|---|---|---|---|")
    for label, rows, beams in (("greedy, both caches", 1, 1), ("greedy, both caches", 8, 1),
                               ("beam search, 4 beams", 1, 4)):
        ids = torch.randint(2, 32128, (rows, 32), generator=torch.Generator().manual_seed(rows))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_hf, ref, t_ours, out = timed_pair(
                partial(hf.generate, input_ids=ids, max_new_tokens=new_tokens, num_beams=beams, do_sample=False),
                partial(generate_seq2seq, ours, ids, new_tokens, num_beams=beams))
        assert torch.equal(out, ref), f"{label}: the tokens differ"
        n = (out.size(1) - 1) * rows
        print(f"| {label} | {rows} | {n / t_hf:.1f} | {n / t_ours:.1f} | {t_hf / t_ours:.2f}x | yes |")
    ids = torch.randint(2, 32128, (1, 32), generator=torch.Generator().manual_seed(1))
    t_naive, naive = timed(lambda: naive_greedy(ours, ids, new_tokens), rounds=1)
    t_cached, cached = timed(lambda: generate_seq2seq(ours, ids, new_tokens))
    assert torch.equal(naive[:, :cached.size(1)], cached)
    print(f"scratchlm greedy, 1 row, no cache (encoder and decoder rerun every step): "
          f"{new_tokens / t_naive:.1f} tok/s; with both caches {(cached.size(1) - 1) / t_cached:.1f} tok/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="a small model and 16 tokens, for a smoke test")
    args = parser.parse_args([] if argv is None else argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print(f"torch threads: {args.threads}")
        table(args.quick)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
