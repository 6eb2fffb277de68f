"""BERT's encoder forward on a padded batch: scratchlm's Bert against transformers' BertModel (chapter 07, notebook 1).

    python benchmarks/bench_bert.py                 # the table
    python benchmarks/bench_bert.py --threads 2     # torch threads (default 1)

The same random weights (a BertForMaskedLM saved with save_pretrained, loaded by both) run the encoder only, no MLM
head: scratchlm's `Bert.encode` against transformers' `BertModel` (the `.bert` of BertForMaskedLM, which has no
pooler) with attn_implementation "eager" and "sdpa". Each batch is padded: the sequences' real lengths fall
evenly from the full length to a quarter of it, and the attention_mask says so. Float32, inference mode;
the time of a forward is the fastest of several rounds (the one least disturbed by other work on the machine),
the three models taking turns within each round.
Outputs are checked equal (max |difference| < 1e-4) before timing. All numbers are measured in this run.
"""

import argparse
import tempfile
import time

import torch
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM
from transformers.utils import logging as hf_logging

import scratchlm
from scratchlm.bert import Bert

SHAPES = {  # name -> (BertConfig sizes, batch, length)
    "BERT-small: 4 layers, 512 wide, 8 heads": (dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                                                     intermediate_size=2048), 8, 128),
    "BERT-mini: 4 layers, 256 wide, 4 heads": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                                    intermediate_size=1024), 16, 64),
    "the chapter's char BERT (cpu profile)": (dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                                   intermediate_size=512), 12, 64),
}


def padded_batch(vocab: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, length), generator=g)
    lengths = torch.linspace(length, length // 4, batch).round().long()
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids, mask


def fastest(fns: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Seconds per call of each function: the fastest of `rounds` rounds of `repeats` calls, after one warm-up call.
    The rounds take the functions in turn (A B C, A B C, ...), so a busy spell on the machine hits them alike."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / repeats)
    return best


@torch.inference_mode()
def row(name: str, sizes: dict, batch: int, length: int, rounds: int, repeats: int) -> None:
    config = HFBertConfig(vocab_size=1000, max_position_embeddings=512, **sizes)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        BertForMaskedLM(config).save_pretrained(folder)
        ours = scratchlm.from_hf(folder)
        references = {impl: BertForMaskedLM.from_pretrained(folder, attn_implementation=impl).eval().bert
                      for impl in ("eager", "sdpa")}
    assert isinstance(ours, Bert)
    ids, mask = padded_batch(config.vocab_size, batch, length)
    expected = references["eager"](input_ids=ids, attention_mask=mask).last_hidden_state
    for impl, reference in references.items():
        got = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (got - expected).abs().max() < 1e-4, impl
    assert (ours.encode(ids, mask) - expected).abs().max() < 1e-4
    calls = {impl: (lambda r=reference: r(input_ids=ids, attention_mask=mask)) for impl, reference in references.items()}
    times = fastest({**calls, "ours": lambda: ours.encode(ids, mask)}, rounds, repeats)
    best_hf = min(times["eager"], times["sdpa"])
    print(f"| {name} | {batch}x{length} | {times['eager'] * 1e3:.1f} | {times['sdpa'] * 1e3:.1f} | "
          f"{times['ours'] * 1e3:.1f} | {times['eager'] / times['ours']:.2f}x | {times['sdpa'] / times['ours']:.2f}x | "
          f"**{best_hf / times['ours']:.2f}x** |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per model (default 7)")
    parser.add_argument("--quick", action="store_true", help="the smallest shape, few rounds, for a smoke test")
    args = parser.parse_args([] if argv is None else argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        print(f"torch threads: {args.threads}; BERT encoder forward (no MLM head) on a padded batch, float32, "
              f"ms per batch (the fastest of {2 if args.quick else args.rounds} rounds)")
        print("| model | batch x length | transformers eager | transformers sdpa | scratchlm | vs eager | vs sdpa | "
              "vs the faster |")
        print("|---|---|---|---|---|---|---|---|")
        shapes = list(SHAPES.items())[-1:] if args.quick else SHAPES.items()
        for name, (sizes, batch, length) in shapes:
            row(name, sizes, batch, length, rounds=2 if args.quick else args.rounds, repeats=3)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
