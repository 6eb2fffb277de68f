"""scratchlm.mla: multi-head latent attention against transformers' DeepseekV3Attention, weight absorption against the
plain path, the latent cache, the cache of expanded keys and values (ExpandedCacheMLA), and the sizes that are refused.

References: transformers' DeepseekV3Attention (sdpa, causal) with random weights and noisy latent norms, its
DeepseekV3RotaryEmbedding for the reference's RoPE tables, and DeepseekV3ForCausalLM's cache; no downloads.
"""

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from scratchlm.generation import KVCache
from scratchlm.mla import (
    ExpandedCacheMLA,
    MultiHeadLatentAttention,
    check_mla_sizes,
    mla_cache_elements_per_token,
    mla_softmax_scale,
)
from scratchlm.rope import RotaryEmbedding

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 0.707}
SIZES = dict(hidden_size=64, num_attention_heads=4, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
             v_head_dim=12)


def pair(q_lora_rank, rope_interleave, rope_parameters, attention_bias=False, seed=0):
    config = DeepseekV3Config(**SIZES, num_key_value_heads=4, q_lora_rank=q_lora_rank, rope_interleave=rope_interleave,
                              max_position_embeddings=64, rope_parameters=rope_parameters,
                              attention_bias=attention_bias)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    reference = DeepseekV3Attention(config, layer_idx=0).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.add_(0.2 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.2)
    ours = MultiHeadLatentAttention(64, 4, 16, 16, 8, 12, q_lora_rank, attention_bias=attention_bias,
                                    rope_interleave=rope_interleave, scale=mla_softmax_scale(24, rope_parameters))
    ours.load_state_dict(reference.state_dict())
    return reference, DeepseekV3RotaryEmbedding(config), ours, RotaryEmbedding(8, 10000.0, rope_parameters, 64)


CASES = [(q, i, r) for q in (24, None) for i in (True, False) for r in (None, YARN, YARN_V2)]


@pytest.mark.parametrize("q_lora_rank,rope_interleave,rope_parameters", CASES)
def test_mla_matches_deepseek_v3_attention(q_lora_rank, rope_interleave, rope_parameters):
    reference, hf_rotary, ours, rotary = pair(q_lora_rank, rope_interleave, rope_parameters)
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x, hf_rotary(x, torch.arange(20)[None]), None)[0]
        assert (ours(x, *rotary(20)) - expected).abs().max().item() < 1e-5
        ours.absorb = True
        assert (ours(x, *rotary(20)) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("q_lora_rank,rope_interleave,rope_parameters", CASES[:4])
def test_decoding_with_the_latent_cache_matches_the_whole_sequence(q_lora_rank, rope_interleave, rope_parameters,
                                                                  absorb):
    _, _, ours, rotary = pair(q_lora_rank, rope_interleave, rope_parameters)
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours(x, *rotary(20))
        ours.absorb = absorb
        cache = KVCache()
        prefix = ours(x[:, :7], *rotary(7), cache=cache)  # a prompt, then one token at a time
        steps = [ours(x[:, t : t + 1], *rotary(1, offset=t), cache=cache) for t in range(7, 20)]
    assert (torch.cat([prefix, *steps], dim=1) - whole).abs().max().item() < 1e-5
    latent, k_rope = cache[0]
    assert latent.shape == (2, 1, 20, 16) and k_rope.shape == (2, 1, 20, 8)
    assert cache.nbytes == 2 * 20 * mla_cache_elements_per_token(1, 16, 8) * 4


@pytest.mark.parametrize("q_lora_rank,rope_interleave,rope_parameters", CASES[:6])
def test_expanded_cache_decoding_matches_the_reference(q_lora_rank, rope_interleave, rope_parameters):
    reference, hf_rotary, ours, rotary = pair(q_lora_rank, rope_interleave, rope_parameters)
    cached = ExpandedCacheMLA(64, 4, 16, 16, 8, 12, q_lora_rank, rope_interleave=rope_interleave,
                              scale=mla_softmax_scale(24, rope_parameters))
    cached.load_state_dict(ours.state_dict())
    x = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = reference(x, hf_rotary(x, torch.arange(20)[None]), None)[0]
        assert (cached(x, *rotary(20)) - expected).abs().max().item() < 1e-5  # no cache: the whole sequence
        cache = KVCache()
        prefix = cached(x[:, :7], *rotary(7), cache=cache)
        steps = [cached(x[:, t : t + 1], *rotary(1, offset=t), cache=cache) for t in range(7, 20)]
    assert (torch.cat([prefix, *steps], dim=1) - expected).abs().max().item() < 1e-5
    keys, values = cache[0]
    assert keys.shape == (2, 4, 20, 16 + 8) and values.shape == (2, 4, 20, 12)
    assert cache.nbytes == 2 * 20 * 4 * (16 + 8 + 12) * 4  # every head's key and value, float32


def test_attention_bias_matches():
    reference, hf_rotary, ours, rotary = pair(24, True, None, attention_bias=True)
    x = torch.randn(1, 9, 64)
    with torch.no_grad():
        assert (ours(x, *rotary(9)) - reference(x, hf_rotary(x, torch.arange(9)[None]), None)[0]).abs().max() < 1e-5


def test_cache_holds_what_transformers_caches():
    config = DeepseekV3Config(vocab_size=50, hidden_size=64, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16, q_lora_rank=None,
                              qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_routed_experts=4, n_group=1,
                              topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)
    torch.manual_seed(0)
    with torch.no_grad():
        cache = DeepseekV3ForCausalLM(config).eval()(torch.randint(0, 50, (1, 7)), use_cache=True).past_key_values
    assert tuple(cache.layers[0].keys.shape) == (1, 1, 7, 16) and tuple(cache.layers[0].values.shape) == (1, 1, 7, 8)


def test_cache_formula_for_deepseek_v3():
    assert mla_cache_elements_per_token(61, 512, 64) == 35_136
    assert mla_cache_elements_per_token(1, 512, 64) / (2 * 128 * 128) == pytest.approx(0.017578125)


def test_softmax_scale_of_the_released_v3_config():
    scaling = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0,
               "original_max_position_embeddings": 4096}
    assert mla_softmax_scale(192, scaling) == pytest.approx(192**-0.5 * (1 + 0.1 * __import__("math").log(40)) ** 2)
    assert mla_softmax_scale(192) == pytest.approx(192**-0.5)


@pytest.mark.parametrize("changes,message", [
    (dict(kv_lora_rank=0), "kv_lora_rank=0 must be a positive integer"),
    (dict(kv_lora_rank=-4), "kv_lora_rank=-4"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim=7 must be even"),
    (dict(q_lora_rank=0), "q_lora_rank=0"),
    (dict(qk_nope_head_dim=-1), "qk_nope_head_dim=-1"),
    (dict(num_heads=0), "num_attention_heads=0"),
])
def test_bad_sizes_are_refused(changes, message):
    kwargs = dict(hidden_size=64, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)
    with pytest.raises(ValueError, match=message):
        check_mla_sizes(**{**kwargs, **changes})
    with pytest.raises(ValueError, match=message):
        MultiHeadLatentAttention(**{**kwargs, **changes})
