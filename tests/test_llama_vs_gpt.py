"""The comparison of notebooks/04_llama/05_llama_vs_gpt.ipynb stays possible: at every profile's size a
Llama with the GPT's width, depth, heads and context has the GPT's parameter count within 2% once its
SwiGLU width is solved for, and both models train under one TrainConfig on the same batches.
The notebook exports the recipe as scratchlm.char_llama, and registers the Llama under "llama" for
build_model, load_model and `python -m scratchlm train --model llama` (tests/test_cli.py).
The ablation ladder's GPTVariant is the GPT with no changes (weights and logits) and computes like
transformers' Llama with all four; each change replaces only its part. BestValTrainer gives back the
weights of its best evaluation. (The notebook itself runs the training at the ci profile under nbval.)
"""

import json
import math
from dataclasses import replace

import pytest
import torch

from scratchlm.char_llama import (
    BestValTrainer,
    Changes,
    GPTVariant,
    char_llama_config,
    llama_like,
    matching_intermediate_size,
)
from scratchlm.generation import generate
from scratchlm.gpt import GPT, GPTConfig
from scratchlm.layers import GatedMLP, RMSNorm
from scratchlm.llama import Llama, LlamaConfig
from scratchlm.train import Trainer, build_model, estimate_loss, load_model, shakespeare_char_config

VOCAB = 65


def matching_llama(gpt: GPTConfig) -> LlamaConfig:
    return llama_like(gpt, matching_intermediate_size(gpt))


@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_equal_parameter_counts_at_every_profile(profile):
    kwargs, _ = shakespeare_char_config(profile, VOCAB)
    gpt_config = GPTConfig(**{**kwargs, "dropout": 0.0})
    llama_config = matching_llama(gpt_config)
    n_gpt, n_llama = GPT(gpt_config).num_parameters(), Llama(llama_config).num_parameters()
    assert abs(n_llama - n_gpt) / n_gpt < 0.02
    # the solved width is two thirds of 4C, as in Llama, plus what the GPT's position table holds
    two_thirds = 8 * gpt_config.n_embd / 3
    assert two_thirds - 1 < llama_config.intermediate_size < 1.2 * two_thirds
    # counting is linear in the width, as the solution assumes
    wider = Llama(replace(llama_config, intermediate_size=llama_config.intermediate_size + 1)).num_parameters()
    assert wider - n_llama == 3 * gpt_config.n_embd * gpt_config.n_layer


def test_both_models_train_on_the_same_batches():
    kwargs, cfg = shakespeare_char_config("ci", VOCAB)
    cfg = replace(cfg, max_steps=12, warmup_steps=2, eval_interval=100, eval_iters=2)
    gpt_config = GPTConfig(**{**kwargs, "dropout": 0.0})
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 8, (4000,), generator=g)  # 8 of the 65 ids used: a drop from ln 65 to ln 8 to learn
    train_data, val_data = data[:3600], data[3600:]
    streams = {}
    for name, build in (("gpt", lambda: GPT(gpt_config)), ("llama", lambda: Llama(matching_llama(gpt_config)))):
        torch.manual_seed(cfg.seed)
        trainer = Trainer(build(), cfg, train_data, val_data, verbose=False)
        streams[name] = trainer.data_generator.get_state()  # where the training batches come from
        history = trainer.fit(progress=False)
        first, last = history["eval"][0], history["eval"][-1]
        assert last["step"] == cfg.max_steps and last["val"] < first["val"] - 0.3, (name, first, last)
    assert torch.equal(streams["gpt"], streams["llama"])


@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_char_llama_config_is_the_matching_llama_as_a_json_dict(profile):
    kwargs, _ = shakespeare_char_config(profile, VOCAB)
    rng = torch.random.get_rng_state()
    config = char_llama_config(kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng)  # sizing draws no random numbers: seeds stay put
    assert json.loads(json.dumps(config)) == config  # what a checkpoint's model_config.json stores
    gpt_config = GPTConfig(**{**kwargs, "dropout": 0.0})
    assert LlamaConfig(**config) == matching_llama(gpt_config)
    assert config["hidden_size"] == kwargs["n_embd"] and config["max_position_embeddings"] == kwargs["block_size"]
    if kwargs["dropout"]:  # the gpu profile: the GPT's dropout does not change its size, the Llama has none
        assert char_llama_config({**kwargs, "dropout": 0.0}) == config


def test_llama_is_built_by_name_and_its_checkpoint_loads(tmp_path):
    kwargs, cfg = shakespeare_char_config("ci", VOCAB)
    config = char_llama_config(kwargs)
    torch.manual_seed(cfg.seed)
    by_name = build_model("llama", config)
    torch.manual_seed(cfg.seed)
    direct = Llama(LlamaConfig(**config))
    assert isinstance(by_name, Llama)
    for (name, a), (_, b) in zip(by_name.state_dict().items(), direct.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    data = torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(by_name, replace(cfg, max_steps=3, warmup_steps=1, eval_interval=100, eval_iters=1),
                      data[:1800], data[1800:], model_name="llama", model_config=config, verbose=False)
    trainer.fit(progress=False)
    trainer.save(tmp_path)
    loaded = load_model(tmp_path)
    x = torch.randint(0, VOCAB, (2, 16))
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(x), loaded(x))


# --- the ablation ladder: GPTVariant, and BestValTrainer ---------------------------------------------------

ALL_CHANGES = Changes(rope=True, swiglu=True, rmsnorm=True, llama_init=True)


def ci_gpt_config() -> GPTConfig:
    kwargs, _ = shakespeare_char_config("ci", VOCAB)
    return GPTConfig(**{**kwargs, "dropout": 0.0})


def test_variant_without_changes_is_the_gpt_weights_and_logits():
    config = ci_gpt_config()
    torch.manual_seed(3)
    variant = GPTVariant(config)
    torch.manual_seed(3)
    gpt = GPT(config)
    assert variant.state_dict().keys() == gpt.state_dict().keys()
    for name, tensor in gpt.state_dict().items():
        assert torch.equal(variant.state_dict()[name], tensor), name
    x = torch.randint(0, VOCAB, (3, config.block_size))
    with torch.no_grad():
        assert torch.equal(variant(x), gpt(x))


def test_each_change_replaces_only_its_part():
    config = ci_gpt_config()
    torch.manual_seed(5)
    gpt = GPT(config).state_dict()
    scale = math.sqrt(2 * config.n_layer)
    for changes in (Changes(rope=True), Changes(swiglu=True), Changes(rmsnorm=True), Changes(llama_init=True), ALL_CHANGES):
        torch.manual_seed(5)
        variant = GPTVariant(config, changes)
        state = variant.state_dict()
        assert ("transformer.wpe.weight" in state) != changes.rope, changes
        assert torch.equal(state["transformer.wte.weight"], gpt["transformer.wte.weight"])  # drawn as the GPT's
        for i, block in enumerate(variant.transformer.h):
            assert isinstance(block.mlp, GatedMLP) == changes.swiglu
            if changes.swiglu:
                assert block.mlp.up_proj.out_features == matching_intermediate_size(config)
            assert isinstance(block.ln_1, RMSNorm) == isinstance(block.ln_2, RMSNorm) == changes.rmsnorm
            q_k_v = f"transformer.h.{i}.attn.c_attn" + (".c_attn" if changes.rope else "") + ".weight"
            assert torch.equal(state[q_k_v], gpt[f"transformer.h.{i}.attn.c_attn.weight"])
            # the residual projection: the GPT's draw, at std 0.02 / sqrt(2L), or the same draw times sqrt(2L)
            o_proj = state[f"transformer.h.{i}.attn.c_proj.weight"]
            expected = gpt[f"transformer.h.{i}.attn.c_proj.weight"] * (scale if changes.llama_init else 1.0)
            torch.testing.assert_close(o_proj, expected, rtol=1e-6, atol=0)
        assert isinstance(variant.transformer.ln_f, RMSNorm) == changes.rmsnorm


def test_swiglu_rungs_have_the_llamas_size():
    config = ci_gpt_config()
    llama = Llama(matching_llama(config))
    assert GPTVariant(config, Changes(rope=True, swiglu=True)).num_parameters() == llama.num_parameters()
    assert GPTVariant(config, ALL_CHANGES).num_parameters() == llama.num_parameters()
    with_table = GPTVariant(config, Changes(rope=True)).num_parameters()
    assert GPT(config).num_parameters() - with_table == config.block_size * config.n_embd


def test_variant_with_all_changes_computes_like_transformers_llama():
    """The last rung is a Llama: with the weights of a random Hugging Face LlamaForCausalLM, the same logits."""
    transformers = pytest.importorskip("transformers")
    config = ci_gpt_config()
    ours = matching_llama(config)
    hf_config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=ours.hidden_size, intermediate_size=ours.intermediate_size,
        num_hidden_layers=ours.num_hidden_layers, num_attention_heads=ours.num_attention_heads,
        num_key_value_heads=ours.num_key_value_heads, max_position_embeddings=ours.max_position_embeddings,
        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # norms away from one, so that they matter
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    variant = GPTVariant(config, ALL_CHANGES).eval()
    with torch.no_grad():
        t, m = variant.transformer, hf.model
        t.wte.weight.copy_(m.embed_tokens.weight)
        for block, layer in zip(t.h, m.layers, strict=True):
            a = layer.self_attn
            block.ln_1.weight.copy_(layer.input_layernorm.weight)
            block.attn.c_attn.c_attn.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
            block.attn.c_proj.weight.copy_(a.o_proj.weight)
            block.ln_2.weight.copy_(layer.post_attention_layernorm.weight)
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(block.mlp, name).weight.copy_(getattr(layer.mlp, name).weight)
        t.ln_f.weight.copy_(m.norm.weight)
        x = torch.randint(0, VOCAB, (2, config.block_size), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(variant(x), hf(x).logits, rtol=0, atol=1e-5)


def test_variant_refuses_a_kv_cache_and_decodes_without_one():
    config = ci_gpt_config()
    variant = GPTVariant(config, Changes(rope=True)).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="use_cache=False"):
        generate(variant, prompt, 4)
    assert generate(variant, prompt, 4, use_cache=False).shape == (1, 7)


def test_best_val_trainer_restores_the_weights_of_its_best_evaluation():
    """Training only on ids 0-7 makes a uniform validation split worse at every step: the best is step 0."""
    kwargs, cfg = shakespeare_char_config("ci", VOCAB)
    cfg = replace(cfg, max_steps=12, warmup_steps=2, eval_interval=4, eval_iters=2)
    g = torch.Generator().manual_seed(0)
    train_data, val_data = torch.randint(0, 8, (4000,), generator=g), torch.randint(0, VOCAB, (2000,), generator=g)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**kwargs, "dropout": 0.0}))
    initial = {name: t.clone() for name, t in model.state_dict().items()}
    trainer = BestValTrainer(model, cfg, train_data, val_data, verbose=False)
    with pytest.raises(RuntimeError, match="fit"):
        trainer.restore_best()
    history = trainer.fit(progress=False)
    vals = [e["val"] for e in history["eval"]]
    assert [e["step"] for e in history["eval"]] == [0, 4, 8, 12] and vals[-1] > vals[0]
    assert trainer.restore_best() == history["eval"][vals.index(min(vals))]["step"] == 0
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, initial[name]), name
    again = estimate_loss(model, {"val": val_data}, cfg.block_size, cfg.batch_size, cfg.eval_iters, cfg.seed)
    assert again["val"] == pytest.approx(trainer.best["val"], abs=1e-6)
