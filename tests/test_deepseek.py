"""scratchlm.deepseek: DeepSeek-V3 assembled, against transformers' DeepseekV3ForCausalLM.

Random tiny models (eager attention and experts, noisy norms, a random non-zero correction bias in every MoE
layer) saved with save_pretrained and loaded with from_hf. References: their logits (fp32) and generate
(do_sample=False). No downloads.
"""

import json

import pytest
import torch
from hf_checkpoints import (
    DEEPSEEK_V3_SIZES,
    assert_greedy_matches,
    checkpoint_cache,
    jitter_norms,
    random_ids,
)
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config as HFDeepseekV3Config
from transformers import DeepseekV3ForCausalLM

import scratchlm
from scratchlm.deepseek import DeepseekV3, DeepseekV3Config
from scratchlm.generation import KVCache
from scratchlm.gpt import CheckpointMismatchError, from_hf

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
SIZES = DEEPSEEK_V3_SIZES
CASES = {
    "qlora-interleaved-groups": dict(),
    "no-qlora-half-rope": dict(q_lora_rank=None, rope_interleave=False),
    "yarn-no-dense-no-renorm": dict(rope_parameters=YARN, norm_topk_prob=False, first_k_dense_replace=0),
    "no-groups-top3-tied": dict(n_group=1, topk_group=1, num_experts_per_tok=3, tie_word_embeddings=True),
    "16-experts-8-groups-top4-two-dense-two-shared": dict(n_routed_experts=16, n_group=8, topk_group=3,
                                                          num_experts_per_tok=4, first_k_dense_replace=2,
                                                          n_shared_experts=2, num_hidden_layers=4,
                                                          routed_scaling_factor=1.5),
}
GENERATION_CASES = ["qlora-interleaved-groups", "yarn-no-dense-no-renorm", "no-groups-top3-tied"]


def make_checkpoint(name, folder, seed):
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM._from_config(HFDeepseekV3Config(**{**SIZES, **CASES[name]}),
                                               attn_implementation="eager", experts_implementation="eager").eval()
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)
    jitter_norms(model)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_cache(tmp_path_factory.mktemp("deepseek_v3"), make_checkpoint)


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(checkpoints, name):
    reference, folder = checkpoints(name)
    ours = from_hf(folder)
    assert isinstance(ours, DeepseekV3)
    ids = random_ids(SIZES["vocab_size"], (2, 24))
    with torch.no_grad():
        expected = reference(ids).logits
        assert (ours(ids) - expected).abs().max().item() < 1e-5
        assert (ours.use_absorption()(ids) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", GENERATION_CASES)
def test_greedy_generation_matches_transformers(checkpoints, name):
    reference, folder = checkpoints(name)
    ours = from_hf(folder)
    assert_greedy_matches(ours, reference, SIZES["vocab_size"], ours.use_absorption())


def test_the_cache_holds_latents(checkpoints):
    _, folder = checkpoints("qlora-interleaved-groups")
    model = from_hf(folder)
    cache = model.make_cache()
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        model(random_ids(SIZES["vocab_size"], (1, 10)), cache=cache)
    latent, k_rope = cache[0]
    assert latent.shape == (1, 1, 10, 16) and k_rope.shape == (1, 1, 10, 8)
    assert cache.nbytes == 3 * 10 * (16 + 8) * 4


def test_layer_kinds_and_bias_loaded(checkpoints):
    reference, folder = checkpoints("16-experts-8-groups-top4-two-dense-two-shared")
    model = from_hf(folder)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["GatedMLP", "GatedMLP", "DeepSeekMoE", "DeepSeekMoE"]
    assert torch.equal(model.layers[3].mlp.gate.e_score_correction_bias,
                       reference.model.layers[3].mlp.gate.e_score_correction_bias)
    assert model.layers[2].mlp.gate.routed_scaling_factor == 1.5


def test_mtp_layer_of_a_released_checkpoint_loads_into_the_mtp_module(checkpoints, tmp_path):
    """Layer num_hidden_layers of a checkpoint is DeepSeek's MTP layer: it loads into model.mtp[0] (its block under
    mtp_block, its copies of the embedding and head not loaded) and leaves the main model's logits unchanged. Its
    logits are checked against transformers' MtpModel in test_mtp.py."""
    reference, folder = checkpoints("qlora-interleaved-groups")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name].clone()  # an MoE block as layer 3
    torch.manual_seed(0)
    mtp_own = {"enorm.weight": torch.rand(64), "hnorm.weight": torch.rand(64), "eh_proj.weight": torch.randn(64, 128),
               "shared_head.norm.weight": torch.rand(64)}
    tensors |= {f"model.layers.3.{name}": t for name, t in mtp_own.items()}
    tensors["model.layers.3.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors["model.layers.3.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    model = from_hf(tmp_path)
    assert len(model.mtp) == 1 and model.config.num_nextn_predict_layers == 1
    for name, t in mtp_own.items():
        assert torch.equal(model.mtp[0].get_parameter(name), t)
    assert torch.equal(model.mtp[0].mtp_block.self_attn.kv_b_proj.weight,
                       tensors["model.layers.2.self_attn.kv_b_proj.weight"])
    ids = random_ids(SIZES["vocab_size"], (1, 12))
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max().item() < 1e-5
    assert len(from_hf(folder).mtp) == 0  # transformers' save_pretrained writes no MTP layer


def test_an_incomplete_mtp_layer_is_named(checkpoints, tmp_path):
    _, folder = checkpoints("qlora-interleaved-groups")
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.startswith("model.layers.2.")]:
        tensors[name.replace("model.layers.2.", "model.layers.3.")] = tensors[name].clone()
    tensors["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)  # no enorm, hnorm, shared_head.norm
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"missing \(3\): mtp\.0\.enorm\.weight, mtp\.0\.hnorm\.weight"):
        from_hf(tmp_path)


def test_full_size_parameter_count_matches_transformers():
    with torch.device("meta"):
        ours = DeepseekV3(DeepseekV3Config())
        reference = DeepseekV3ForCausalLM(HFDeepseekV3Config())
    assert ours.num_parameters() == reference.num_parameters() == 671_026_404_352
    assert round(ours.active_parameters() / 1e9, 1) == 37.6


@pytest.mark.parametrize("changes,message", [
    (dict(topk_method="greedy"), "topk_method='greedy'"),
    (dict(scoring_func="softmax"), "scoring_func='softmax'"),
    (dict(n_routed_experts=10, n_group=4), "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(topk_group=5), "topk_group=5 must be between 1 and n_group=4"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok=5 must be between 1 and the 4 experts"),
    (dict(kv_lora_rank=0), "kv_lora_rank=0"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace=9"),
])
def test_bad_configs_are_refused_by_name(checkpoints, tmp_path, changes, message):
    _, folder = checkpoints("qlora-interleaved-groups")
    config = {**json.loads((folder / "config.json").read_text()), **changes}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=message):
        from_hf(tmp_path)


def test_misshaped_expert_tensors_are_named(checkpoints, tmp_path):
    _, folder = checkpoints("qlora-interleaved-groups")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.experts.4.gate_proj.weight"] = torch.zeros(30, 64)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"experts\.4\.gate_proj\.weight \(30, 64\)"):
        from_hf(tmp_path)


def test_deepseek_is_in_model_modules():
    assert "scratchlm.deepseek" in scratchlm.MODEL_MODULES


@pytest.mark.parametrize("profile", ["ci", "cpu", "gpu"])
def test_char_deepseek_matches_the_llama_in_active_parameters(profile):
    from scratchlm.char_llama import char_llama_config
    from scratchlm.deepseek import char_deepseek_config
    from scratchlm.llama import Llama, LlamaConfig
    from scratchlm.train import shakespeare_char_config

    gpt_kwargs, _ = shakespeare_char_config(profile, 65)
    with torch.device("meta"):
        llama = Llama(LlamaConfig(**char_llama_config(gpt_kwargs))).num_parameters()
        deepseek = DeepseekV3(DeepseekV3Config(**char_deepseek_config(gpt_kwargs)))
    assert abs(deepseek.active_parameters() / llama - 1) < 0.02
    assert deepseek.num_parameters() > 1.3 * llama  # more in total: the unchosen experts


def test_bias_update_runs_in_training_mode_only():
    from scratchlm.deepseek import char_deepseek_config
    from scratchlm.train import build_model, shakespeare_char_config

    torch.manual_seed(0)
    config = char_deepseek_config(shakespeare_char_config("ci", 65)[0])
    model = build_model("deepseek", config)
    ids = torch.randint(0, 65, (4, 16))
    bias = model.moe_layers()[0].gate.e_score_correction_bias
    with torch.no_grad():
        model.eval()(ids)
        assert torch.equal(bias, torch.zeros_like(bias))
        model.train()(ids)
    load = model.moe_layers()[0].load().float()
    assert torch.equal(bias, 1e-3 * torch.sign(load.mean() - load))
