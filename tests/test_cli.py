"""The command line, `python -m scratchlm`: train (ci profile) and sample end to end, resume, errors."""

import json
import os
import subprocess
import sys

import pytest

from scratchlm.__main__ import main
from scratchlm.deepseek import DeepseekV3
from scratchlm.llama import Llama
from scratchlm.train import MODEL_CONFIG, OPTIMIZER, TOKENIZER, TRAIN_STATE, WEIGHTS, load_model


def run_cli(*args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "scratchlm", *args], capture_output=True, text=True, env=env,
                            timeout=300)
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
    for shown in ("(default: 500)", "(default: 0.8)", "(default: 1337)", "(default: \\n)", "none given: off"):
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
