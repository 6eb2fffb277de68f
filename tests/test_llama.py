"""scratchlm.llama: Llama 3, Mistral, Qwen2, Qwen3 and Gemma 3 against transformers.

Every model is a small random transformers model (its own config class and initialisation, with noise added to
the norm weights and biases it initialises to constants), saved with save_pretrained into tmp_path and loaded with
scratchlm's from_hf. References: the transformers models' logits (fp32, eager attention) and their generate
(do_sample=False). No downloads.
"""

import json

import pytest
import torch
from hf_checkpoints import assert_greedy_matches, checkpoint_cache, random_ids
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Qwen2Config, Qwen3Config
from transformers import LlamaConfig as HFLlamaConfig

import scratchlm.llama  # noqa: F401  (registers the model types, in case scratchlm.MODEL_MODULES does not list it)
from scratchlm.generation import KVCache, beam_search, generate
from scratchlm.gpt import CheckpointMismatchError, from_hf, load_safetensors
from scratchlm.llama import Gemma3, Gemma3Config, Llama, LlamaConfig, SlidingWindowCache

SIZES = dict(vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
GEMMA_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
              "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}


def sizes(**changes):
    return {**SIZES, **changes}


CASES = {  # name -> transformers config
    "llama-gqa-llama3-rope": HFLlamaConfig(**sizes(rope_parameters=LLAMA3)),
    "llama-mha-tied": HFLlamaConfig(**sizes(num_key_value_heads=6, tie_word_embeddings=True)),
    "llama-mqa-biases": HFLlamaConfig(**sizes(num_key_value_heads=1, attention_bias=True, mlp_bias=True)),
    "llama-head-dim-12-linear": HFLlamaConfig(**sizes(head_dim=12, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-yarn": HFLlamaConfig(**sizes(rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 16, "rope_theta": 1e4})),
    "llama-dynamic": HFLlamaConfig(**sizes(max_position_embeddings=16, rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})),  # 24 tokens: past the trained 16
    "mistral-window-5": MistralConfig(**sizes(sliding_window=5)),
    "mistral-mqa-window-1-tied": MistralConfig(**sizes(num_key_value_heads=1, sliding_window=1, tie_word_embeddings=True)),
    "mistral-no-window": MistralConfig(**sizes(sliding_window=None)),
    "qwen2-gqa": Qwen2Config(**sizes()),
    "qwen2-window-layers-tied-yarn": Qwen2Config(**sizes(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                         tie_word_embeddings=True, rope_parameters={
                                                             "rope_type": "yarn", "factor": 2.0, "rope_theta": 1e6,
                                                             "original_max_position_embeddings": 32})),
    "qwen3-head-dim-16": Qwen3Config(**sizes(head_dim=16)),
    "qwen3-mqa-tied-bias": Qwen3Config(**sizes(num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
                                               attention_bias=True)),
    "qwen3-window-llama3": Qwen3Config(**sizes(head_dim=8, use_sliding_window=True, sliding_window=3, max_window_layers=0,
                                               rope_parameters=LLAMA3)),
    "gemma3-alternating": Gemma3TextConfig(**sizes(head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
                                                   rope_parameters=GEMMA_ROPE), sliding_window_pattern=2),
    "gemma3-mqa-5to1-linear": Gemma3TextConfig(**sizes(num_key_value_heads=1, num_hidden_layers=6, head_dim=8,
                                                       sliding_window=4, rope_parameters={
                                                           **GEMMA_ROPE, "full_attention": {
                                                               "rope_type": "linear", "factor": 8.0,
                                                               "rope_theta": 1e6}})),
    "gemma3-untied-softcap": Gemma3TextConfig(**sizes(head_dim=8, tie_word_embeddings=False, sliding_window=6,
                                                      final_logit_softcapping=3.0, rope_parameters=GEMMA_ROPE),
                                              sliding_window_pattern=2),
}
GENERATION_CASES = ["llama-gqa-llama3-rope", "mistral-window-5", "qwen2-window-layers-tied-yarn", "qwen3-head-dim-16",
                    "gemma3-alternating", "gemma3-mqa-5to1-linear"]


def make_checkpoint(config, folder, seed=0):
    """A random transformers model from `config` with noisy norms and biases, saved to `folder`; returns it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_cache(tmp_path_factory.mktemp("checkpoints"), lambda name, folder, seed: make_checkpoint(CASES[name], folder, seed=seed))


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, name):
    hf_model, folder = checkpoints(name)
    ours = from_hf(folder)
    assert isinstance(ours, Gemma3 if name.startswith("gemma3") else Llama)
    ids = random_ids(SIZES["vocab_size"], (2, 24))
    with torch.no_grad():
        expected = hf_model(ids).logits
        assert (ours(ids) - expected).abs().max().item() < 1e-5
        manual = type(ours)(type(ours.config)(**{**ours.config.__dict__, "use_sdpa": False})).eval()
        manual.load_state_dict(ours.state_dict())
        assert (manual(ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", GENERATION_CASES)
def test_greedy_generation_matches_transformers(checkpoints, name):
    hf_model, folder = checkpoints(name)
    assert_greedy_matches(from_hf(folder), hf_model, SIZES["vocab_size"])


@pytest.mark.parametrize("name", ["mistral-window-5", "gemma3-alternating", "qwen2-window-layers-tied-yarn"])
def test_sliding_window_cache_matches_full_cache_and_stays_small(checkpoints, name):
    _, folder = checkpoints(name)
    model = from_hf(folder)
    windows = [layer.self_attn.sliding_window for layer in model.layers]
    rolling, full = SlidingWindowCache.for_model(model), KVCache()
    ids = random_ids(SIZES["vocab_size"], (2, 7), seed=2)
    sizes_seen = []
    with torch.no_grad():
        for step in range(30):
            fresh = ids if step == 0 else ids[:, -1:]
            a, b = model(fresh, cache=rolling)[:, -1], model(fresh, cache=full)[:, -1]
            assert torch.allclose(a, b, atol=1e-5)
            ids = torch.cat([ids, a.argmax(-1, keepdim=True)], dim=1)
            sizes_seen.append(rolling.nbytes)
    assert rolling.seq_len == full.seq_len == ids.size(1) - 1
    # every windowed layer holds window - 1 positions, every full layer all of them
    per_position = 2 * 2 * model.config.num_key_value_heads * model.config.head_dim * 4  # K+V, batch 2, fp32
    held = sum(min(w - 1, rolling.seq_len) if w else rolling.seq_len for w in windows)
    assert rolling.nbytes == held * per_position
    if all(windows):  # nothing grows: constant once past the window
        assert len(set(sizes_seen[max(windows):])) == 1
        assert rolling.nbytes < full.nbytes


@pytest.mark.parametrize("name", ["mistral-window-5", "gemma3-alternating"])
def test_generate_and_beam_search_use_the_rolling_cache(checkpoints, name):
    _, folder = checkpoints(name)
    model = from_hf(folder)
    assert isinstance(model.make_cache(), SlidingWindowCache)
    prompt = random_ids(SIZES["vocab_size"], (9,), seed=3)
    # beam search reorders the cache's rows as beams are kept or dropped
    assert torch.equal(beam_search(model, prompt, max_new_tokens=12, num_beams=3),
                       beam_search(model, prompt, max_new_tokens=12, num_beams=3, use_cache=False))
    assert torch.equal(generate(model, prompt, max_new_tokens=12, temperature=1.0, top_k=20,
                                generator=torch.Generator().manual_seed(0)),
                       generate(model, prompt, max_new_tokens=12, temperature=1.0, top_k=20, use_cache=False,
                                generator=torch.Generator().manual_seed(0)))


def test_generate_crops_at_block_size(checkpoints):
    _, folder = checkpoints("llama-dynamic")
    model = from_hf(folder)
    assert model.config.block_size == 32  # dynamic scaling x2 of 16 positions
    prompt = random_ids(SIZES["vocab_size"], (1, 30))
    assert torch.equal(generate(model, prompt, max_new_tokens=5), generate(model, prompt, max_new_tokens=5,
                                                                           use_cache=False))


def test_old_style_config_json_loads_the_same(checkpoints, tmp_path):
    """Published config.json files use rope_theta / rope_scaling (and, for Gemma 3, rope_local_base_freq and
    sliding_window_pattern) instead of transformers 5's rope_parameters and layer_types."""
    def old_llama(config):
        rope = config.pop("rope_parameters")
        return {**config, "rope_theta": rope.pop("rope_theta"), "rope_scaling": rope}

    for name, edit in [
        ("llama-gqa-llama3-rope", old_llama),
        ("gemma3-alternating", lambda c: {**{k: v for k, v in c.items() if k not in ("rope_parameters", "layer_types")},
                                          "rope_theta": 1e6, "rope_local_base_freq": 10000.0,
                                          "sliding_window_pattern": 2}),
        ("qwen3-window-llama3", lambda c: {**{k: v for k, v in c.items() if k not in ("rope_parameters", "layer_types")},
                                           "rope_theta": 500000.0, "rope_scaling": {
                                               k: v for k, v in LLAMA3.items() if k != "rope_theta"}}),
    ]:
        hf_model, folder = checkpoints(name)
        old = tmp_path / name
        old.mkdir()
        (old / "config.json").write_text(json.dumps(edit(json.loads((folder / "config.json").read_text()))))
        (old / "model.safetensors").symlink_to(folder / "model.safetensors")
        ids = random_ids(SIZES["vocab_size"], (1, 20))
        with torch.no_grad():
            assert (from_hf(old)(ids) - hf_model(ids).logits).abs().max().item() < 1e-5


def test_parameter_counts_match_transformers_at_full_size():
    with torch.device("meta"):
        ours = Llama(LlamaConfig())  # Llama 3 8B
        theirs = AutoModelForCausalLM.from_config(HFLlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192))
        assert ours.num_parameters() == sum(p.numel() for p in theirs.parameters()) == 8_030_261_248
        gemma = Gemma3(Gemma3Config())  # Gemma 3 1B's shape
        hf_gemma = AutoModelForCausalLM.from_config(Gemma3TextConfig(
            vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
            num_key_value_heads=1, head_dim=256, max_position_embeddings=32768, sliding_window=512))
        assert gemma.num_parameters() == sum(p.numel() for p in hf_gemma.parameters())


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,message", [
    (dict(num_attention_heads=8, num_key_value_heads=3), "num_attention_heads=8 is not divisible by num_key_value_heads=3"),
    (dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=15), "head_dim=15 must be even"),
    (dict(hidden_size=100, num_attention_heads=3, num_key_value_heads=3), "hidden_size=100 is not divisible"),
    (dict(rope_scaling={"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0]}),
     "RoPE scaling type 'longrope' is not supported"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs low_freq_factor"),
    (dict(sliding_window=0), "sliding_window=0 must be a positive"),
    (dict(sliding_window=-3), "sliding_window=-3 must be a positive"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types needs one of"),
    (dict(num_hidden_layers=1, layer_types=["local"], sliding_window=4), "unknown"),
    (dict(num_hidden_layers=1, layer_types=["sliding_attention"]), "sliding_window is None"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**kwargs)


def copy_checkpoint(folder, new, config_edit=None, tensors_edit=None):
    new.mkdir()
    config = json.loads((folder / "config.json").read_text())
    (new / "config.json").write_text(json.dumps(config_edit(config) if config_edit else config))
    tensors = load_safetensors(folder)
    save_file(tensors_edit(tensors) if tensors_edit else tensors, new / "model.safetensors")
    return new


def test_mis_shaped_missing_and_unexpected_tensors_are_listed(checkpoints, tmp_path):
    _, folder = checkpoints("qwen2-gqa")

    def damage(tensors):
        del tensors["model.layers.1.self_attn.q_proj.bias"]
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 48)  # 6 KV heads' worth, not 2
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(48)  # Qwen2 has none
        return tensors

    with pytest.raises(CheckpointMismatchError) as info:
        from_hf(copy_checkpoint(folder, tmp_path / "broken", tensors_edit=damage))
    err = info.value
    assert err.missing == ["layers.1.self_attn.q_proj.bias"]
    assert err.unexpected == ["layers.0.self_attn.o_proj.bias"]
    assert err.misshaped == ["layers.0.self_attn.k_proj.weight (48, 48) (the model has (16, 48))"]
    assert "wrong shape (1): layers.0.self_attn.k_proj.weight" in str(err)


def test_tied_checkpoint_with_a_different_lm_head_is_refused(checkpoints, tmp_path):
    _, folder = checkpoints("llama-mha-tied")

    def untie(tensors):
        tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
        return tensors

    with pytest.raises(CheckpointMismatchError, match="tie_word_embeddings=true but an lm_head.weight that differs"):
        from_hf(copy_checkpoint(folder, tmp_path / "untied", tensors_edit=untie))


def test_checkpoint_config_errors(checkpoints, tmp_path):
    _, llama = checkpoints("llama-gqa-llama3-rope")
    _, mistral = checkpoints("mistral-window-5")
    _, gemma = checkpoints("gemma3-alternating")
    with pytest.raises(ValueError, match="RoPE scaling type 'longrope' is not supported"):
        from_hf(copy_checkpoint(llama, tmp_path / "longrope", lambda c: {**c, "rope_parameters": {
            "rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0], "long_factor": [1.0]}}))
    with pytest.raises(ValueError, match="sliding_window=0 must be a positive"):
        from_hf(copy_checkpoint(mistral, tmp_path / "window0", lambda c: {**c, "sliding_window": 0}))
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        from_hf(copy_checkpoint(gemma, tmp_path / "bidirectional", lambda c: {**c, "use_bidirectional_attention": True}))
    with pytest.raises(ValueError, match=r"model_type='mixtral'.*supported: .*gemma3_text.*llama.*mistral.*qwen2.*qwen3"):
        from_hf(copy_checkpoint(llama, tmp_path / "mixtral", lambda c: {**c, "model_type": "mixtral"}))


def test_too_long_and_bad_shape_inputs():
    model = Llama(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8)).eval()
    with pytest.raises(ValueError, match="9 tokens, but block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must have shape \(batch, time\)"):
        model(torch.zeros(8, dtype=torch.long))
    cache = KVCache()
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="6 cached positions \\+ 3 new tokens = 9"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="windows must be positive integers or None"):
        SlidingWindowCache([4, 0])


@pytest.mark.parametrize("name", ["qwen3-head-dim-16", "gemma3-alternating"])
def test_bfloat16_model_stays_close_to_transformers_in_bfloat16(checkpoints, name):
    hf_model, folder = checkpoints(name)
    ours = from_hf(folder, dtype=torch.bfloat16)
    assert ours.embed_tokens.weight.dtype == torch.bfloat16
    hf_bf16 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ids = random_ids(SIZES["vocab_size"], (2, 16))
    with torch.no_grad():
        a, b = ours(ids), hf_bf16(ids).logits
    assert a.dtype == torch.bfloat16
    assert (a.float() - b.float()).abs().max().item() < 0.05 * b.float().abs().max().item()  # bfloat16 rounding
