"""Muon (scratchlm.optim), the speedrun model and recipe (scratchlm.speedrun), the wsd schedule and the optimizer hook."""

import json
from dataclasses import replace

import pytest
import torch

from scratchlm.__main__ import main
from scratchlm.gpt import GPT, GPTConfig
from scratchlm.optim import Muon, newton_schulz
from scratchlm.speedrun import (
    RECIPE_SWITCHES,
    SpeedrunConfig,
    SpeedrunGPT,
    muon_param_groups,
    speedrun_config,
)
from scratchlm.train import (
    MODEL_CONFIG,
    TRAIN_STATE,
    TrainConfig,
    Trainer,
    load_model,
    lr_at,
    make_optimizer,
    next_token_loss,
)

DIMS = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16)


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**DIMS, bias=False))


def hidden(model):
    return [p for name, p in model.named_parameters() if p.dim() == 2 and ".h." in name]


def test_muon_equals_torch_muon():
    ours, theirs = tiny_gpt(), tiny_gpt()
    settings = dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)
    pairs = [(ours, Muon(hidden(ours), **settings)), (theirs, torch.optim.Muon(hidden(theirs), **settings))]
    data = torch.Generator().manual_seed(0)
    for _ in range(8):
        x, y = torch.randint(0, 65, (4, 16), generator=data), torch.randint(0, 65, (4, 16), generator=data)
        for model, optimizer in pairs:
            optimizer.zero_grad()
            next_token_loss(model(x), y).backward()
            optimizer.step()
    assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(ours.parameters(), tiny_gpt().parameters(), strict=True)) > 1e-2


def test_muon_refuses_parameters_that_are_not_matrices():
    with pytest.raises(ValueError, match=r"2-D weight matrices only.*shape \(3,\).*adamw=True"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.02)
    with pytest.raises(ValueError, match=r"param group 1 has shape \(2, 2, 2\)"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(2, 2))]}, {"params": [torch.nn.Parameter(torch.zeros(2, 2, 2))]}],
             lr=0.02)
    Muon([{"params": [torch.nn.Parameter(torch.zeros(3))], "adamw": True}], lr=0.02)  # AdamW takes them


@pytest.mark.parametrize("lr", [0.0, -0.02])
def test_muon_refuses_a_learning_rate_that_is_not_positive(lr):
    with pytest.raises(ValueError, match="Muon: lr must be a positive number"):
        Muon(hidden(tiny_gpt()), lr=lr)
    with pytest.raises(ValueError, match="Muon param group 0: lr must be a positive number"):
        Muon([{"params": hidden(tiny_gpt()), "lr": lr}], lr=0.02)
    with pytest.raises(TypeError):
        Muon(hidden(tiny_gpt()))  # no default learning rate


@pytest.mark.parametrize("bad, match", [(dict(momentum=1.0), "momentum must be in"), (dict(ns_steps=0), "ns_steps"),
                                        (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
                                        (dict(adamw_betas=(0.9, 1.0)), "betas")])
def test_muon_refuses_other_bad_hyperparameters(bad, match):
    with pytest.raises(ValueError, match=match):
        Muon([{"params": hidden(tiny_gpt())}, {"params": [torch.nn.Parameter(torch.zeros(3))], "adamw": True}],
             lr=0.02, **bad)


def test_newton_schulz_pushes_singular_values_towards_one():
    G = torch.randn(48, 16, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(newton_schulz(G).float())
    assert s.min() > 0.6 and s.max() < 1.3  # a Gaussian matrix: no tiny singular values
    X = G.double() / G.double().norm()  # the plain formula, wide side
    X = X.T
    for _ in range(5):
        A = X @ X.T
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    assert (newton_schulz(G.double(), dtype=torch.float64) - X.T).abs().max() < 1e-10
    with pytest.raises(ValueError, match="orthogonalises a matrix"):
        newton_schulz(torch.zeros(2, 3, 4))


def test_muon_param_groups_split_hidden_matrices_from_the_rest():
    model = SpeedrunGPT(SpeedrunConfig(**DIMS, **RECIPE_SWITCHES))
    muon, rest = muon_param_groups(model, muon_lr=0.02, lr=0.004, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)].split(".")[-2] for p in muon["params"]) == ["c_attn", "c_attn", "c_fc", "c_fc",
                                                                             "c_proj", "c_proj", "c_proj", "c_proj"]
    assert {"transformer.wte.weight", "lm_head.weight", "skip_weights"} <= {names[id(p)] for p in rest["params"]}
    assert len(muon["params"]) + len(rest["params"]) == len(list(model.parameters()))
    assert muon["lr_scale"] == pytest.approx(5.0) and rest["adamw"] and rest["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="must be positive"):
        muon_param_groups(model, muon_lr=0.0, lr=0.004, weight_decay=0.1)


def test_every_switch_off_is_chapter_03s_gpt():
    gpt = tiny_gpt().eval()
    model = SpeedrunGPT(SpeedrunConfig(**DIMS)).eval()
    model.load_state_dict(gpt.state_dict())
    x = torch.randint(0, 65, (2, 16))
    assert torch.equal(model(x), gpt(x))


def test_every_switch_on_caches_like_it_recomputes():
    from scratchlm.generation import generate

    torch.manual_seed(0)
    model = SpeedrunGPT(SpeedrunConfig(**DIMS, **{**RECIPE_SWITCHES, "zero_init": False})).eval()
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 10), generate(model, prompt, 10, use_cache=False))
    logits = model(torch.randint(0, 65, (1, 16)))
    assert logits.abs().max() <= 30.0  # soft-capped


@pytest.mark.parametrize("bad, match", [(dict(softcap=-1.0), "softcap must be >= 0"),
                                        (dict(n_embd=15), "divisible by n_head"), (dict(n_layer=0), "n_layer")])
def test_speedrun_config_refuses_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SpeedrunConfig(**{**DIMS, **bad})


def test_wsd_schedule_warms_up_stays_flat_then_decays_linearly():
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", cooldown_frac=0.4)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == lr_at(60, cfg) == 1.0
    assert lr_at(80, cfg) == pytest.approx(0.5) and lr_at(100, cfg) == 0.0
    with pytest.raises(ValueError, match="schedule='linear' is not known"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="no lr_decay_steps"):
        TrainConfig(schedule="wsd", lr_decay_steps=500)
    with pytest.raises(ValueError, match="0 < cooldown_frac <= 1"):
        TrainConfig(schedule="wsd", cooldown_frac=0.0)
    with pytest.raises(ValueError, match="muon_lr must be a positive number"):
        TrainConfig(muon_lr=0.0)


def test_make_optimizer_names_the_known_optimizers():
    with pytest.raises(ValueError, match="optimizer='lion' is not known; use one of 'adamw', 'muon'"):
        make_optimizer(tiny_gpt(), TrainConfig(optimizer="lion"), verbose=False)
    assert isinstance(make_optimizer(tiny_gpt(), TrainConfig(optimizer="muon"), verbose=False), Muon)


def test_muon_trainer_resumes_exactly(tmp_path):
    """The Muon + AdamW state goes into chapter 03's checkpoints: stop at 6, resume to 12 = 12 in one go."""
    from scratchlm.train import shakespeare_char_data

    tok, train_data, val_data = shakespeare_char_data()
    model_config, cfg = speedrun_config("ci", tok.vocab_size)
    cfg = replace(cfg, max_steps=12, warmup_steps=2, eval_interval=6, device="cpu")

    def fresh():
        torch.manual_seed(0)
        return Trainer(SpeedrunGPT(SpeedrunConfig(**model_config)), cfg, train_data, val_data, verbose=False,
                       model_name="speedrun", model_config=model_config, tokenizer=tok)

    whole = fresh()
    whole.fit(progress=False)
    half = fresh()
    half.fit(until=6, progress=False)
    half.save(tmp_path / "ckpt")
    resumed = Trainer.from_checkpoint(tmp_path / "ckpt", train_data, val_data, verbose=False)
    assert isinstance(resumed.optimizer, Muon)
    resumed.fit(progress=False)
    assert resumed.history["train_loss"] == whole.history["train_loss"]
    assert whole.history["lr"][5] == pytest.approx(cfg.lr)  # the flat part of wsd


def test_speedrun_trains_and_samples_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "speedrun"
    main(["train", "--model", "speedrun", "--profile", "ci", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert "Muon (lr 0.02) on 8 hidden matrices" in printed and "val loss on the whole split" in printed
    spec = json.loads((out / MODEL_CONFIG).read_text())
    assert spec["model"] == "speedrun" and spec["config"]["rotary"] is True
    state = json.loads((out / TRAIN_STATE).read_text())
    assert state["train_config"]["optimizer"] == "muon" and state["train_config"]["schedule"] == "wsd"
    evals = state["history"]["eval"]
    assert evals[-1]["step"] == 40 and evals[-1]["val"] < evals[0]["val"] - 0.7
    assert isinstance(load_model(out), SpeedrunGPT)
    main(["sample", str(out), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "3"])
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 20 + 1
