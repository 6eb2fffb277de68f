"""Training speed of the character-level GPT at the `cpu` profile (nanoGPT's laptop recipe, lr 2e-3).

    python benchmarks/bench_train.py                          # where a step's time goes, then the full run
    python benchmarks/bench_train.py --nanogpt ~/src/nanoGPT # also nanoGPT's own code, one after the other
    python benchmarks/bench_train.py --steps 200              # a quick run (the schedule shrinks to 200 steps)
    python benchmarks/bench_train.py --only-variants          # only part 4: bfloat16 and torch.compile
    python benchmarks/bench_train.py --nanogpt ~/src/nanoGPT --only-speedrun  # only nanoGPT against part 5

1. Where the time of one training step goes: forward, backward, the optimizer (a loop over the tensors,
   `foreach`, or `fused`, which the trainer uses) and clipping, in milliseconds.
2. The full run, in a fresh process (`python -m scratchlm train`'s code): its wall time from launch,
   the training throughput, and the *time to loss*: seconds from launch until the first evaluation at
   which the loss on the whole validation split is at most 1.89 (nanoGPT's README quotes 1.88 for its
   recipe). The whole-split losses are computed after the run from weights kept at each evaluation, so
   they cost the run no time.
3. With `--nanogpt DIR` (a clone of github.com/karpathy/nanoGPT; its `data/shakespeare_char/prepare.py`
   must have been run) or NANOGPT_DIR set: nanoGPT's `train.py` with its README's CPU command line, run
   first, with one thread as well; its wall time from launch, its last logged estimate, and the loss of
   its saved model on the whole validation split, computed here with this course's GPT.
4. The same training step in float32 eager mode, bfloat16 autocast and `torch.compile`, and the time of
   each one's first step: for `torch.compile` that is its start-up cost, compilation included, measured
   with an empty compile cache (as on a new machine) unless `--warm-compile-cache`.
5. With `--nanogpt DIR`: the speedrun recipe of notebook 04_llama/08_speedrun, run to its own end as a learner
   runs it, `python -m scratchlm train --model speedrun --profile cpu`, in a fresh process with one thread after
   nanoGPT's: its wall time from launch to exit against nanoGPT's (both whole runs, start-up, evaluations and
   checkpoints included), and its loss on the whole validation split, which the command prints.
Run it with one thread (`make bench` sets OMP_NUM_THREADS=1) on an otherwise idle machine.
"""

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from scratchlm.data import get_batch
from scratchlm.train import (
    Trainer,
    build_model,
    configure_optimizer,
    next_token_loss,
    shakespeare_char_config,
    shakespeare_char_data,
    split_loss,
)

TARGET = 1.89  # nanoGPT's README: "gets us a loss of only 1.88" for the CPU recipe (a 20-batch estimate)
NANOGPT_CPU_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                    "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0"]  # its README


def make_trainer(steps: int, **changes) -> Trainer:
    tok, train_data, val_data = shakespeare_char_data()
    model_config, cfg = shakespeare_char_config("cpu", tok.vocab_size)
    cfg = replace(cfg, max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 10), device="cpu", **changes)
    torch.manual_seed(cfg.seed)
    return Trainer(build_model("gpt", model_config), cfg, train_data, val_data, verbose=False)


def millis(fn, repeats: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def step_profile() -> None:
    trainer = make_trainer(10_000)
    model, cfg = trainer.model, trainer.cfg
    x, y = get_batch(trainer.train_data, cfg.block_size, cfg.batch_size, torch.Generator().manual_seed(0))

    def forward_backward():
        next_token_loss(model(x), y).backward()

    rows = [("forward", millis(lambda: model(x))), ("forward + backward", millis(forward_backward))]
    for name, options in (("AdamW, a loop over the tensors", {"foreach": False}), ("AdamW, foreach", {"foreach": True}),
                          ("AdamW, fused (the trainer's)", {"fused": True})):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **options)
        rows.append((name, millis(optimizer.step)))
    rows.append(("gradient clipping", millis(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))))
    fused = configure_optimizer(model, 0.1, 1e-3, verbose=False).defaults["fused"]
    print(f"one training step of the cpu model (batch {cfg.batch_size} x {cfg.block_size}), milliseconds; the "
          f"trainer's optimizer is {'fused' if fused else 'not fused'}:")
    print("| part | ms |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} |")


def child_run(steps: int, launched_at: float) -> dict:
    """The cpu-profile run with weights kept at each evaluation; times are seconds since `launched_at` (time.time())."""
    trainer = make_trainer(steps)
    kept = []
    evaluate = trainer.evaluate

    def keeping_evaluate():
        kept.append((trainer.step, time.time() - launched_at,
                     {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}))
        return evaluate()

    trainer.evaluate = keeping_evaluate
    fit_start = time.perf_counter()
    history = trainer.fit(progress=False)
    fit_seconds, launch_to_end = time.perf_counter() - fit_start, time.time() - launched_at
    cfg = trainer.cfg
    evals = []
    for step, seconds, weights in kept:  # after the run: costs it nothing
        trainer.model.load_state_dict(weights)
        evals.append({"step": step, "seconds": seconds,
                      "whole_split": split_loss(trainer.model, trainer.val_data, cfg.block_size)})
    return {"steps": steps, "fit_seconds": fit_seconds, "launch_to_end": launch_to_end,
            "tokens_per_s": steps * cfg.batch_size * cfg.grad_accum_steps * cfg.block_size / fit_seconds,
            "val_estimate": history["eval"][-1]["val"], "evals": evals}


def timed_process(command: list[str], cwd: str | None = None) -> tuple[float, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def nanogpt_run(folder: Path) -> dict:
    if not (folder / "train.py").is_file() or not (folder / "data/shakespeare_char/train.bin").is_file():
        raise FileNotFoundError(f"{folder} is not a nanoGPT clone with prepared data: clone "
                                f"https://github.com/karpathy/nanoGPT and run data/shakespeare_char/prepare.py")
    out_dir = tempfile.mkdtemp(prefix="nanogpt-")
    seconds, log = timed_process([sys.executable, "train.py", *NANOGPT_CPU_ARGS, f"--out_dir={out_dir}"], str(folder))
    last = re.findall(r"step (\d+): train loss ([\d.]+), val loss ([\d.]+)", log)[-1]
    # its saved model (nanoGPT saves when the estimate improves; here at every evaluation), scored by our GPT
    ckpt = torch.load(Path(out_dir) / "ckpt.pt", map_location="cpu", weights_only=True)
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    args = ckpt["model_args"]
    tok, _, val_data = shakespeare_char_data()
    model = build_model("gpt", {"vocab_size": args["vocab_size"], "block_size": args["block_size"],
                                "n_layer": args["n_layer"], "n_head": args["n_head"], "n_embd": args["n_embd"],
                                "dropout": 0.0, "bias": args["bias"]})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.endswith("lm_head.weight") for k in missing):  # the head is tied to wte
        raise ValueError(f"nanoGPT's checkpoint does not fit the course's GPT: missing {missing}, unexpected {unexpected}")
    return {"seconds": seconds, "saved_at": ckpt["iter_num"], "last_step": int(last[0]), "val_estimate": float(last[2]),
            "whole_split": split_loss(model, val_data, args["block_size"])}


def speedrun_run() -> dict:
    """`python -m scratchlm train --model speedrun --profile cpu` in a fresh process: seconds from launch to exit."""
    out_dir = Path(tempfile.mkdtemp(prefix="speedrun-")) / "run"
    seconds, log = timed_process([sys.executable, "-m", "scratchlm", "train", "--model", "speedrun", "--profile", "cpu",
                                  "--out", str(out_dir), "--quiet"])
    found = re.search(r"trained to step (\d+) in \d+ s: val loss on the whole split ([\d.]+)", log)
    if not found:
        raise RuntimeError(f"could not read the speedrun's result from its output:\n{log[-2000:]}")
    return {"seconds": seconds, "steps": int(found[1]), "whole_split": float(found[2])}


def step_throughput(steps: int = 40, warmup: int = 5, **changes) -> tuple[float, float]:
    """(tokens per second of `steps` training steps after `warmup` untimed ones, seconds of the first step).

    The first step includes torch.compile's compilation when it is on: its start-up cost."""
    trainer = make_trainer(10_000, **changes)
    start = time.perf_counter()
    trainer.train_step()
    first_step = time.perf_counter() - start
    for _ in range(warmup - 1):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    cfg = trainer.cfg
    return steps * cfg.batch_size * cfg.grad_accum_steps * cfg.block_size / (time.perf_counter() - start), first_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000, help="steps of the cpu-profile run (default 2000)")
    parser.add_argument("--nanogpt", type=Path, default=os.environ.get("NANOGPT_DIR"),
                        help="a nanoGPT clone with prepared data, to run its CPU recipe first (default: $NANOGPT_DIR)")
    parser.add_argument("--no-variants", action="store_true", help="skip the bfloat16 / torch.compile comparison")
    parser.add_argument("--only-variants", action="store_true", help="run only the bfloat16 / torch.compile comparison")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="let torch.compile reuse its on-disk cache from earlier runs (default: an empty cache, "
                             "so the first step shows the whole compilation)")
    parser.add_argument("--only-speedrun", action="store_true",
                        help="with --nanogpt: run only nanoGPT and the speedrun recipe (part 5), not parts 1, 2 and 4")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)  # the timed run in its own process: launch time
    args = parser.parse_args([] if argv is None else argv)
    if args.child:
        print(json.dumps(child_run(args.steps, args.child)))
        return

    print(f"cpu profile (4 layers, 4 heads, 128 wide, context 64, batch 12), {torch.get_num_threads()} threads")
    if not args.warm_compile_cache:  # Inductor reads this when it first compiles: a cold start, as on a new machine
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="inductor-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
    if args.only_variants:
        variants()
        return
    if args.only_speedrun and not args.nanogpt:
        parser.error("--only-speedrun compares with nanoGPT: give --nanogpt DIR (or set NANOGPT_DIR)")
    if not args.only_speedrun:
        step_profile()
    nano = nanogpt_run(Path(args.nanogpt).expanduser()) if args.nanogpt else None
    if args.only_speedrun:
        report_speedrun(nano)
        return
    _, stdout = timed_process([sys.executable, str(Path(__file__).resolve()), "--child", repr(time.time()),
                               "--steps", str(args.steps)])
    run = json.loads(stdout.strip().splitlines()[-1])
    seconds = run["launch_to_end"]  # launch to the end of training (the whole-split scores come after)
    reached = next((e for e in run["evals"] if e["whole_split"] <= TARGET), None)
    print(f"\nthe run, in a fresh process: {run['steps']} steps, {seconds:.1f} s from launch to the end of training "
          f"({run['fit_seconds']:.1f} s in Trainer.fit, {run['tokens_per_s']:,.0f} tokens/s with its evaluations)")
    print("| step | seconds from launch | val loss, whole split |")
    print("|---|---|---|")
    for e in run["evals"]:
        print(f"| {e['step']} | {e['seconds']:.1f} | {e['whole_split']:.4f} |")
    if reached:
        print(f"time to <= {TARGET} on the whole validation split: {reached['seconds']:.1f} s (step {reached['step']})")
    else:
        print(f"the run did not reach {TARGET} on the whole validation split")
    if nano:
        print(f"\nnanoGPT's train.py, README CPU recipe, one thread: {nano['seconds']:.1f} s from launch to exit; "
              f"its log at step {nano['last_step']}: val loss {nano['val_estimate']:.4f} (20-batch estimate); its "
              f"model saved at step {nano['saved_at']}: {nano['whole_split']:.4f} on the whole validation split")
        if reached:
            print(f"time to <= {TARGET}: scratchlm {reached['seconds']:.1f} s = {reached['seconds'] / nano['seconds']:.2f}x "
                  f"nanoGPT's whole run (which ends at {nano['whole_split']:.4f}); whole runs: "
                  f"{seconds / nano['seconds']:.2f}x")
    if nano:
        report_speedrun(nano)
    if args.no_variants:
        return

    variants()


def report_speedrun(nano: dict) -> None:
    """Part 5: the speedrun recipe's whole run, in a fresh process, against nanoGPT's whole run."""
    run = speedrun_run()
    print(f"\nnanoGPT's train.py, README CPU recipe: {nano['seconds']:.1f} s from launch to exit, its model at step "
          f"{nano['saved_at']}: {nano['whole_split']:.4f} on the whole validation split")
    print(f"the speedrun recipe (python -m scratchlm train --model speedrun --profile cpu): {run['steps']} steps, "
          f"{run['seconds']:.1f} s from launch to exit, {run['whole_split']:.4f} on the whole validation split")
    verdict = "reaches" if run["whole_split"] <= TARGET else "does not reach"
    print(f"whole runs: speedrun / nanoGPT = {run['seconds'] / nano['seconds']:.2f}x; the speedrun {verdict} "
          f"<= {TARGET} on the whole split")


def variants() -> None:
    """The same training step in float32 eager, bfloat16 autocast and torch.compile: speed, and the first step's cost."""
    print("\nthe same training step, tokens/s relative to float32 eager (40 timed steps after 5 untimed);")
    print("the first step's time includes torch.compile's compilation, its start-up cost:")
    print("| variant | tokens/s | ratio | first step |")
    print("|---|---|---|---|")
    base, first = step_throughput()
    print(f"| float32, eager | {base:,.0f} | 1.00 | {first:.2f} s |")
    for name, changes in (("bfloat16 autocast, eager", {"dtype": "bfloat16"}),
                          ("float32, torch.compile", {"compile": True})):
        try:
            rate, first = step_throughput(**changes)
            print(f"| {name} | {rate:,.0f} | {rate / base:.2f} | {first:.2f} s |")
        except Exception as err:  # torch.compile needs a working C++ compiler on CPU
            print(f"| {name} | failed: {type(err).__name__}: {str(err).splitlines()[0][:80]} | - | - |")


if __name__ == "__main__":
    main(sys.argv[1:])
