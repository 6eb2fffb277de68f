"""scratchlm.train: schedule, optimizer groups, accumulation, checkpoints, exact resume, profiles, errors."""

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

from scratchlm.data import get_batch
from scratchlm.gpt import GPT, GPTConfig
from scratchlm.train import (
    OPTIMIZER,
    TRAIN_STATE,
    WEIGHTS,
    TrainConfig,
    Trainer,
    accumulate_gradients,
    build_model,
    configure_optimizer,
    enable_gradient_checkpointing,
    estimate_loss,
    load_model,
    load_tokenizer,
    load_weights,
    lr_at,
    next_token_loss,
    save_weights,
    shakespeare_char_config,
    shakespeare_char_data,
    split_loss,
)

TINY_GPT = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.1, bias=True)


@pytest.fixture(scope="module")
def shakespeare():
    return shakespeare_char_data()


def tiny_cfg(**changes) -> TrainConfig:
    base = TrainConfig(batch_size=4, block_size=16, grad_accum_steps=2, max_steps=8, lr=3e-3, min_lr=3e-4,
                       warmup_steps=2, eval_interval=3, eval_iters=2, device="cpu")
    return replace(base, **changes)


class TinyLM(nn.Module):
    """A stand-in that is not a GPT: embedding, LayerNorm with bias, dropout, an untied biased head."""

    def __init__(self, vocab_size=65, width=16):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, width)
        self.norm = nn.LayerNorm(width)
        self.mix = nn.Linear(width, width)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, input_ids):
        h = self.drop(torch.relu(self.mix(self.norm(self.emb(input_ids)))))  # (B, T, C)
        return self.head(h)  # (B, T, V)


def gpt_trainer(shakespeare, cfg=None, seed=0, **model_changes):
    tok, train_data, val_data = shakespeare
    model_config = {**TINY_GPT, **model_changes}
    torch.manual_seed(seed)
    return Trainer(GPT(GPTConfig(**model_config)), cfg or tiny_cfg(), train_data, val_data, model_name="gpt",
                   model_config=model_config, tokenizer=tok, verbose=False)


# ---------------------------------------------------------------- learning-rate schedule


def torch_schedule(cfg: TrainConfig, steps: int) -> list[float]:
    """The same schedule from PyTorch's own schedulers: LinearLR warmup, then CosineAnnealingLR."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    decay = cfg.lr_decay_steps or cfg.max_steps
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=decay - cfg.warmup_steps, eta_min=cfg.min_lr)
    if cfg.warmup_steps:
        warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / cfg.warmup_steps, end_factor=1.0,
                                                   total_iters=cfg.warmup_steps - 1)
        cosine = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[cfg.warmup_steps])
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    return lrs


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("changes", [{}, {"warmup_steps": 0}, {"warmup_steps": 1}, {"lr_decay_steps": 240},
                                     {"lr": 6e-4, "min_lr": 0.0, "warmup_steps": 37, "max_steps": 500}])
def test_lr_schedule_matches_pytorch_schedulers(changes):
    cfg = replace(TrainConfig(max_steps=400, warmup_steps=30), **changes)
    decay = cfg.lr_decay_steps or cfg.max_steps
    theirs = torch_schedule(cfg, decay + 1)
    ours = [lr_at(s, cfg) for s in range(decay + 1)]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-12
    # after the decay ends it stays at min_lr (where CosineAnnealingLR would climb back up)
    assert all(lr_at(s, cfg) == cfg.min_lr for s in range(decay + 1, cfg.max_steps + 50))


def test_lr_schedule_closed_form_points():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=2000)
    assert lr_at(0, cfg) == pytest.approx(1e-5)
    assert lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(1050, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # half way through the cosine
    assert lr_at(2000, cfg) == pytest.approx(1e-4)


# ---------------------------------------------------------------- optimizer groups


def test_weight_decay_groups_on_gpt(capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT))
    opt = configure_optimizer(model, weight_decay=0.1, lr=1e-3)
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({name_of[id(p)] for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    # embeddings (the token table is tied to lm_head) and every 1-D tensor: no decay
    assert no_decay == {"transformer.wte.weight", "transformer.wpe.weight"} | {
        n for n, p in model.named_parameters() if p.dim() == 1}
    assert any(n.endswith(".bias") for n in no_decay) and any(".ln_" in n for n in no_decay)
    assert decay == {n for n, p in model.named_parameters() if p.dim() == 2} - no_decay
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in decay)
    assert len(decay) + len(no_decay) == len(list(model.parameters()))  # the tied tensor once
    printed = capsys.readouterr().out
    n_decay = sum(p.numel() for p in opt.param_groups[0]["params"])
    assert f"on {len(decay)} tensors ({n_decay:,} parameters)" in printed


def test_weight_decay_groups_by_module_type_not_name():
    model = TinyLM()
    opt = configure_optimizer(model, weight_decay=0.1, lr=1e-3, verbose=False)
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert decay == {id(model.mix.weight), id(model.head.weight)}
    assert no_decay == {id(p) for p in (model.emb.weight, model.norm.weight, model.norm.bias, model.mix.bias,
                                         model.head.bias)}


# ---------------------------------------------------------------- accumulation, clipping, evaluation


def test_accumulated_gradient_equals_big_batch(shakespeare):
    _, train_data, _ = shakespeare
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY_GPT, "dropout": 0.0}))
    x, y = get_batch(train_data, 16, 12, torch.Generator().manual_seed(0))
    big = next_token_loss(model(x), y)
    big.backward()
    reference = [p.grad.clone() for p in model.parameters()]
    for micro_batches in (2, 3, 4):
        model.zero_grad()
        loss = accumulate_gradients(model, x, y, micro_batches)
        assert loss.item() == pytest.approx(big.item(), abs=1e-6)
        for p, g in zip(model.parameters(), reference, strict=True):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="does not split into 5"):
        accumulate_gradients(model, x, y, 5)


def test_trainer_step_with_accumulation_equals_big_batch_step(shakespeare):
    """The trainer draws a step's sequences at once, so 4 x 4 and 1 x 16 see the same data."""
    weights, losses = [], []
    for accum, batch in ((4, 4), (1, 16)):
        trainer = gpt_trainer(shakespeare, tiny_cfg(grad_accum_steps=accum, batch_size=batch), dropout=0.0)
        losses.append(trainer.train_step())
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    torch.testing.assert_close(weights[0], weights[1], atol=1e-6, rtol=0)


def test_recorded_grad_norm_is_the_norm_before_clipping(shakespeare):
    _, train_data, _ = shakespeare
    trainer = gpt_trainer(shakespeare, tiny_cfg(grad_clip=1e-3), dropout=0.0)
    reference = GPT(GPTConfig(**{**TINY_GPT, "dropout": 0.0}))
    reference.load_state_dict(trainer.model.state_dict())
    x, y = get_batch(train_data, 16, 8, torch.Generator().manual_seed(trainer.cfg.seed))  # the trainer's draw
    next_token_loss(reference(x), y).backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()
    trainer.train_step()
    assert trainer.history["grad_norm"][0] == pytest.approx(norm, rel=1e-4)
    assert norm > 1e-3  # so it was clipped


def test_estimate_loss_is_repeatable_and_keeps_train_mode(shakespeare):
    _, train_data, val_data = shakespeare
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT)).train()
    splits = {"train": train_data, "val": val_data}
    a = estimate_loss(model, splits, 16, 4, iters=3, seed=5)
    b = estimate_loss(model, splits, 16, 4, iters=3, seed=5)
    assert a == b and model.training
    assert abs(a["val"] - math.log(65)) < 0.3  # an untrained model is close to a uniform guess


def test_split_loss_predicts_every_token_once(shakespeare):
    _, _, val_data = shakespeare
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT)).train()
    piece = val_data[: 16 * 10 + 5]  # 10 whole windows and a partial one, which is left out
    with torch.no_grad():
        model.eval()
        logp = torch.cat([torch.log_softmax(model(piece[i : i + 16][None])[0], dim=-1) for i in range(0, 160, 16)])
    by_hand = -logp[torch.arange(160), piece[1:161]].mean().item()
    model.train()
    assert split_loss(model, piece, block_size=16, batch_size=3) == pytest.approx(by_hand, abs=1e-5)
    assert model.training


# ---------------------------------------------------------------- checkpoints


def test_save_load_gives_identical_logits_and_keeps_tying(shakespeare, tmp_path):
    trainer = gpt_trainer(shakespeare)
    trainer.fit(until=3, progress=False)
    trainer.save(tmp_path)
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        stored = set(f.keys())
        assert json.loads(f.metadata()["tied"]) == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in stored and "transformer.wte.weight" in stored
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight and not loaded.training
    x = torch.randint(0, 65, (3, 16))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(x), loaded(x))
    assert load_tokenizer(tmp_path).chars == shakespeare[0].chars


def test_untied_weights_are_all_stored(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    save_weights(model, tmp_path / "w.safetensors")
    other = TinyLM()
    load_weights(other, tmp_path / "w.safetensors")
    pairs = zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_resume_gives_the_same_run_bit_for_bit(shakespeare, tmp_path, dropout):
    _, train_data, val_data = shakespeare
    straight = gpt_trainer(shakespeare, dropout=dropout).fit(progress=False)

    first = gpt_trainer(shakespeare, dropout=dropout)
    first.fit(until=5, progress=False)
    first.save(tmp_path)
    torch.manual_seed(12345)  # a fresh process would be somewhere else
    resumed = Trainer.from_checkpoint(tmp_path, train_data, val_data, verbose=False)
    assert resumed.step == 5
    assert resumed.fit(progress=False) == straight
    assert [e["step"] for e in straight["eval"]] == [0, 3, 6, 8]


def test_resume_of_a_custom_model_and_periodic_checkpoints(shakespeare, tmp_path):
    tok, train_data, val_data = shakespeare
    cfg = tiny_cfg(out_dir=str(tmp_path), checkpoint_interval=4)

    def fresh():
        torch.manual_seed(0)
        return TinyLM()

    straight = Trainer(fresh(), replace(cfg, out_dir=None), train_data, val_data, verbose=False).fit(progress=False)
    first = Trainer(fresh(), cfg, train_data, val_data, verbose=False)
    first.fit(until=6, progress=False)  # saved at step 4 by checkpoint_interval, and at 6 at the end of fit
    assert json.loads((tmp_path / TRAIN_STATE).read_text())["step"] == 6
    with pytest.raises(ValueError, match="custom module"):
        Trainer.from_checkpoint(tmp_path, train_data, val_data)
    resumed = Trainer.from_checkpoint(tmp_path, train_data, val_data, model=TinyLM(), verbose=False)
    assert resumed.fit(progress=False) == straight


def test_ci_profile_loss_falls(shakespeare):
    tok, train_data, val_data = shakespeare
    model_config, cfg = shakespeare_char_config("ci", tok.vocab_size)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(build_model("gpt", model_config), cfg, train_data, val_data, verbose=False)
    history = trainer.fit(progress=False)
    first, last = history["eval"][0], history["eval"][-1]
    assert last["step"] == cfg.max_steps == len(history["train_loss"])
    assert first["val"] > 4.0 and last["val"] < first["val"] - 0.7


def test_profiles_follow_nanogpt():
    (gpu_model, gpu), (cpu_model, cpu) = shakespeare_char_config("gpu"), shakespeare_char_config("cpu")
    assert (gpu_model["n_layer"], gpu_model["n_head"], gpu_model["n_embd"], gpu_model["block_size"]) == (6, 6, 384, 256)
    assert (gpu.batch_size, gpu.max_steps, gpu.lr, gpu.min_lr, gpu.beta2, gpu_model["dropout"]) == (
        64, 5000, 1e-3, 1e-4, 0.99, 0.2)
    assert (cpu_model["n_layer"], cpu_model["n_head"], cpu_model["n_embd"], cpu_model["block_size"]) == (4, 4, 128, 64)
    assert (cpu.batch_size, cpu.max_steps, cpu.eval_iters, cpu_model["dropout"]) == (12, 2000, 20, 0.0)
    for model_config, cfg in (shakespeare_char_config(p) for p in ("ci", "cpu", "gpu")):
        assert cfg.block_size == model_config["block_size"]
        GPTConfig(**model_config)


# ---------------------------------------------------------------- bad input


def test_bad_checkpoints_are_refused_with_what_is_wrong(shakespeare, tmp_path):
    _, train_data, val_data = shakespeare
    with pytest.raises(FileNotFoundError, match="does not exist; train one first"):
        load_model(tmp_path / "nowhere")
    trainer = gpt_trainer(shakespeare)
    trainer.fit(until=2, progress=False)
    trainer.save(tmp_path / "ok")

    (tmp_path / "ok" / OPTIMIZER).rename(tmp_path / "optimizer.bak")
    with pytest.raises(FileNotFoundError, match="is missing optimizer.pt"):
        Trainer.from_checkpoint(tmp_path / "ok", train_data, val_data)
    (tmp_path / "optimizer.bak").rename(tmp_path / "ok" / OPTIMIZER)

    wider = GPT(GPTConfig(**{**TINY_GPT, "n_embd": 32}))
    with pytest.raises(ValueError, match=r"shape mismatch \(29\): lm_head.weight: file \(65, 16\), model \(65, 32\), .* and 19 more"):
        load_weights(wider, tmp_path / "ok" / WEIGHTS)
    deeper = GPT(GPTConfig(**{**TINY_GPT, "n_layer": 3}))
    with pytest.raises(ValueError, match=r"missing \(\d+\): transformer.h.2"):
        Trainer.from_checkpoint(tmp_path / "ok", train_data, val_data, model=deeper)
    with pytest.raises(ValueError, match="unexpected"):
        load_weights(GPT(GPTConfig(**{**TINY_GPT, "n_layer": 1})), tmp_path / "ok" / WEIGHTS)

    state = json.loads((tmp_path / "ok" / TRAIN_STATE).read_text())
    (tmp_path / "ok" / TRAIN_STATE).write_text(json.dumps({**state, "step": 7}))
    with pytest.raises(ValueError, match="inconsistent .*interrupted while saving"):
        Trainer.from_checkpoint(tmp_path / "ok", train_data, val_data)
    with pytest.raises(TypeError, match="not TrainConfig fields: max_step"):
        Trainer.from_checkpoint(tmp_path / "ok", train_data, val_data, max_step=10)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="unknown model 'mamba'; scratchlm can build: deepseek, gpt, llama"):
        build_model("mamba", {})
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_lr <= lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps=200 must be"):
        TrainConfig(warmup_steps=200, max_steps=100)
    with pytest.raises(ValueError, match="dtype='float8' is not supported; use 'auto', 'float32', 'bfloat16', 'float16'"):
        TrainConfig(dtype="float8")
    with pytest.raises(ValueError, match="need more than block_size=64"):
        Trainer(TinyLM(), TrainConfig(), torch.zeros(1000, dtype=torch.long), torch.zeros(10, dtype=torch.long))


# ---------------------------------------------------------------- float16 with a GradScaler, torch.compile timing


def simulated_gpu(monkeypatch, major: int, minor: int) -> None:
    """PyTorch's own torch.cuda.is_bf16_supported, on a simulated GPU of compute capability major.minor whose
    bfloat16 test tensor can be created (emulated on 7.x, as on a real T4 or V100)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=minor))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)


@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)],
                         ids=["V100", "T4", "A100", "H100"])
def test_auto_precision_asks_for_native_bfloat16(monkeypatch, capability, expected):
    import scratchlm.train as train

    simulated_gpu(monkeypatch, *capability)
    assert torch.cuda.is_bf16_supported()  # the default question says yes even on 7.x (emulation)
    assert torch.cuda.is_bf16_supported(including_emulation=False) == (capability >= (8, 0))
    assert train.autocast_dtype("auto", torch.device("cuda")) == expected


def test_auto_precision_picks_float16_on_gpus_without_bfloat16(monkeypatch):
    import scratchlm.train as train

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # a T4 or a V100
    assert train.autocast_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert train.autocast_dtype("auto", cuda) == torch.bfloat16
    assert train.autocast_dtype("auto", torch.device("cpu")) is None
    assert "GradScaler" in train.precision_note(torch.float16) and train.precision_note(None).startswith("float32")


def test_float16_training_scales_the_loss_and_resumes_exactly(shakespeare, tmp_path, capsys):
    """float16 autocast on the CPU runs the same code path as on a T4: loss scaling, unscaled clipping, resume."""
    _, train_data, val_data = shakespeare
    cfg = tiny_cfg(dtype="float16")
    straight = gpt_trainer(shakespeare, cfg)
    assert isinstance(straight.scaler, torch.amp.GradScaler)
    history = straight.fit(progress=False)
    assert all(math.isfinite(loss) for loss in history["train_loss"])
    assert history["eval"][-1]["val"] < history["eval"][0]["val"]
    assert all(math.isfinite(n) for n in history["grad_norm"])  # norms of the unscaled gradients

    first = gpt_trainer(shakespeare, cfg)
    first.fit(until=5, progress=False)
    first.save(tmp_path)
    resumed = Trainer.from_checkpoint(tmp_path, train_data, val_data, verbose=False)
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    assert resumed.fit(progress=False) == history

    tok, _, _ = shakespeare
    torch.manual_seed(0)
    Trainer(GPT(GPTConfig(**TINY_GPT)), cfg, train_data, val_data, tokenizer=tok)  # verbose: says its precision
    assert "precision: float16 autocast with a GradScaler" in capsys.readouterr().out


def test_compiled_runs_report_their_first_step(shakespeare, monkeypatch, capsys):
    """The first evaluation and step of a compiled run are timed and printed (compilation is slow to start)."""
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the timing, not the compiler, is tested here
    _, train_data, val_data = shakespeare
    torch.manual_seed(0)
    trainer = Trainer(GPT(GPTConfig(**TINY_GPT)), tiny_cfg(compile=True, max_steps=3), train_data, val_data)
    trainer.fit(progress=False)
    out = capsys.readouterr().out
    assert "torch.compile on" in out and "torch.compile: the first evaluation and step took" in out
    assert 0 < trainer.first_step_seconds < trainer.elapsed + 1e-9


# ---------------------------------------------------------------- gradient checkpointing
def one_step_gradients(model, x, y, seed=0):
    """Every parameter's gradient after one forward and backward pass from the random state `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks each time
    next_token_loss(model(x), y).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def tiny_model(name):
    from scratchlm.char_llama import char_llama_config
    from scratchlm.deepseek import char_deepseek_config

    gpt = dict(TINY_GPT, n_embd=32)
    config = {"gpt": gpt, "llama": char_llama_config(gpt),
              "deepseek": {**char_deepseek_config(gpt), "bias_update_speed": 0.0}}[name]
    torch.manual_seed(0)
    return build_model(name, config)


@pytest.mark.parametrize("name, blocks", [("gpt", 2), ("llama", 2), ("deepseek", 2)])
def test_gradient_checkpointing_gives_the_same_gradients(name, blocks):
    """Each block recomputed in backward: bit-for-bit the same gradients (dropout 0.1 in the GPT: the same masks)."""
    model = tiny_model(name)
    x, y = torch.randint(0, 65, (3, 16)), torch.randint(0, 65, (3, 16))
    expected = one_step_gradients(model, x, y)
    checkpointed = tiny_model(name)  # the same weights (the same seed)
    assert enable_gradient_checkpointing(checkpointed) == blocks
    assert checkpointed.state_dict().keys() == model.state_dict().keys()  # checkpoints load as before
    got = one_step_gradients(checkpointed, x, y)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_gradient_checkpointing_recomputes_only_in_training_and_can_be_undone():
    model = tiny_model("gpt")
    x, y = torch.randint(0, 65, (2, 16)), torch.randint(0, 65, (2, 16))
    runs = []
    for block in model.transformer.h:  # a block's first layer: a recomputation starts there
        block.ln_1.register_forward_pre_hook(lambda *_: runs.append(1))

    def block_runs(train: bool, grad: bool) -> int:
        runs.clear()
        model.train(train)
        with torch.set_grad_enabled(grad):
            loss = next_token_loss(model(x), y)
        if grad:
            loss.backward()
        return len(runs)

    enable_gradient_checkpointing(model)
    assert block_runs(train=True, grad=True) == 4  # each block again in backward
    assert block_runs(train=True, grad=False) == 2 and block_runs(train=False, grad=True) == 2
    enable_gradient_checkpointing(model, enabled=False)
    assert block_runs(train=True, grad=True) == 2


def test_gradient_checkpointing_finds_bert_blocks_and_keeps_its_gradients():
    from scratchlm.bert import Bert, BertConfig

    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.1))
    x, y = torch.randint(0, 50, (2, 10)), torch.randint(0, 50, (2, 10))
    expected = one_step_gradients(model, x, y)
    assert enable_gradient_checkpointing(model) == 2
    got = one_step_gradients(model, x, y)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_gradient_checkpointing_refuses_models_it_cannot_recompute():
    from scratchlm.char_llama import char_llama_config  # noqa: F401  (registers the models build_model needs)
    from scratchlm.deepseek import char_deepseek_config
    from scratchlm.seq2seq import T5, T5Config

    with pytest.raises(ValueError, match="found no transformer blocks in TinyLM.*nn.ModuleList named h, layers or"):
        enable_gradient_checkpointing(TinyLM())
    deepseek = build_model("deepseek", char_deepseek_config(dict(TINY_GPT, n_embd=32)))  # bias_update_speed 1e-3
    with pytest.raises(ValueError, match="updates its routers' balancing bias.*bias_update_speed=0"):
        enable_gradient_checkpointing(deepseek)
    t5 = T5(T5Config(vocab_size=20, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="T5's blocks \\(T5Block\\) have no forward of their own"):
        enable_gradient_checkpointing(t5)
    with pytest.raises(ValueError, match="found no transformer blocks"):  # and Trainer says the same, before training
        Trainer(TinyLM(), tiny_cfg(gradient_checkpointing=True), torch.arange(100) % 65, torch.arange(100) % 65,
                verbose=False)


def test_trainer_with_gradient_checkpointing_trains_the_same_run_and_resumes_with_it(shakespeare, tmp_path, capsys):
    _, train_data, val_data = shakespeare

    def run(**changes):
        torch.manual_seed(0)
        trainer = Trainer(GPT(GPTConfig(**TINY_GPT)), tiny_cfg(**changes), train_data, val_data, model_name="gpt",
                          model_config=TINY_GPT)
        return trainer, trainer.fit(progress=False)

    _, plain = run()
    trainer, checkpointed = run(gradient_checkpointing=True)
    assert "gradient checkpointing on" in capsys.readouterr().out
    assert checkpointed == plain  # every loss, gradient norm and evaluation (dropout 0.1: the same masks)
    trainer.save(tmp_path)
    resumed = Trainer.from_checkpoint(tmp_path, train_data, val_data, verbose=False)
    assert resumed.cfg.gradient_checkpointing
    assert all("forward" in vars(block) for block in resumed.model.transformer.h)  # its blocks recompute again


def test_why_deepseek_with_the_bias_update_is_refused():
    """Forced anyway, the recomputed blocks route with the updated bias: PyTorch's checkpoint finds saved tensors of
    other shapes (the experts got other tokens) and stops with a CheckpointError."""
    import types

    from torch.utils.checkpoint import CheckpointError

    from scratchlm.char_llama import char_llama_config  # noqa: F401  (registers the models build_model needs)
    from scratchlm.deepseek import char_deepseek_config
    from scratchlm.train import _checkpointed_forward

    torch.manual_seed(0)
    config = {**char_deepseek_config(dict(TINY_GPT, n_embd=32, block_size=32)), "bias_update_speed": 0.1}  # big steps
    model = build_model("deepseek", config)
    for block in model.layers:  # what enable_gradient_checkpointing refuses to do
        block.forward = types.MethodType(_checkpointed_forward, block)
    x, y = torch.randint(0, 65, (8, 32)), torch.randint(0, 65, (8, 32))
    with pytest.raises(CheckpointError, match="different metadata"):
        next_token_loss(model(x), y).backward()
