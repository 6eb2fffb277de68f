"""ALiBi: scratchlm.attention.alibi_slopes and scratchlm.rope's alibi_bias, AlibiSelfAttention, AlibiGPT.

References: transformers' BLOOM (`build_alibi_tensor`, whose slopes and bias we must reproduce), the attention
written out by hand, and the model's own full-sequence pass for KV-cache decoding. No downloads.
"""

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from scratchlm.attention import alibi_slopes
from scratchlm.generation import KVCache
from scratchlm.gpt import GPT, GPTConfig
from scratchlm.rope import AlibiGPT, alibi_bias


def bloom_slopes(n_heads):
    return build_alibi_tensor(torch.ones(1, 2), n_heads, torch.float32)[:, 0, 1]  # slope x key position 1


@pytest.mark.parametrize("n_heads", range(1, 65))
def test_slopes_equal_bloom(n_heads):
    ours = alibi_slopes(n_heads)
    assert ours.shape == (n_heads,) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, bloom_slopes(n_heads), rtol=0, atol=1e-7)


def test_slopes_follow_the_paper():
    assert alibi_slopes(8).tolist() == [2.0**-h for h in range(1, 9)]  # 1/2 .. 1/256, exact in float32
    expected = [2.0**-e for e in (1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5)]  # 8 heads' + the odd ones of 16
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0, -4, 2.0, 12.5, "8", True, None])
def test_slopes_reject_a_bad_head_count(bad):
    with pytest.raises(ValueError, match="n_heads must be a positive integer"):
        alibi_slopes(bad)


def test_bias_differs_from_bloom_by_a_row_constant_and_gives_the_same_weights():
    n, T = 6, 9
    ours = alibi_bias(n, T)
    bloom = build_alibi_tensor(torch.ones(1, T), n, torch.float32).view(n, 1, T)  # m_h * j
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.isneginf(ours[:, ~allowed]).all()
    row_constant = -alibi_slopes(n)[:, None, None] * torch.arange(T)[None, :, None]
    torch.testing.assert_close((ours - bloom)[:, allowed], row_constant.expand(n, T, T)[:, allowed], rtol=0, atol=1e-5)
    scores = torch.randn(3, n, T, T, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((scores + ours).softmax(-1),
                               (scores + bloom).masked_fill(~allowed, float("-inf")).softmax(-1), rtol=0, atol=1e-6)


def test_bias_for_cached_queries_is_the_last_rows():
    assert torch.equal(alibi_bias(4, 3, 10), alibi_bias(4, 10)[:, -3:])
    with pytest.raises(ValueError, match="T <= S"):
        alibi_bias(4, 8, 4)


def tiny_config():
    return GPTConfig(vocab_size=17, block_size=24, n_layer=2, n_head=3, n_embd=24, bias=False)


def test_alibi_gpt_draws_gpts_weights_without_the_table():
    torch.manual_seed(0)
    model = AlibiGPT(tiny_config())
    torch.manual_seed(0)
    reference = GPT(tiny_config()).state_dict()
    assert set(reference) - set(model.state_dict()) == {"transformer.wpe.weight"}
    assert all(torch.equal(t, reference[name]) for name, t in model.state_dict().items())


def test_alibi_attention_equals_the_formula():
    torch.manual_seed(0)
    model = AlibiGPT(tiny_config()).eval()
    attn, x = model.transformer.h[1].attn, torch.randn(2, 7, 24)
    q, k, v = (t.view(2, 7, 3, 8).transpose(1, 2) for t in attn.c_attn(x).split(24, dim=2))
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    scores = q @ k.transpose(-2, -1) / math.sqrt(8) - alibi_slopes(3)[:, None, None] * (i - j)
    y = scores.masked_fill(j > i, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(attn(x), attn.c_proj(y.transpose(1, 2).reshape(2, 7, 24)), rtol=0, atol=1e-5)


def test_alibi_gpt_decodes_with_a_cache_as_in_one_pass():
    torch.manual_seed(0)
    model = AlibiGPT(tiny_config()).eval()
    ids = torch.randint(17, (2, 11))
    cache = KVCache()
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :4], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(4, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
