"""The scratchlm command line: train a chapter model on TinyShakespeare, sample from a checkpoint, align (chapter 06),
chat with a real model (SmolLM2-135M-Instruct, chapter 04), train and run chapter 07's number-to-words T5.

Run it in the course's virtualenv, which `make lab` created: `source .venv/bin/activate` first (then
`python` and `torchrun` below are the ones in .venv), or write `.venv/bin/python -m scratchlm ...`.

    python -m scratchlm train --model gpt --profile cpu --out runs/shakespeare-char
    python -m scratchlm train --model llama --profile cpu --out runs/llama-char
    python -m scratchlm train --model deepseek --profile cpu --out runs/deepseek-char
    python -m scratchlm train --model speedrun --profile cpu --out runs/speedrun   # Muon + the speedrun's changes
    python -m scratchlm train --out runs/shakespeare-char --resume
    python -m scratchlm train --model llama --out runs/llama-gc --gradient-checkpointing  # less memory, more time
    torchrun --nproc_per_node=2 -m scratchlm train --model gpt --profile gpu --out runs/ddp   # data-parallel
    python -m scratchlm sample runs/shakespeare-char --prompt "ROMEO:" --max-new-tokens 300 --seed 1
    python -m scratchlm train --model t5 --profile cpu --out runs/t5-numbers   # number-to-words (chapter 07)
    python -m scratchlm sample runs/t5-numbers --prompt "4096" --num-beams 4     # four thousand ninety-six
    python -m scratchlm align --method all --profile cpu --seeds 0 1 2 --json runs/align.json
    python -m scratchlm chat      # a conversation in the terminal; Ctrl-D or `exit` ends it
    python -m scratchlm chat --prompt "What is the capital of France?" --temperature 0

Training uses the same code and settings as notebook 03_gpt/03_training (`scratchlm.train`,
`shakespeare_char_config`; for `--model llama`, the size-matched Llama of 04_llama/05_llama_vs_gpt; for
`--model deepseek`, the DeepSeek-style model of 05_deepseek/05_deepseek_v3, with that Llama's active parameters;
for `--model speedrun`, the recipe of 04_llama/08_speedrun: its own model, Muon and schedule, `speedrun_config`)
and saves a checkpoint folder every evaluation and at the end; the folder holds the tokenizer, so
sampling needs no data file. Launched by `torchrun --nproc_per_node=N`, `train` runs data-parallel on N
processes (NCCL on CUDA, gloo on CPU; section 10 of 03_training). `chat` talks with SmolLM2-135M-Instruct,
read from its GGUF file as notebook 04_llama/07_a_real_model does (`make lab` installs the file); with
--prompt it prints the one answer alone, for scripts. `python -m scratchlm COMMAND --help` lists each
command's options.

`train --model t5` is different: it trains notebook 07_encoders/03's encoder-decoder (`scratchlm.seq2seq.
train_translator` at the profile's `translator_config`, the notebook's settings) to write numbers from 0 to
999,999 in words, prints its exact match on the held-out numbers, and saves a Hugging Face T5 folder
(config.json, model.safetensors) with its characters (tokenizer.json). `sample` on that folder translates
--prompt, greedily or with --num-beams; a t5 run has no --resume, --stop-at, --compile, --gradient-checkpointing or
torchrun.
"""
# (for maintainers: this module is hand-written, it has no notebook)

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

# the models the command line can train: chapter 03's GPT, chapter 04's Llama of the same size
# (notebook 04_llama/05_llama_vs_gpt) and chapter 05's DeepSeek with that Llama's active parameters
# (notebook 05_deepseek/05_deepseek_v3), scratchlm.train.MODEL_REGISTRY says how to build each; and chapter 07's
# T5 (notebook 07_encoders/03_encoder_decoder), trained on number-to-words by scratchlm.seq2seq, not on Shakespeare;
# "speedrun" is chapter 04's speedrun recipe (notebook 04_llama/08_speedrun), with its own TrainConfig
MODELS = ("gpt", "llama", "deepseek", "speedrun", "t5")
# the rows of chapter 06's table, as scratchlm.align.METHODS lists them (tests/test_cli.py checks they agree)
ALIGN_METHODS = ("sft", "sft_verified", "sft_chosen", "rft", "online_rft", "dpo", "cdpo", "ipo", "ppo", "ppo_checker",
                 "grpo")


def check_device(name: str) -> None:
    """Refuse a --device this machine cannot use (ValueError, one line), before any data is read or model built."""
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: PyTorch does not know this device; use cpu, cuda or cuda:N (the "
                         f"GPU's index), or drop --device to use cuda when available, else the CPU") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"--device {name}: this PyTorch build has no CUDA (torch {torch.__version__}); drop "
                             f"--device to use the CPU, or install a CUDA build of PyTorch")
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: PyTorch {torch.__version__} is built for CUDA but sees no GPU (check "
                             f"nvidia-smi and CUDA_VISIBLE_DEVICES); drop --device to use the CPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: this machine has {count} visible CUDA device{'s' * (count != 1)} "
                             f"(cuda:0 to cuda:{count - 1}); choose one of them, or drop --device to use cuda:0")
        return
    available = {"mps": lambda: torch.backends.mps.is_available(),
                 "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
    if device.type not in available:
        raise ValueError(f"--device {name}: scratchlm runs on cpu, cuda (cuda:N) or, where PyTorch has them, mps "
                         f"and xpu; drop --device to use cuda when available, else the CPU")
    if not available[device.type]():
        raise ValueError(f"--device {name}: this machine or PyTorch build ({torch.__version__}) has no "
                         f"{device.type} device; drop --device to use the CPU")


def existing_ancestor(path: Path) -> Path:
    """The nearest of path and its parents that exists (the folder that `mkdir(parents=True)` would start from)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_folder_to_write(option: str, path: Path, purpose: str) -> None:
    """Refuse a folder argument (--out, --base) that is a file, or that cannot be made, before any training."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; {option} wants a folder: {purpose}")
    start = existing_ancestor(path)
    if not start.is_dir():
        raise ValueError(f"{option} {path}: {start} is a file, so the folder cannot be made there")
    if not os.access(start, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {start} is not writable; choose a folder you can write to")


def train(args: argparse.Namespace) -> None:
    check_folder_to_write("--out", Path(args.out), "training writes its checkpoints there")
    if args.gradient_checkpointing and args.model == "deepseek":
        raise ValueError("--gradient-checkpointing does not apply to --model deepseek: its forward pass updates the "
                         "routers' balancing bias, so a block recomputed in the backward pass would route differently "
                         "from the forward pass; drop --gradient-checkpointing")
    if args.model == "t5":
        train_t5(args)
        return
    from scratchlm.train import start_data_parallel, stop_data_parallel

    # under torchrun with several processes: join their group first (NCCL on CUDA, gloo on CPU)
    device = start_data_parallel(args.device or "auto")
    try:
        _train(args, device)
    finally:
        stop_data_parallel()


def check_t5_train_args(args: argparse.Namespace) -> None:
    """Refuse the options of Shakespeare training that the number-to-words T5 does not have, before any work."""
    refused = [(args.resume, "--resume"), (args.stop_at is not None, "--stop-at"), (args.compile is not None, "--compile")]
    for given, option in refused:
        if given:
            raise ValueError(f"{option} does not apply to --model t5: its run (a few minutes at cpu) has no "
                             f"intermediate checkpoints; drop {option}")
    if args.gradient_checkpointing is not None:
        raise ValueError("--gradient-checkpointing does not apply to --model t5: its training loop "
                         "(scratchlm.seq2seq.train_translator) is not chapter 03's Trainer; drop --gradient-checkpointing")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--model t5 trains in one process; run it with `python -m scratchlm`, not torchrun")
    for option, value in (("--steps", args.steps), ("--warmup", args.warmup)):
        if value is not None and value < (1 if option == "--steps" else 0):
            raise ValueError(f"{option} {value}: must be {'at least 1' if option == '--steps' else '>= 0'}")
    out = Path(args.out)
    if (out / "config.json").is_file() or (out / "model.safetensors").is_file():
        raise FileExistsError(f"{out} already holds a checkpoint; choose another --out (a t5 run cannot be resumed)")


def train_t5(args: argparse.Namespace) -> None:
    """Chapter 07: the number-to-words T5 at the profile, its held-out exact match, a checkpoint folder."""
    check_t5_train_args(args)
    import time

    from scratchlm.data import get_profile
    from scratchlm.seq2seq import (Seq2SeqTokenizer, exact_match, number_words_split, save_translator,
                                   train_translator, translator_config)

    profile = args.profile or get_profile()
    config, train_config = translator_config(profile)
    overrides = {}
    if args.steps is not None:
        overrides["max_steps"] = args.steps
        if args.warmup is None:  # keep the profile's warmup fraction, as for the other models
            overrides["warmup_steps"] = round(train_config.warmup_steps * args.steps / train_config.max_steps)
    if args.warmup is not None:
        overrides["warmup_steps"] = args.warmup
    if args.device is not None:
        overrides["device"] = args.device
    train_config = replace(train_config, **overrides)
    split = number_words_split(seed=0, profile=profile)
    tokenizer = Seq2SeqTokenizer()
    print(f"profile {profile}: t5 (number to words) with {len(split['train']):,} training pairs, "
          f"{len(split['test']):,} held-out; {config.num_layers}+{config.num_decoder_layers} layers, width "
          f"{config.d_model}, {config.feed_forward_proj}; {train_config.max_steps} steps of {train_config.batch_size}")
    start = time.perf_counter()
    model, history = train_translator(split, config, train_config, seed=0, tokenizer=tokenizer,
                                      progress_bar=not args.quiet)
    seconds = time.perf_counter() - start
    accuracy, _ = exact_match(model, split["test"], tokenizer)
    save_translator(model, args.out, tokenizer, metadata={
        "profile": profile, "steps": train_config.max_steps, "seconds": round(seconds, 1),
        "val_loss": history["val_loss"][-1], "test_exact_match_greedy": accuracy, "n_test": len(split["test"])})
    print(f"trained in {seconds:.0f} s: val loss {history['val_loss'][-1]:.4f}; held-out exact match (greedy) "
          f"{accuracy:.1%} of {len(split['test']):,}; checkpoint in {args.out}")
    print(f"translate with it: python -m scratchlm sample {args.out} --prompt 4096")


def is_t5_checkpoint(folder: Path) -> bool:
    """A folder written by `train --model t5` (scratchlm.seq2seq.save_translator)."""
    import json

    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "t5"


def sample_t5(args: argparse.Namespace) -> None:
    """Translate --prompt (digits) with a number-to-words T5 checkpoint, greedily or with --num-beams."""
    for option, value in (("--top-k", args.top_k), ("--top-p", args.top_p)):
        if value is not None:
            raise ValueError(f"{option} does not apply to a t5 checkpoint: it decodes greedily or with --num-beams; "
                             f"drop {option}")
    if args.temperature not in (None, 0.0):  # None: not given (a language model's default is 0.8)
        raise ValueError(f"--temperature {args.temperature} does not apply to a t5 checkpoint: it decodes greedily or "
                         f"with --num-beams; drop --temperature")
    prompt = args.prompt.strip().replace(",", "").replace("_", "")
    if not prompt.isdigit() or not prompt.isascii():
        raise ValueError(f"--prompt {args.prompt!r}: a t5 number-to-words checkpoint translates a whole number written "
                         f"in digits, 0 to 999999 (e.g. --prompt 4096)")
    if int(prompt) > 999_999:
        raise ValueError(f"--prompt {args.prompt}: the model was trained on 0 to 999,999; give a smaller number")
    prompt = str(int(prompt))  # "007" -> "7", as the training pairs are written
    from scratchlm.seq2seq import load_translator, translate
    from scratchlm.train import resolve_device

    model, tokenizer = load_translator(args.checkpoint)
    model.to(resolve_device(args.device or "auto"))
    print(translate(model, [prompt], tokenizer, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)[0])


# a model config's size, in a few words: (keys in the GPT's config, the Llama's and DeepSeek's, words)
SUMMARY_FIELDS = ((("n_layer", "num_hidden_layers"), "layers"), (("n_head", "num_attention_heads"), "heads"),
                  (("n_embd", "hidden_size"), "width"), (("block_size", "max_position_embeddings"), "context"),
                  (("n_routed_experts",), "routed experts"), (("num_experts_per_tok",), "per token"))


def model_summary(config: dict) -> str:
    """`4 layers, 4 heads, width 128, context 64` (and the experts of a mixture-of-experts model)."""
    words = []
    for keys, word in SUMMARY_FIELDS:
        value = next((config[k] for k in keys if k in config), None)
        if value is not None:
            words.append(f"{word} {value}" if word in ("width", "context") else f"{value} {word}")
    return ", ".join(words)


def _train(args: argparse.Namespace, parallel_device: str | None) -> None:
    import torch

    from scratchlm.data import get_profile
    from scratchlm.train import (
        MODEL_CONFIG,
        TRAIN_STATE,
        Trainer,
        build_model,
        process_rank_and_count,
        shakespeare_char_config,
        shakespeare_char_data,
        split_loss,
    )

    rank, processes = process_rank_and_count()
    say = print if rank == 0 else (lambda *_: None)  # process 0 alone prints
    out = Path(args.out)
    overrides = {"out_dir": str(out)}
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    if args.warmup is not None:
        overrides["warmup_steps"] = args.warmup
    if parallel_device is not None or args.device is not None:
        overrides["device"] = parallel_device or args.device
    if args.compile is not None:
        overrides["compile"] = args.compile
    if args.gradient_checkpointing is not None:
        overrides["gradient_checkpointing"] = args.gradient_checkpointing
    tokenizer, train_data, val_data = shakespeare_char_data()
    if args.resume:
        if not (out / TRAIN_STATE).is_file():
            raise FileNotFoundError(f"--resume: {out} holds no checkpoint ({TRAIN_STATE} is missing); "
                                    f"drop --resume to start a new run there")
        trainer = Trainer.from_checkpoint(out, train_data, val_data, **overrides)
        if args.model != trainer.model_name:
            raise ValueError(f"--model {args.model}, but the checkpoint in {out} holds a {trainer.model_name!r} model")
        say(f"resuming {out} at step {trainer.step} of {trainer.cfg.max_steps}")
        if trainer.step >= trainer.cfg.max_steps:
            say(f"already trained for max_steps={trainer.cfg.max_steps}; pass --steps N to train longer")
    else:
        if (out / TRAIN_STATE).is_file():
            raise FileExistsError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                                  f"or choose another --out")
        profile = args.profile or get_profile()
        model_config, cfg = shakespeare_char_config(profile, tokenizer.vocab_size)
        if args.model == "llama":  # the Llama with the GPT's width, depth, heads, context and parameter count
            from scratchlm.char_llama import char_llama_config

            model_config = char_llama_config(model_config)
        elif args.model == "deepseek":  # MLA + DeepSeekMoE, the Llama's active parameters per token
            from scratchlm.deepseek import char_deepseek_config

            model_config = char_deepseek_config(model_config)
        elif args.model == "speedrun":  # the recipe's own model and training settings (Muon, wsd schedule)
            from scratchlm.speedrun import speedrun_config

            model_config, cfg = speedrun_config(profile, tokenizer.vocab_size)
        if args.steps is not None and args.warmup is None:
            # the profile's warmup is a fraction of its run (100 of 2000 steps at cpu): keep that fraction
            overrides["warmup_steps"] = round(cfg.warmup_steps * args.steps / cfg.max_steps)
        cfg = replace(cfg, checkpoint_interval=cfg.eval_interval, **overrides)
        torch.manual_seed(cfg.seed)  # the same initial weights in every process
        model = build_model(args.model, model_config)
        n_params = sum(p.numel() for p in model.parameters())
        say(f"profile {profile}: {args.model} with {n_params:,} parameters ({model_summary(model_config)}; "
            f"the whole config goes into {out / MODEL_CONFIG})")
        per_process = f" ({processes} processes x {cfg.batch_size // processes})" if processes > 1 else ""
        say(f"{cfg.max_steps} steps of {cfg.batch_size * cfg.grad_accum_steps}{per_process} x {cfg.block_size} "
            f"tokens, lr {cfg.lr} -> {cfg.min_lr} after {cfg.warmup_steps} warmup steps; checkpoints in {out}")
        trainer = Trainer(model, cfg, train_data, val_data, model_name=args.model, model_config=model_config,
                          tokenizer=tokenizer)
    if args.stop_at is not None and args.stop_at <= trainer.step:
        raise ValueError(f"--stop-at {args.stop_at}: the run is already at step {trainer.step}; choose a later step")
    evaluations_before = len(trainer.history["eval"])
    trainer.fit(until=args.stop_at, progress=not args.quiet)
    if rank > 0:
        return
    final = trainer.history["eval"][-1]
    exact = split_loss(trainer.model, val_data, trainer.cfg.block_size, device=trainer.device,
                       autocast=trainer.autocast)
    # Trainer.evaluate has just printed "step N: train loss ..., val loss ..." if it ran at this step in this
    # run; repeat those estimates only when it did not (a resumed run with nothing left to train)
    printed = len(trainer.history["eval"]) > evaluations_before and final["step"] == trainer.step
    estimates = "" if printed else (f" (estimates at step {final['step']}: train loss {final['train']:.4f}, "
                                    f"val loss {final['val']:.4f})")
    print(f"trained to step {trainer.step} in {trainer.elapsed:.0f} s: val loss on the whole split {exact:.4f}"
          f"{estimates}; checkpoint in {out}")
    if trainer.step < trainer.cfg.max_steps:
        print(f"stopped at step {trainer.step} of {trainer.cfg.max_steps}: continue with --resume")
    print(f"sample from it: python -m scratchlm sample {out}")


def sample(args: argparse.Namespace) -> None:
    import torch

    if args.num_beams < 1 or args.max_new_tokens < 1:
        raise ValueError(f"--num-beams {args.num_beams} and --max-new-tokens {args.max_new_tokens} must be at least 1")
    if is_t5_checkpoint(Path(args.checkpoint)):
        sample_t5(args)
        return
    if args.num_beams != 1:
        raise ValueError(f"--num-beams {args.num_beams}: beam search is for t5 checkpoints (chapter 07); "
                         f"{args.checkpoint} holds a language model, which samples: drop --num-beams")
    from scratchlm.generation import generate
    from scratchlm.train import load_model, load_tokenizer, resolve_device

    device = resolve_device(args.device or "auto")
    model = load_model(args.checkpoint, device)
    tokenizer = load_tokenizer(args.checkpoint)
    prompt = args.prompt.replace("\\n", "\n")  # so a shell can pass a newline as \n
    if not prompt:
        raise ValueError("--prompt is empty; give at least one character, e.g. --prompt '\\n'")
    ids = torch.tensor([tokenizer.encode(prompt)], device=device)  # (1, T)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device).manual_seed(args.seed)
    temperature = 0.8 if args.temperature is None else args.temperature
    out = generate(model, ids, args.max_new_tokens, temperature=temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=generator)
    print(tokenizer.decode(out[0].tolist()))


# what `scratchlm.arith.save_base` writes and `load_base` reads: a folder holding both is a base model
BASE_FILES = ("task_config.json", "model.safetensors")


def check_base(base: Path) -> None:
    """--base: a base model's folder (loaded), or an empty or missing one (the base model is trained and saved
    there). Anything else is refused here, before a minute of training would end in an error or mixed files."""
    purpose = "the base model is loaded from it, or trained and saved there if it holds none"
    check_folder_to_write("--base", base, purpose)
    if not base.is_dir():
        return  # made when the trained base model is saved
    held = sorted(p.name for p in base.iterdir() if not p.name.startswith("."))
    if not held or all((base / name).is_file() for name in BASE_FILES):
        return
    if (base / "model_config.json").is_file():
        kind = "a `scratchlm train` checkpoint, not a chapter 06 base model"
    else:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        kind = f"{shown}, not a base model ({' and '.join(BASE_FILES)})"
    raise ValueError(f"--base {base} holds {kind}; give a folder saved by an earlier --base, or an empty or new "
                     f"folder to train the base model and save it there")


def align(args: argparse.Namespace) -> None:
    """Chapter 06: for each seed, the noisy-annotator base model (loaded, or trained and saved), the methods, the table."""
    import json
    import time

    if args.lora is not None and args.lora <= 0:
        raise ValueError(f"--lora {args.lora}: the LoRA rank must be a positive integer")
    seeds = args.seeds if args.seeds is not None else [0 if args.seed is None else args.seed]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {' '.join(map(str, seeds))}: a seed is repeated; give each seed once")
    if args.seeds is not None and args.seed is not None:
        raise ValueError("give --seed S or --seeds S1 S2 ..., not both")
    if args.base and len(seeds) > 1:
        raise ValueError(f"--base holds one seed's base model, and --seeds gave {len(seeds)}; drop --base (each seed's "
                         f"base is then kept in runs/alignment/, where notebook 00 saves them) or give one --seed")
    if args.base:  # before any training: a --base that cannot be used would fail only after it
        check_base(Path(args.base))
        saved = Path(args.base) / "task_config.json"
        saved_seed = json.loads(saved.read_text()).get("seed") if saved.is_file() else None
        if saved_seed is not None and saved_seed != seeds[0]:
            raise ValueError(f"--base {args.base} holds the base model of seed {saved_seed}, not of seed {seeds[0]}; give "
                             f"--seed {saved_seed}, or another folder for seed {seeds[0]}")
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a folder; --json wants a file name, e.g. "
                         f"{Path(args.json) / 'align.json'}")
    if args.json and not existing_ancestor(Path(args.json).parent).is_dir():
        raise ValueError(f"--json {args.json}: {existing_ancestor(Path(args.json).parent)} is a file, so the table "
                         f"cannot be written there")

    from scratchlm.align import METHODS, format_table, run_method, summarize
    from scratchlm.arith import accuracy, addition_split, base_model, load_base, save_base, task_config, train_base
    from scratchlm.data import get_profile

    profile = args.profile or get_profile()
    split = addition_split()
    methods = METHODS if args.method == "all" else (args.method,)
    rows = []
    for seed in seeds:
        if args.base and all((Path(args.base) / name).is_file() for name in BASE_FILES):
            base, cfg = load_base(args.base)
            print(f"base model loaded from {args.base}")
        elif args.base:
            cfg = task_config(profile)
            start = time.perf_counter()
            base = train_base(cfg, seed=seed, split=split)
            print(f"profile {profile}, seed {seed}: base model (SFT on noisy data, {cfg.sft_steps} steps) trained in "
                  f"{time.perf_counter() - start:.0f} s")
            save_base(base, cfg, args.base, seed=seed)
            print(f"base model saved in {args.base} (reuse it with --base {args.base})")
        else:
            base, cfg = base_model(seed, profile)
        print(f"profile {profile}, seed {seed}: base model's held-out accuracy {accuracy(base, split['test']):.1%}")
        rows += [run_method(m, base, cfg, split, seed=seed, lora_rank=args.lora, profile=profile) for m in methods]
    print(format_table(rows))
    summary = summarize(rows)
    if len(seeds) > 1:
        print(format_table(summary))
    if args.json:
        keys = ("method", "seed", "accuracy_before", "accuracy_after", "seconds")
        means = [{"method": s["method"], "seed": "mean", "seeds": s["seeds"], "accuracy_before": s["accuracy_before"],
                  "accuracy_after": s["accuracy_after"], "accuracy_after_min": s["min"], "accuracy_after_max": s["max"],
                  "seconds": s["seconds"]} for s in summary] if len(seeds) > 1 else []
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([{k: row[k] for k in keys} for row in rows] + means, indent=1))
        print(f"table written to {args.json}")


def check_chat_args(args: argparse.Namespace) -> None:
    """Refuse chat's options that cannot work (ValueError, one line, naming the option), before the model is loaded."""
    if args.temperature < 0 or args.temperature != args.temperature:
        raise ValueError(f"--temperature {args.temperature}: must be >= 0 (0 is greedy: always the most likely token)")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p {args.top_p}: must be in (0, 1] (1 keeps every token)")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty; give a question, e.g. --prompt 'What is the capital of France?'")
    if args.gguf is not None:
        path = Path(args.gguf).expanduser()
        if path.is_dir():
            raise ValueError(f"--gguf {args.gguf} is a folder; --gguf wants a .gguf file")
        if not path.is_file():
            raise FileNotFoundError(f"--gguf {args.gguf}: no such file; drop --gguf to use SmolLM2-135M-Instruct")


def fit_conversation(tokenizer, messages: list[dict], system: str | None, context: int,
                     max_new_tokens: int) -> tuple[list[int], int, int]:
    """The ChatML prompt ids of `messages` (ending with the user's new message) that leave room for the answer in
    the model's context: the oldest exchanges are dropped (from `messages` itself) until prompt + answer fit.
    Returns (prompt ids, exchanges dropped, tokens the answer may take: max_new_tokens, or fewer when the last
    message alone leaves less room). A last message that leaves no room at all is a ValueError."""
    from scratchlm.gguf import chatml

    dropped = 0
    while True:
        system_message = [] if system is None else [{"role": "system", "content": system}]
        ids = tokenizer.encode(chatml(system_message + messages), allowed_special="all")
        if len(ids) + max_new_tokens <= context or len(messages) <= 1:
            break
        del messages[:2]  # the oldest exchange: a user message and the answer to it
        dropped += 1
    if len(ids) >= context:
        raise ValueError(f"the message takes {len(ids):,} tokens with the chat's formatting, and the model reads at "
                         f"most {context:,}; write a shorter one")
    return ids, dropped, min(max_new_tokens, context - len(ids))


def chat(args: argparse.Namespace) -> None:
    """Talk with a GGUF chat model (SmolLM2-135M-Instruct unless --gguf): one answer with --prompt, else a
    conversation that keeps its history."""
    check_chat_args(args)  # before the model is loaded: a bad option fails at once

    import torch

    from scratchlm.gguf import IM_END, IM_START, default_system_prompt, from_gguf, llama_config_from_gguf, \
        read_gguf, smollm2_path, stream_reply, tokenizer_from_metadata

    path = Path(args.gguf).expanduser() if args.gguf is not None else smollm2_path()
    # the header first (a fraction of a second): a file that is not a llama chat model fails here, in one line
    metadata = read_gguf(path).metadata
    context = llama_config_from_gguf(metadata).block_size
    if args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens}: the model reads at most {context:,} tokens, "
                         f"the conversation included; choose fewer")
    tokenizer = tokenizer_from_metadata(metadata)
    interactive = args.prompt is None
    if interactive:
        print(f"loading {path.name} ...", file=sys.stderr, flush=True)
    model = from_gguf(path)  # the weights, dequantized: a second or two
    context = model.config.block_size  # the model's own limit (the header's, checked above before loading)
    if IM_START not in metadata.get("tokenizer.chat_template", IM_START):
        print(f"warning: {path.name}'s chat template is not ChatML, the format this command writes; expect poor "
              f"answers", file=sys.stderr)
    # the answer ends at the end-of-sequence token (SmolLM2: <|im_end|>, id 2), or at <|im_end|> if it is another
    tokens = metadata.get("tokenizer.ggml.tokens", [])
    stop_ids = {metadata.get("tokenizer.ggml.eos_token_id"), tokens.index(IM_END) if IM_END in tokens else None}
    stop_ids = tuple(sorted(i for i in stop_ids if i is not None))
    system = default_system_prompt(metadata) if args.system is None else (args.system or None)
    generator = torch.Generator().manual_seed(args.seed)  # one for the whole conversation: same seed, same chat

    def answer(messages: list[dict]) -> str:
        """Stream the answer to the conversation to stdout, piece by piece, and return it."""
        ids, dropped, room = fit_conversation(tokenizer, messages, system, context, args.max_new_tokens)
        if dropped:
            print(f"(the conversation outgrew the model's {context:,}-token context: the oldest {dropped} "
                  f"exchange{'s' * (dropped != 1)} dropped; it no longer sees them)", file=sys.stderr, flush=True)
        pieces = []
        try:
            for piece in stream_reply(model, tokenizer, ids, room, args.temperature, top_p=args.top_p,
                                      generator=generator, stop_ids=stop_ids):
                pieces.append(piece)
                print(piece, end="", flush=True)
        finally:
            print(flush=True)  # the answer's newline, also after Ctrl-C cut it short
        text = "".join(pieces)
        if len(tokenizer.encode(text, allowed_special="all")) >= room:
            limit = "--max-new-tokens" if room == args.max_new_tokens else "the model's context"
            print(f"(the answer stopped at {limit}, {room} tokens)", file=sys.stderr, flush=True)
        return text

    if not interactive:
        answer([{"role": "user", "content": args.prompt}])
        return
    try:
        import readline  # noqa: F401  (input() gets line editing and the up arrow's history)
    except ImportError:
        pass
    print(f"{path.name}, {model.num_parameters():,} parameters. Type a message and press Enter; Ctrl-C stops an "
          f"answer; exit, quit or Ctrl-D ends the chat.", file=sys.stderr, flush=True)
    echo = not sys.stdin.isatty()  # input piped in: show it, so the transcript reads as a conversation
    messages = []
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D, or the end of piped input
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the chat
            print()
            return
        if echo:
            print(line)
        if line.strip().lower() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages.append({"role": "assistant", "content": answer(messages)})
        except KeyboardInterrupt:  # Ctrl-C during an answer: the model never saw it, drop the question too
            messages.pop()
            print("(answer interrupted; it is left out of the conversation)", file=sys.stderr, flush=True)
        except ValueError as err:  # a message too long for the context: this turn only
            messages.pop()
            print(f"scratchlm chat: {err}", file=sys.stderr, flush=True)
        print()


class HelpWithDefaults(argparse.HelpFormatter):
    """Ends each option's help with its default value, where it has one (not for flags and "none given")."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default  # `is`, not `in`: 0 == False, and a default of 0 is worth printing
        if action.option_strings and default is not None and default is not False and default != argparse.SUPPRESS:
            text += f" (default: {action.default})"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scratchlm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,align,chat}")

    defaults = HelpWithDefaults
    t = commands.add_parser("train", help="train a model on TinyShakespeare (characters), or chapter 07's T5 on "
                            "number-to-words", formatter_class=defaults,
                            description="Train a chapter's model on TinyShakespeare's characters (or --model t5 on "
                            "number-to-words) at a profile's settings, saving a checkpoint folder as it goes. "
                            "--gradient-checkpointing trades time for memory: each block is recomputed in the "
                            "backward pass instead of keeping its activations.")
    t.add_argument("--model", default="gpt", choices=MODELS, help="which chapter's model (t5: chapter 07's "
                   "encoder-decoder, trained to write numbers in words)")
    t.add_argument("--profile", choices=("ci", "cpu", "gpu"),
                   help="run size; none given: SCRATCHLM_PROFILE, else gpu with CUDA and cpu without")
    t.add_argument("--out", required=True, help="checkpoint folder to write (and to read with --resume)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out exactly where it stopped")
    t.add_argument("--steps", type=int, help="override the profile's max_steps (scaling its warmup to match; "
                   "on --resume this also stretches the schedule)")
    t.add_argument("--warmup", type=int, help="learning-rate warmup steps; none given: the profile's "
                   "(100 of 2000 at cpu), scaled to --steps")
    t.add_argument("--device", help="cpu, cuda, cuda:1, ...; none given: cuda when available")
    t.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model; none given: on for the gpu profile")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="keep only each block's input in the forward pass and recompute the block in the backward "
                   "pass: less memory for activations, more time per step (notebook 03_training, section 13); not "
                   "for deepseek or t5; none given: off (on --resume: as the run was started)")
    t.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step and save, keeping the "
                   "schedule of the whole run (continue later with --resume); none given: train to the end")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(run=train)

    s = commands.add_parser("sample", help="generate text from a checkpoint folder (a t5 one translates a number)",
                            formatter_class=defaults)
    s.add_argument("checkpoint", help="checkpoint folder written by `scratchlm train`")
    s.add_argument("--prompt", default="\\n", help="text to continue; \\n is a newline (a t5 checkpoint: the "
                   "number to write in words, e.g. 4096)")
    s.add_argument("--max-new-tokens", type=int, default=500, help="how many tokens (characters) to add")
    s.add_argument("--temperature", type=float, default=None, help="0 is greedy; higher is more varied; none given: "
                   "0.8 (a t5 checkpoint decodes greedily and takes no other value)")
    s.add_argument("--top-k", type=int, default=None,
                   help="sample only from the k most likely tokens; none given: off (every character can be drawn)")
    s.add_argument("--top-p", type=float, default=None,
                   help="sample from the smallest set of tokens whose probability reaches p; none given: off")
    s.add_argument("--seed", type=int, default=1337, help="random seed: the same seed gives the same text")
    s.add_argument("--num-beams", type=int, default=1, help="t5 checkpoints only: beam search with this many beams "
                   "(1 is greedy); a t5 checkpoint never samples, so --temperature, --top-k and --top-p do not apply")
    s.add_argument("--device", help="cpu, cuda, ...; none given: cuda when available")
    s.set_defaults(run=sample)

    a = commands.add_parser("align", help="chapter 06: every alignment method on the noisy-addition task, the table",
                            formatter_class=defaults)
    a.add_argument("--method", default="all", choices=ALIGN_METHODS + ("all",),
                   help="which row of chapter 06's table (sft: the more-SFT control; sft_verified: the upper bar)")
    a.add_argument("--lora", type=int, metavar="R", help="train LoRA adapters of rank R instead of every weight")
    a.add_argument("--profile", choices=("ci", "cpu", "gpu"),
                   help="run size; none given: SCRATCHLM_PROFILE, else gpu with CUDA and cpu without")
    a.add_argument("--seed", type=int, help="seed of the base model, its noisy data and each method (default 0)")
    a.add_argument("--seeds", type=int, nargs="+", metavar="S", help="several seeds, e.g. --seeds 0 1 2: one row per "
                   "method and seed, then each method's mean and min-max (the JSON adds a row with seed \"mean\")")
    a.add_argument("--base", metavar="DIR", help="load the base model from DIR; if DIR is empty or new, train one and save it there")
    a.add_argument("--json", metavar="FILE", help="also write the table as a JSON list of objects")
    a.set_defaults(run=align)

    c = commands.add_parser("chat", help="talk with SmolLM2-135M-Instruct, a real model (chapter 04)",
                            formatter_class=defaults, description="Talk with a GGUF chat model: one answer with "
                            "--prompt (alone on stdout), else a conversation in the terminal that keeps its history.")
    c.add_argument("--gguf", metavar="PATH", help="a llama GGUF chat model with a ChatML template; none given: "
                   "SmolLM2-135M-Instruct ($SCRATCHLM_SMOLLM2, else the file that `make lab` installs)")
    c.add_argument("--prompt", metavar="TEXT", help="answer this one message, print the answer alone and exit; "
                   "none given: a conversation (exit, quit or Ctrl-D ends it)")
    c.add_argument("--system", metavar="TEXT", help="the system message ('' for none); none given: the file's "
                   "default (SmolLM2: 'You are a helpful AI assistant named SmolLM, trained by Hugging Face')")
    c.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="the longest answer, in tokens")
    c.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="0 is greedy (always the most likely token); lower is more focused, higher more varied")
    c.add_argument("--top-p", type=float, default=0.9, metavar="P",
                   help="sample from the smallest set of tokens whose probability reaches P; 1 keeps every token")
    c.add_argument("--seed", type=int, default=0, metavar="S",
                   help="random seed: the same seed and messages give the same answers")
    c.set_defaults(run=chat)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "device", None) is not None:
            check_device(args.device)  # before any data is read or model built
        args.run(args)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] == "scratchlm":
            raise
        parser.exit(2, f"scratchlm {args.command}: error: {err} (in {sys.executable}); run scratchlm in the course's "
                       f"virtualenv: `source .venv/bin/activate` first (`make lab` creates it), or "
                       f"`.venv/bin/python -m scratchlm ...`\n")
    except (FileNotFoundError, FileExistsError, ValueError, TypeError) as err:
        parser.exit(2, f"scratchlm {args.command}: error: {err}\n")
    except KeyboardInterrupt:
        saved = "; the last checkpoint written is in place (continue it with --resume)" if args.command == "train" else ""
        parser.exit(130, f"\ninterrupted{saved}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
