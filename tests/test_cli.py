"""The command line, `python -m scratchlm`: train (ci profile) and sample end to end, resume, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scratchlm.__main__ import main
from scratchlm.deepseek import DeepseekV3
from scratchlm.llama import Llama
from scratchlm.train import MODEL_CONFIG, OPTIMIZER, TOKENIZER, TRAIN_STATE, WEIGHTS, load_model


def run_cli(*args, check=True, input=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, env=env,
                            timeout=300, input=input)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A ci-profile run of the command line, in a subprocess."""
    out = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli("train", "--model", "gpt", "--profile", "ci", "--out", str(out), "--quiet")
    return out, result


def test_train_writes_a_complete_checkpoint(trained):
    out, result = trained
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, MODEL_CONFIG, TOKENIZER, TRAIN_STATE, OPTIMIZER])
    state = json.loads((out / TRAIN_STATE).read_text())
    evals = state["history"]["eval"]
    assert state["step"] == 40 and evals[-1]["step"] == 40 and evals[-1]["val"] < evals[0]["val"] - 0.7
    assert f"val loss {evals[-1]['val']:.4f}" in result.stdout
    assert json.loads((out / MODEL_CONFIG).read_text())["model"] == "gpt"


def test_sample_continues_the_prompt_and_is_repeatable(trained, capsys):
    out, _ = trained
    args = ["sample", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "30", "--temperature", "0.8",
            "--top-k", "20", "--seed", "7"]
    text = run_cli(*args).stdout
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 30 + 1  # print's newline
    main(args)  # in process this time: the same seed gives the same text
    assert capsys.readouterr().out == text
    main(["sample", str(out), "--prompt", "\\n", "--max-new-tokens", "10", "--temperature", "0"])
    greedy = capsys.readouterr().out
    assert greedy.startswith("\n") and len(greedy) == 1 + 10 + 1


def test_resume_continues_to_more_steps(trained, tmp_path, capsys):
    out, _ = trained
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in out.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    main(["train", "--out", str(copy), "--resume", "--steps", "44", "--quiet"])
    printed = capsys.readouterr().out
    assert "resuming" in printed and "at step 40 of 44" in printed
    state = json.loads((copy / TRAIN_STATE).read_text())
    assert state["step"] == 44 and len(state["history"]["train_loss"]) == 44


def test_errors_say_what_to_do(trained, tmp_path, capsys):
    out, _ = trained
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(tmp_path / "nowhere")])
    assert exit_.value.code == 2 and "does not exist; train one first" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train", "--profile", "ci", "--out", str(out)])
    assert "already holds a checkpoint: pass --resume" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train", "--profile", "ci", "--out", str(tmp_path / "empty"), "--resume"])
    assert "holds no checkpoint" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--model", "mamba", "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "invalid choice: 'mamba'" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["sample", str(out), "--prompt", "café"])
    assert "characters not in the vocabulary" in capsys.readouterr().err

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / WEIGHTS).write_bytes((out / WEIGHTS).read_bytes())
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "half")])
    assert "is missing model_config.json" in capsys.readouterr().err


def test_llama_trains_and_samples_from_the_command_line(tmp_path, capsys):
    """--model llama: notebook 04_llama/05's Llama, the GPT's size; sampling rebuilds it in a fresh process."""
    out = tmp_path / "llama"
    result = run_cli("train", "--model", "llama", "--profile", "ci", "--out", str(out), "--quiet")
    spec = json.loads((out / MODEL_CONFIG).read_text())
    assert spec["model"] == "llama" and spec["config"]["hidden_size"] == 32
    llama = load_model(out)
    assert isinstance(llama, Llama) and f"profile ci: llama with {llama.num_parameters():,} parameters" in result.stdout
    evals = json.loads((out / TRAIN_STATE).read_text())["history"]["eval"]
    assert evals[-1]["step"] == 40 and evals[-1]["val"] < evals[0]["val"] - 0.7
    text = run_cli("sample", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3").stdout
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20 + 1
    with pytest.raises(SystemExit):
        main(["train", "--out", str(out), "--resume"])  # --model defaults to gpt
    assert "--model gpt, but the checkpoint" in capsys.readouterr().err


def test_help_shows_defaults_and_no_maintainer_notes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "hand-written" not in top and "COMMAND --help" in top
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    for shown in ("(default: 500)", "none given: 0.8", "(default: 1337)", "(default: \\n)", "none given: off"):
        assert shown in text, shown
    assert build_parser_defaults()["top_k"] is None  # top-k is off unless asked for


def build_parser_defaults():
    from scratchlm.__main__ import build_parser

    return vars(build_parser().parse_args(["sample", "somewhere"]))


def test_short_runs_scale_the_warmup(tmp_path, capsys):
    """`--steps` at or below the profile's 100 warmup steps used to fail on warmup_steps; now it scales."""
    main(["train", "--profile", "cpu", "--steps", "20", "--out", str(tmp_path / "short"), "--quiet"])
    printed = capsys.readouterr().out
    assert "20 steps of 12 x 64 tokens" in printed and "after 1 warmup steps" in printed  # 100 * 20 / 2000
    assert json.loads((tmp_path / "short" / TRAIN_STATE).read_text())["step"] == 20
    main(["train", "--profile", "ci", "--steps", "6", "--warmup", "2", "--out", str(tmp_path / "w"), "--quiet"])
    assert "after 2 warmup steps" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--profile", "ci", "--steps", "6", "--warmup", "6", "--out", str(tmp_path / "bad"), "--quiet"])
    assert "warmup_steps=6 must be >= 0 and below" in capsys.readouterr().err


def test_deepseek_trains_and_samples_from_the_command_line(tmp_path):
    """--model deepseek: notebook 05_deepseek/05's DeepSeek (MLA, DeepSeekMoE with the balancing bias)."""
    out = tmp_path / "deepseek"
    result = run_cli("train", "--model", "deepseek", "--profile", "ci", "--out", str(out), "--quiet")
    spec = json.loads((out / MODEL_CONFIG).read_text())
    assert spec["model"] == "deepseek" and spec["config"]["bias_update_speed"] == 1e-3
    model = load_model(out)
    assert isinstance(model, DeepseekV3) and f"with {model.num_parameters():,} parameters" in result.stdout
    assert any(m.gate.e_score_correction_bias.abs().sum() > 0 for m in model.moe_layers())  # the bias moved, was saved
    evals = json.loads((out / TRAIN_STATE).read_text())["history"]["eval"]
    assert evals[-1]["step"] == 40 and evals[-1]["val"] < evals[0]["val"] - 0.5
    text = run_cli("sample", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3").stdout
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20 + 1


def test_gradient_checkpointing_trains_the_same_run(tmp_path, capsys):
    """--gradient-checkpointing: each block is recomputed in the backward pass, and the run is the same, loss for loss
    (two short runs in this process, so at the same thread count)."""
    runs = {}
    for flag in ("--no-gradient-checkpointing", "--gradient-checkpointing"):
        out = tmp_path / flag.strip("-")
        main(["train", "--profile", "ci", "--steps", "12", "--out", str(out), "--quiet", flag])
        runs[flag] = json.loads((out / TRAIN_STATE).read_text()), capsys.readouterr().out
    (plain, plain_log), (checkpointed, log) = runs["--no-gradient-checkpointing"], runs["--gradient-checkpointing"]
    assert "gradient checkpointing on" in log and "gradient checkpointing" not in plain_log
    assert checkpointed["train_config"]["gradient_checkpointing"] and not plain["train_config"]["gradient_checkpointing"]
    assert checkpointed["history"]["train_loss"] == plain["history"]["train_loss"]
    assert checkpointed["history"]["eval"] == plain["history"]["eval"]


def test_gradient_checkpointing_of_deepseek_is_refused_before_any_data(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scratchlm.train.shakespeare_char_data", fail_if_called("reading the data"))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "deepseek", "--profile", "ci", "--out", str(tmp_path / "ds"),
              "--gradient-checkpointing"])
    assert exit_info.value.code == 2
    assert "--gradient-checkpointing does not apply to --model deepseek" in one_error_line(capsys, "train")
    assert not (tmp_path / "ds").exists()


def test_train_log_is_compact_and_says_each_loss_once(trained):
    """The model is one short line (its whole config is in model_config.json), and the last estimates are
    printed once, by the evaluation, not again in the closing line."""
    out, result = trained
    lines = result.stdout.splitlines()
    model_line = next(line for line in lines if line.startswith("profile ci: gpt with"))
    assert model_line.startswith("profile ci: gpt with 27,840 parameters (2 layers, 2 heads, width 32, context 32;")
    assert len(model_line) - len(str(out)) < 140 and "{" not in result.stdout  # no config dict printed
    final = json.loads((out / TRAIN_STATE).read_text())["history"]["eval"][-1]
    assert result.stdout.count(f"val loss {final['val']:.4f}") == 1
    assert sum(line.startswith("step 40:") for line in lines) == 1
    assert any(line.startswith("trained to step 40 in ") and "val loss on the whole split" in line for line in lines)


def fail_if_called(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran: the bad argument should have been refused before it")

    return fail


def one_error_line(capsys, command):
    err = capsys.readouterr().err
    assert err.startswith(f"scratchlm {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.skipif(torch.version.cuda is not None or torch.version.hip is not None, reason="needs a CPU-only torch")
def test_device_cuda_on_a_cpu_only_torch_is_one_line_before_any_data(tmp_path, capsys, monkeypatch):
    """This torch has no CUDA: --device cuda used to end in a 30-line traceback (`Torch not compiled with CUDA
    enabled`) after loading the data; now it is one line through the parser's error path, before the data."""
    monkeypatch.setattr("scratchlm.train.shakespeare_char_data", fail_if_called("loading the data"))
    monkeypatch.setattr("scratchlm.train.load_model", fail_if_called("loading the checkpoint"))
    expected = (f"--device cuda: this PyTorch build has no CUDA (torch {torch.__version__}); drop --device to use "
                f"the CPU, or install a CUDA build of PyTorch")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--device", "cuda", "--profile", "ci", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and one_error_line(capsys, "train") == f"scratchlm train: error: {expected}\n"
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--device", "cuda:1", "--profile", "ci", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "--device cuda:1: this PyTorch build has no CUDA" in one_error_line(capsys, "train")
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(tmp_path / "nowhere"), "--device", "cuda"])
    assert exit_.value.code == 2 and one_error_line(capsys, "sample") == f"scratchlm sample: error: {expected}\n"
    # as a newcomer runs it: exit status 2, the one line on stderr, no traceback
    result = run_cli("train", "--device", "cuda", "--profile", "ci", "--out", str(tmp_path / "run"), check=False)
    assert result.returncode == 2 and result.stderr == f"scratchlm train: error: {expected}\n" and not result.stdout


def test_device_torch_cannot_parse_or_a_gpu_index_beyond_the_count_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scratchlm.train.shakespeare_char_data", fail_if_called("loading the data"))
    for device in ("gpu", "cuda:x", "CUDA"):
        with pytest.raises(SystemExit) as exit_:
            main(["train", "--device", device, "--profile", "ci", "--out", str(tmp_path / "run")])
        err = one_error_line(capsys, "train")
        assert exit_.value.code == 2 and f"--device {device}: PyTorch does not know this device; use cpu, cuda" in err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--device", "meta", "--profile", "ci", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "--device meta: scratchlm runs on cpu, cuda" in one_error_line(capsys, "train")
    # a CUDA build that sees one GPU (imitated: this machine may have none): cuda:3 is beyond it, cuda:0 is fine
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--device", "cuda:3", "--profile", "ci", "--out", str(tmp_path / "run")])
    err = one_error_line(capsys, "train")
    assert exit_.value.code == 2 and "--device cuda:3: this machine has 1 visible CUDA device (cuda:0 to cuda:0)" in err
    with pytest.raises(AssertionError, match="loading the data ran"):  # accepted: training starts
        main(["train", "--device", "cuda:0", "--profile", "ci", "--out", str(tmp_path / "run")])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA build without a driver or GPU
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "nowhere"), "--device", "cuda"])
    assert "is built for CUDA but sees no GPU" in one_error_line(capsys, "sample")


def test_out_that_is_a_file_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scratchlm.train.shakespeare_char_data", fail_if_called("loading the data"))
    (tmp_path / "f").write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--profile", "ci", "--out", str(tmp_path / "f")])
    assert exit_.value.code == 2 and one_error_line(capsys, "train") == (
        f"scratchlm train: error: --out {tmp_path / 'f'} is a file; --out wants a folder: training writes its "
        f"checkpoints there\n")
    with pytest.raises(SystemExit):
        main(["train", "--profile", "ci", "--out", str(tmp_path / "f" / "run")])
    assert f"{tmp_path / 'f'} is a file, so the folder cannot be made there" in one_error_line(capsys, "train")


class TrainingStarted(Exception):
    pass


def test_align_base_that_is_not_a_base_model_folder_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """--base FILE used to train the base model for a minute, then fail with `[Errno 17] File exists`; a folder
    holding other files got the base model's files mixed in. Both are refused before training now."""
    monkeypatch.setattr("scratchlm.arith.train_sft", fail_if_called("training the base model"))
    monkeypatch.setattr("scratchlm.arith.load_base", fail_if_called("loading a base model"))
    monkeypatch.setattr("scratchlm.align.run_method", fail_if_called("an alignment method"))
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["align", "--base", str(file), "--profile", "ci"])
    assert exit_.value.code == 2 and one_error_line(capsys, "align") == (
        f"scratchlm align: error: --base {file} is a file; --base wants a folder: the base model is loaded from it, "
        f"or trained and saved there if it holds none\n")

    with pytest.raises(SystemExit) as exit_:
        main(["align", "--base", str(file / "base"), "--profile", "ci"])
    assert exit_.value.code == 2 and f"{file} is a file, so the folder cannot be made" in one_error_line(capsys, "align")

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        main(["align", "--base", str(other), "--profile", "ci"])
    err = one_error_line(capsys, "align")
    assert exit_.value.code == 2 and f"--base {other} holds notes.txt, not a base model" in err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    checkpoint = tmp_path / "checkpoint"  # what `scratchlm train` writes (weights under the same name)
    checkpoint.mkdir()
    for name in (WEIGHTS, MODEL_CONFIG, TOKENIZER):
        (checkpoint / name).write_text("")
    with pytest.raises(SystemExit) as exit_:
        main(["align", "--base", str(checkpoint), "--profile", "ci"])
    assert exit_.value.code == 2 and "holds a `scratchlm train` checkpoint, not a chapter 06 base model" in (
        one_error_line(capsys, "align"))

    # unchanged: an empty or a new folder means "train the base model and save it there"
    def started(*args, **kwargs):
        raise TrainingStarted

    monkeypatch.setattr("scratchlm.arith.train_sft", started)
    (tmp_path / "empty").mkdir()
    for base in (tmp_path / "empty", tmp_path / "new" / "base"):
        with pytest.raises(TrainingStarted):
            main(["align", "--base", str(base), "--profile", "ci"])


def test_outside_the_virtualenv_the_error_says_to_activate_it(capsys, monkeypatch):
    """A Python without torch (not the course's .venv) gets one line naming the fix, not a traceback."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as it does without torch
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "runs/shakespeare-char"])
    err = one_error_line(capsys, "sample")
    assert exit_.value.code == 2 and "source .venv/bin/activate" in err and ".venv/bin/python -m scratchlm" in err


def test_readme_and_help_say_to_activate_the_virtualenv(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    first_block = section.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("source .venv/bin/activate")
    assert all(line.startswith("python -m scratchlm ") for line in first_block[1:])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "source .venv/bin/activate" in capsys.readouterr().out


# `chat`: SmolLM2-135M-Instruct from its GGUF file (notebook 04_llama/07). The model is loaded once in this process
# (the in-process tests put it in place of from_gguf) and once per subprocess test.
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2():
    from scratchlm.gguf import (
        default_system_prompt,
        from_gguf,
        read_gguf,
        smollm2_path,
        tokenizer_from_metadata,
    )

    path = smollm2_path()
    metadata = read_gguf(path).metadata
    return from_gguf(path), tokenizer_from_metadata(metadata), default_system_prompt(metadata)


def reference_answer(smollm2, question, max_new_tokens, temperature, top_p=None, seed=0):
    """What the library says the answer is: notebook 04_llama/07's chatml + stream_reply, stopping at <|im_end|>."""
    from scratchlm.gguf import chatml, stream_reply

    model, tokenizer, system = smollm2
    ids = tokenizer.encode(chatml([{"role": "user", "content": question}], system), allowed_special="all")
    return "".join(stream_reply(model, tokenizer, ids, max_new_tokens, temperature, top_p=top_p,
                                generator=torch.Generator().manual_seed(seed), stop_ids=(2,)))


@pytest.fixture
def loaded_once(smollm2, monkeypatch):
    """chat in this process uses the fixture's model instead of loading the file again."""
    monkeypatch.setattr("scratchlm.gguf.from_gguf", lambda path, dtype=None: smollm2[0])
    return smollm2


def test_chat_prompt_prints_the_answer_alone(smollm2):
    """As a script uses it: the greedy answer, alone on stdout with one newline, nothing on stderr."""
    result = run_cli("chat", "--prompt", QUESTION, "--temperature", "0", "--max-new-tokens", "12")
    assert "Paris" in result.stdout and result.stdout.count("\n") == 1 and result.stdout.endswith("\n")
    assert result.stdout == reference_answer(smollm2, QUESTION, 12, 0.0) + "\n" and result.stderr == ""


def test_chat_same_seed_same_answer_as_stream_reply(loaded_once, capsys):
    question = "Write a haiku about the sea."
    args = ["chat", "--prompt", question, "--temperature", "1.0", "--max-new-tokens", "16", "--seed", "3"]
    main(args)
    first = capsys.readouterr()
    assert first.out == reference_answer(loaded_once, question, 16, 1.0, top_p=0.9, seed=3) + "\n"
    main(args)
    assert capsys.readouterr().out == first.out
    main([*args[:-1], "4"])
    assert capsys.readouterr().out != first.out  # another seed, another answer


def test_chat_bad_options_are_one_line_before_loading(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("scratchlm.gguf.from_gguf", fail_if_called("loading the model"))
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_text("not a model")
    cases = [(["--gguf", str(tmp_path / "nowhere.gguf")], f"--gguf {tmp_path / 'nowhere.gguf'}: no such file"),
             (["--gguf", str(tmp_path)], "is a folder; --gguf wants a .gguf file"),
             (["--gguf", str(not_gguf)], "not the GGUF magic"),
             (["--temperature", "-1"], "--temperature -1.0: must be >= 0 (0 is greedy"),
             (["--top-p", "0"], "--top-p 0.0: must be in (0, 1]"), (["--top-p", "1.5"], "--top-p 1.5: must be in"),
             (["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
             (["--max-new-tokens", "9000"], "--max-new-tokens 9000: the model reads at most 8,192 tokens"),
             (["--prompt", " "], "--prompt is empty")]
    for options, expected in cases:
        for mode in ([], ["--prompt", QUESTION]):
            with pytest.raises(SystemExit) as exit_:
                main(["chat", *mode, *options])
            err = one_error_line(capsys, "chat")
            assert exit_.value.code == 2 and expected in err, (options, err)
    monkeypatch.setenv("SCRATCHLM_SMOLLM2", str(tmp_path / "nowhere.gguf"))
    for mode in ([], ["--prompt", QUESTION]):
        with pytest.raises(SystemExit) as exit_:
            main(["chat", *mode])
        err = one_error_line(capsys, "chat")
        assert exit_.value.code == 2 and f"SCRATCHLM_SMOLLM2={tmp_path / 'nowhere.gguf'} is not a file" in err
    # as a newcomer runs it: exit status 2, the one line on stderr, no traceback, nothing on stdout
    result = run_cli("chat", "--gguf", str(tmp_path / "nowhere.gguf"), "--prompt", QUESTION, check=False)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr == f"scratchlm chat: error: --gguf {tmp_path / 'nowhere.gguf'}: no such file; drop --gguf to " \
                            f"use SmolLM2-135M-Instruct\n"


def test_chat_conversation_from_a_pipe():
    """Without --prompt: a conversation; input piped in is echoed after the prompt, `exit` ends it with status 0."""
    result = run_cli("chat", "--temperature", "0", "--max-new-tokens", "20", input="Hi\nexit\n")
    assert result.stdout.startswith("> Hi\n") and result.stdout.endswith("\n\n> exit\n"), result.stdout
    assert len(result.stdout) > len("> Hi\n\n\n> exit\n") + 2  # an answer between them
    assert "loading SmolLM2-135M-Instruct" in result.stderr and "Traceback" not in result.stderr


def test_chat_conversation_keeps_the_history(loaded_once, capsys, monkeypatch):
    import scratchlm.gguf

    model, tokenizer, system = loaded_once
    prompts, real_stream_reply = [], scratchlm.gguf.stream_reply

    def recording(model, tokenizer, prompt_ids, *args, **kwargs):
        prompts.append(tokenizer.decode(prompt_ids))
        yield from real_stream_reply(model, tokenizer, prompt_ids, *args, **kwargs)

    monkeypatch.setattr("scratchlm.gguf.stream_reply", recording)
    lines = ["My name is Ada.", "", "What is my name?"]

    def typed(prompt):
        print(prompt, end="")
        if not lines:
            raise EOFError  # Ctrl-D
        return lines.pop(0)

    monkeypatch.setattr("builtins.input", typed)
    main(["chat", "--temperature", "0", "--max-new-tokens", "24"])  # returns: exit status 0
    out = capsys.readouterr().out
    assert len(prompts) == 2  # the empty line asked nothing
    turns = out.split("> ")
    first_answer = turns[1].removeprefix("My name is Ada.\n").removesuffix("\n\n")
    assert first_answer and first_answer == reference_answer(loaded_once, "My name is Ada.", 24, 0.0)
    assert prompts[0] == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nMy name is Ada.<|im_end|>\n" \
                         f"<|im_start|>assistant\n"
    assert prompts[1] == (f"{prompts[0]}{first_answer}<|im_end|>\n<|im_start|>user\nWhat is my name?<|im_end|>\n"
                          f"<|im_start|>assistant\n")
    assert out.endswith("> \n")  # Ctrl-D: a newline, so the shell's prompt starts on its own line


def fake_answer(text):
    def stream_reply(model, tokenizer, prompt_ids, *args, **kwargs):
        yield from (word + " " for word in text.split())

    return stream_reply


def test_chat_drops_the_oldest_turns_when_the_context_is_full(loaded_once, capsys, monkeypatch):
    from scratchlm.__main__ import fit_conversation

    model, tokenizer, system = loaded_once
    messages = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "word " * 40},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "word " * 40},
                {"role": "user", "content": "three"}]
    ids, dropped, room = fit_conversation(tokenizer, list(messages), system, 10_000, 30)
    full = len(ids)
    trimmed = list(messages)
    ids, dropped, room = fit_conversation(tokenizer, trimmed, system, full + 29, 30)  # one token short
    assert dropped == 1 and trimmed == messages[2:] and room == 30
    text = tokenizer.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\ntwo<|im_end|>")
    alone = len(tokenizer.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nthree<|im_end|>\n"
                                 f"<|im_start|>assistant\n", allowed_special="all"))
    ids, dropped, room = fit_conversation(tokenizer, list(messages), system, alone + 40, 30)
    assert dropped == 2 and len(ids) == alone and room == 30
    assert fit_conversation(tokenizer, list(messages), system, alone + 5, 30)[2] == 5  # the answer gets what is left
    with pytest.raises(ValueError, match="the message takes .* tokens with the chat's formatting"):
        fit_conversation(tokenizer, list(messages), system, alone, 30)

    # in the conversation: said on stderr, and the chat goes on
    monkeypatch.setattr("scratchlm.gguf.stream_reply", fake_answer("word " * 40))
    monkeypatch.setattr(model.config, "max_position_embeddings", full + 29)
    lines = ["one", "two", "three", "quit"]
    monkeypatch.setattr("builtins.input", lambda prompt: lines.pop(0))
    main(["chat", "--max-new-tokens", "30"])
    err = capsys.readouterr().err
    assert err.count("context: the oldest 1 exchange dropped") == 1 and not lines


def test_chat_ctrl_c_stops_an_answer_or_ends_the_chat(loaded_once, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        yield "The capital"
        raise KeyboardInterrupt

    monkeypatch.setattr("scratchlm.gguf.stream_reply", interrupted)
    lines = [QUESTION, KeyboardInterrupt]

    def typed(prompt):
        line = lines.pop(0)
        if line is KeyboardInterrupt:
            raise KeyboardInterrupt
        return line

    monkeypatch.setattr("builtins.input", typed)
    main(["chat"])  # Ctrl-C during the answer: back to the prompt; Ctrl-C at the prompt: the end, no traceback
    captured = capsys.readouterr()
    assert not lines and "The capital\n" in captured.out and "answer interrupted" in captured.err
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--prompt", QUESTION])  # one answer: stopped as any command is, status 130
    captured = capsys.readouterr()
    assert exit_.value.code == 130 and captured.err == "\ninterrupted\n" and captured.out == "The capital\n"


def test_chat_help_shows_defaults_without_loading_torch(capsys):
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 256)", "(default: 0.7)", "(default: 0.9)", "(default: 0)", "0 is greedy", "--gguf PATH",
                  "--system TEXT", "--seed S"):
        assert shown in text, shown
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "{train,sample,align,chat}" in capsys.readouterr().out
    code = ("import sys\nfrom scratchlm.__main__ import main\ntry:\n    main(['chat', '--help'])\nexcept SystemExit:\n"
            "    print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m == 'scratchlm.gguf'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines()[-1] == "[]", result.stderr


def test_align_methods_are_the_tables_rows():
    from scratchlm.__main__ import ALIGN_METHODS
    from scratchlm.align import METHODS

    assert ALIGN_METHODS == METHODS


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0", "0"], "a seed is repeated"),
    (["--seed", "1", "--seeds", "0", "2"], "not both"),
    (["--seeds", "0", "1", "--base", "somewhere"], "--base holds one seed's base model"),
])
def test_align_seed_options_are_checked_before_training(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("scratchlm.arith.train_sft", fail_if_called("training the base model"))
    with pytest.raises(SystemExit) as exit_:
        main(["align", "--profile", "ci", *argv])
    assert exit_.value.code == 2 and message in one_error_line(capsys, "align")


def test_align_seeds_write_one_row_per_method_and_seed_and_the_mean(tmp_path, monkeypatch):
    """--seeds 0 1: each seed's base is made by base_model (kept in a test folder here), and the JSON holds a row per
    method and seed, with the keys the README names, then the mean with its min and max."""
    from scratchlm import arith

    monkeypatch.setattr(arith, "base_folder", lambda profile=None, seed=0: tmp_path / f"base-{profile}-seed{seed}")
    monkeypatch.setattr(arith, "task_config", lambda profile=None: arith.TaskConfig(sft_steps=20))
    out = tmp_path / "table.json"
    main(["align", "--method", "ipo", "--profile", "ci", "--seeds", "0", "1", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r["seed"]) for r in rows] == [("ipo", 0), ("ipo", 1), ("ipo", "mean")]
    assert all({"method", "seed", "accuracy_before", "accuracy_after", "seconds"} <= set(r) for r in rows)
    mean = rows[-1]
    assert mean["accuracy_after"] == pytest.approx((rows[0]["accuracy_after"] + rows[1]["accuracy_after"]) / 2)
    assert mean["accuracy_after_min"] <= mean["accuracy_after"] <= mean["accuracy_after_max"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base-ci-seed0", "base-ci-seed1", "table.json"]


def test_align_base_of_another_seed_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """A --base folder records the seed it was trained with; asking for another seed would label its rows wrongly."""
    from scratchlm.arith import save_base, task_config, task_model

    save_base(task_model(task_config("ci"), seed=1), task_config("ci"), tmp_path / "base", seed=1)
    monkeypatch.setattr("scratchlm.align.run_method", fail_if_called("an alignment method"))
    with pytest.raises(SystemExit) as exit_:
        main(["align", "--base", str(tmp_path / "base"), "--seed", "2", "--profile", "ci"])
    assert exit_.value.code == 2 and "holds the base model of seed 1, not of seed 2" in one_error_line(capsys, "align")


# chapter 07: the number-to-words T5 (scratchlm.seq2seq)

@pytest.fixture(scope="module")
def t5_trained(tmp_path_factory):
    """A ci-profile `train --model t5` run, in a subprocess."""
    out = tmp_path_factory.mktemp("cli-t5") / "t5"
    result = run_cli("train", "--model", "t5", "--profile", "ci", "--out", str(out), "--quiet")
    return out, result


def test_t5_trains_saves_a_transformers_checkpoint_and_reports_exact_match(t5_trained):
    from transformers import T5ForConditionalGeneration

    from scratchlm.seq2seq import T5, load_translator

    out, result = t5_trained
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                     "training.json"]
    assert json.loads((out / "config.json").read_text())["model_type"] == "t5"
    metrics = json.loads((out / "training.json").read_text())
    assert metrics["profile"] == "ci" and metrics["steps"] == 40 and metrics["n_test"] == 200
    assert f"held-out exact match (greedy) {metrics['test_exact_match_greedy']:.1%} of 200" in result.stdout
    model, tokenizer = load_translator(out)
    assert isinstance(model, T5) and tokenizer.vocab_size == model.config.vocab_size
    assert T5ForConditionalGeneration.from_pretrained(out).config.d_model == model.config.d_model


def test_t5_sample_translates_greedily_and_with_beams(t5_trained, capsys):
    from scratchlm.seq2seq import load_translator, translate

    out, _ = t5_trained
    model, tokenizer = load_translator(out)
    text = run_cli("sample", str(out), "--prompt", "4096").stdout
    assert text == translate(model, ["4096"], tokenizer, max_new_tokens=500)[0] + "\n"
    main(["sample", str(out), "--prompt", "4,096", "--num-beams", "3", "--max-new-tokens", "20"])
    assert capsys.readouterr().out == translate(model, ["4096"], tokenizer, num_beams=3, max_new_tokens=20)[0] + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--resume"], "--resume does not apply to --model t5"),
    (["--stop-at", "5"], "--stop-at does not apply to --model t5"),
    (["--compile"], "--compile does not apply to --model t5"),
    (["--gradient-checkpointing"], "--gradient-checkpointing does not apply to --model t5"),
    (["--steps", "0"], "--steps 0: must be at least 1"),
])
def test_t5_train_refuses_options_it_does_not_have_before_training(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "t5", "--profile", "ci", "--out", str(tmp_path / "t5"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "t5").exists()


def test_t5_train_refuses_an_out_that_holds_a_checkpoint(t5_trained, capsys):
    out, _ = t5_trained
    with pytest.raises(SystemExit):
        main(["train", "--model", "t5", "--profile", "ci", "--out", str(out)])
    assert "already holds a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "12a"], "a whole number written in digits"),
    (["--prompt", "1000000"], "trained on 0 to 999,999"),
    (["--prompt", "-5"], "a whole number written in digits"),
    (["--prompt", "12", "--top-k", "5"], "--top-k does not apply to a t5 checkpoint"),
    (["--prompt", "12", "--temperature", "1.5"], "--temperature 1.5 does not apply to a t5 checkpoint"),
    (["--prompt", "12", "--temperature", "0.8"], "--temperature 0.8 does not apply to a t5 checkpoint"),
    (["--prompt", "12", "--num-beams", "0"], "--num-beams 0"),
])
def test_t5_sample_bad_options_are_one_line(argv, message, t5_trained, capsys):
    out, _ = t5_trained
    with pytest.raises(SystemExit) as exit_info:
        main(["sample", str(out), *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_num_beams_on_a_language_model_checkpoint_is_refused(trained, capsys):
    out, _ = trained
    with pytest.raises(SystemExit):
        main(["sample", str(out), "--num-beams", "2"])
    assert "beam search is for t5 checkpoints" in capsys.readouterr().err
