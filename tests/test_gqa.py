"""scratchlm.gqa: grouped-query attention, proven against transformers' attention layers and torch.

References: transformers' LlamaAttention, Qwen2Attention, Qwen3Attention, Gemma3Attention (eager), repeat_kv and
sliding_window_causal_mask_function; torch's nn.MultiheadAttention and scaled_dot_product_attention(enable_gqa=True);
scratchlm.generation.KVCache for the cache protocol. Tiny sizes, no downloads.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config
from transformers.masking_utils import sliding_window_causal_mask_function
from transformers.models.gemma3.modeling_gemma3 import Gemma3Attention, Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.llama.modeling_llama import repeat_kv as hf_repeat_kv
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention

from scratchlm.attention import causal_mask
from scratchlm.generation import KVCache
from scratchlm.gqa import (
    GroupedQueryAttention,
    kv_cache_bytes,
    kv_cache_bytes_per_token,
    repeat_kv,
    sliding_window_causal_mask,
)
from scratchlm.rope import RotaryEmbedding


def hf_mask(T, S=None, window=None):
    """The additive mask transformers' eager attention takes, from transformers' own mask functions."""
    S = T if S is None else S
    allowed = torch.tensor([[bool(sliding_window_causal_mask_function(window or S + T)(0, 0, torch.tensor(S - T + t),
                                                                                       torch.tensor(s)))
                             for s in range(S)] for t in range(T)])
    return torch.zeros(T, S).masked_fill(~allowed, float("-inf"))[None, None]


def randomize_(module, seed=0):
    """Biases and norm weights start at zeros or ones in transformers; make them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module


def ours_from(hf_attn, **kwargs):
    ours = GroupedQueryAttention(**kwargs)
    ours.load_state_dict(hf_attn.state_dict())
    return ours.eval()


@pytest.mark.parametrize("n_kv", [1, 2, 3, 6])
def test_repeat_kv_matches_transformers_and_repeat_interleave(n_kv):
    kv = torch.randn(2, n_kv, 5, 4)
    n_rep = 6 // n_kv
    assert torch.equal(repeat_kv(kv, n_rep), hf_repeat_kv(kv, n_rep))
    assert torch.equal(repeat_kv(kv, n_rep), kv.repeat_interleave(n_rep, dim=1))


@pytest.mark.parametrize("window", [1, 2, 3, 8])
@pytest.mark.parametrize("T,S", [(6, 6), (1, 9), (3, 9)])
def test_sliding_window_mask_matches_transformers(window, T, S):
    expected = hf_mask(T, S, window)[0, 0] == 0
    assert torch.equal(sliding_window_causal_mask(T, S, window), expected)
    assert torch.equal(sliding_window_causal_mask(T, S), causal_mask(T, S))


def test_mha_equals_nn_multihead_attention():
    torch.manual_seed(0)
    ours = GroupedQueryAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4, bias=False, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        x = torch.randn(2, 9, 32)
        expected, _ = ref(x, x, x, attn_mask=~causal_mask(9, 9), need_weights=False)
        assert torch.allclose(ours(x), expected, atol=1e-6)


def test_mqa_equals_explicit_shared_key_value():
    torch.manual_seed(0)
    layer = GroupedQueryAttention(32, 4, n_kv_heads=1).eval()
    x = torch.randn(2, 7, 32)
    with torch.no_grad():
        q = layer.q_proj(x).view(2, 7, 4, 8)
        k, v = layer.k_proj(x), layer.v_proj(x)  # (B, T, 8): one head
        scores = torch.einsum("bthd,bsd->bhts", q, k) / math.sqrt(8)
        w = scores.masked_fill(~causal_mask(7, 7), float("-inf")).softmax(-1)
        expected = layer.o_proj(torch.einsum("bhts,bsd->bthd", w, v).reshape(2, 7, 32))
        assert torch.allclose(layer(x), expected, atol=1e-6)


@pytest.mark.parametrize("n_kv", [4, 2, 1])
def test_both_paths_equal_sdpa_enable_gqa(n_kv):
    torch.manual_seed(0)
    fast = GroupedQueryAttention(32, 4, n_kv_heads=n_kv).eval()
    slow = GroupedQueryAttention(32, 4, n_kv_heads=n_kv, use_sdpa=False).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        q = fast.q_proj(x).view(2, 11, 4, 8).transpose(1, 2)
        k = fast.k_proj(x).view(2, 11, n_kv, 8).transpose(1, 2)
        v = fast.v_proj(x).view(2, 11, n_kv, 8).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        expected = fast.o_proj(y.transpose(1, 2).reshape(2, 11, 32))
        assert torch.allclose(fast(x), expected, atol=1e-6)
        assert torch.allclose(slow(x), expected, atol=1e-6)


@pytest.mark.parametrize("n_heads,n_kv,theta", [(4, 4, 10000.0), (4, 2, 500000.0), (6, 1, 10000.0), (6, 3, 1e6)])
def test_llama_attention_matches_transformers(n_heads, n_kv, theta):
    config = LlamaConfig(hidden_size=8 * n_heads, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                         max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._attn_implementation = "eager"
    torch.manual_seed(1)
    hf = LlamaAttention(config, layer_idx=0).eval()
    x = torch.randn(2, 13, 8 * n_heads)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(13)[None])
    cos, sin = RotaryEmbedding(8, theta)(13)
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=hf_mask(13))
        for use_sdpa in (True, False):
            ours = ours_from(hf, dim=8 * n_heads, n_heads=n_heads, n_kv_heads=n_kv, use_sdpa=use_sdpa)
            assert torch.allclose(ours(x, cos, sin), expected, atol=1e-5)


def test_llama_attention_bias_on_all_four_projections():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    config._attn_implementation = "eager"
    torch.manual_seed(2)
    hf = randomize_(LlamaAttention(config, layer_idx=0).eval())
    x = torch.randn(1, 9, 32)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(9)[None])
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=hf_mask(9))
        ours = ours_from(hf, dim=32, n_heads=4, n_kv_heads=2, qkv_bias=True, o_bias=True)
        assert torch.allclose(ours(x, *RotaryEmbedding(8)(9)), expected, atol=1e-5)


def test_qwen2_attention_qkv_bias_matches_transformers():
    config = Qwen2Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2)
    config._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = randomize_(Qwen2Attention(config, layer_idx=0).eval())
    x = torch.randn(2, 10, 48)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(10)[None])
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=hf_mask(10))
        ours = ours_from(hf, dim=48, n_heads=6, n_kv_heads=2, qkv_bias=True)
        assert ours.o_proj.bias is None
        assert torch.allclose(ours(x, *RotaryEmbedding(8, config.rope_parameters["rope_theta"])(10)), expected, atol=1e-5)


@pytest.mark.parametrize("head_dim,n_kv", [(16, 2), (8, 1), (32, 4)])
def test_qwen3_attention_qk_norm_and_head_dim_match_transformers(head_dim, n_kv):
    config = Qwen3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=n_kv, head_dim=head_dim)
    config._attn_implementation = "eager"
    torch.manual_seed(4)
    hf = randomize_(Qwen3Attention(config, layer_idx=0).eval())
    x = torch.randn(2, 10, 32)
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(10)[None])
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=hf_mask(10))
        ours = ours_from(hf, dim=32, n_heads=4, n_kv_heads=n_kv, head_dim=head_dim, qk_norm=True,
                         norm_eps=config.rms_norm_eps)
        assert torch.allclose(ours(x, *RotaryEmbedding(head_dim, config.rope_parameters["rope_theta"])(10)),
                              expected, atol=1e-5)


@pytest.mark.parametrize("layer_idx,layer_type,base", [(0, "sliding_attention", 10000.0), (1, "full_attention", 1e6)])
def test_gemma3_attention_matches_transformers(layer_idx, layer_type, base):
    rope_parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "default", "rope_theta": 1e6}}
    config = Gemma3TextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              query_pre_attn_scalar=12, sliding_window=4, num_hidden_layers=2,
                              layer_types=["sliding_attention", "full_attention"], rope_parameters=rope_parameters)
    config._attn_implementation = "eager"
    torch.manual_seed(5)
    hf = randomize_(Gemma3Attention(config, layer_idx=layer_idx).eval())
    x = torch.randn(2, 10, 32)
    cos_sin = Gemma3RotaryEmbedding(config)(x, torch.arange(10)[None], layer_type)
    window = 4 if layer_type == "sliding_attention" else None
    with torch.no_grad():
        expected, _ = hf(x, position_embeddings=cos_sin, attention_mask=hf_mask(10, window=window))
        for use_sdpa in (True, False):
            ours = ours_from(hf, dim=32, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True, norm_unit_offset=True,
                             scale=12**-0.5, sliding_window=window, use_sdpa=use_sdpa)
            assert torch.allclose(ours(x, *RotaryEmbedding(16, base)(10)), expected, atol=1e-5)


@pytest.mark.parametrize("n_kv,window", [(4, None), (2, None), (1, None), (2, 3), (1, 1)])
def test_cached_decoding_equals_full_forward(n_kv, window):
    torch.manual_seed(6)
    fast = GroupedQueryAttention(32, 4, n_kv_heads=n_kv, sliding_window=window).eval()
    slow = GroupedQueryAttention(32, 4, n_kv_heads=n_kv, sliding_window=window, use_sdpa=False).eval()
    slow.load_state_dict(fast.state_dict())
    rope, x = RotaryEmbedding(8), torch.randn(2, 15, 32)
    with torch.no_grad():
        full = fast(x, *rope(15))
        assert torch.allclose(slow(x, *rope(15)), full, atol=1e-6)
        for layer in (fast, slow):
            cache = KVCache()
            parts = [layer(x[:, :6], *rope(6), cache=cache)]  # a prompt, then one token at a time
            parts += [layer(x[:, t : t + 1], *rope(1, offset=t), cache=cache) for t in range(6, 11)]
            parts.append(layer(x[:, 11:], *rope(4, offset=11), cache=cache))  # a chunk of 4 after the cache
            assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
            assert cache[0][0].shape == (2, n_kv, 15, 8)


def test_kv_cache_bytes_match_a_real_cache():
    layers = nn.ModuleList(GroupedQueryAttention(32, 4, n_kv_heads=2, layer_idx=i) for i in range(3))
    layers.to(torch.bfloat16)
    cache = KVCache()
    with torch.no_grad():
        x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
        for layer in layers:
            layer(x, cache=cache)
    assert cache.nbytes == 2 * kv_cache_bytes(7, 3, 2, 8)
    assert kv_cache_bytes(7, 3, 2, 8) == 7 * kv_cache_bytes_per_token(3, 2, 8)
    assert kv_cache_bytes_per_token(32, 8, 128) == 32 * 8 * 128 * 2 * 2  # Llama 3 8B, bfloat16
    assert kv_cache_bytes_per_token(32, 8, 128, torch.float32) == 2 * kv_cache_bytes_per_token(32, 8, 128)
    # windowed layers hold at most `window` positions
    assert kv_cache_bytes(100, 2, 1, 8, windows=[10, None]) == (10 + 100) * kv_cache_bytes_per_token(1, 1, 8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=64, n_heads=8, n_kv_heads=3), "n_heads=8 is not divisible by n_kv_heads=3"),
    (dict(dim=100, n_heads=3), "dim=100 is not divisible by n_heads=3"),
    (dict(dim=64, n_heads=8, sliding_window=0), "sliding_window=0 must be a positive"),
    (dict(dim=64, n_heads=8, sliding_window=-4), "sliding_window=-4 must be a positive"),
    (dict(dim=64, n_heads=8, n_kv_heads=0), "n_kv_heads must be a positive integer"),
    (dict(dim=64, n_heads=0), "n_heads must be a positive integer"),
    (dict(dim=64, n_heads=8, dropout=1.0), "dropout must be in"),
])
def test_bad_configurations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GroupedQueryAttention(**kwargs)


def test_bad_input_shape_and_windows():
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, time, 64\)"):
        GroupedQueryAttention(64, 8)(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="windows has 1 entries for 2 layers"):
        kv_cache_bytes(10, 2, 1, 8, windows=[None])
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        kv_cache_bytes_per_token(0, 1, 8)
