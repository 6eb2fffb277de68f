"""scratchlm.attention and scratchlm.flash against PyTorch's own attention.

References: F.scaled_dot_product_attention, nn.MultiheadAttention (weights copied across),
torch.softmax, and a naive attention that materialises the whole matrix.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scratchlm.attention import (
    CrossAttention,
    MultiHeadAttention,
    attention_weights,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from scratchlm.flash import memory_profile, naive_attention, online_softmax, tiled_attention

ATOL = 1e-5


def assert_close(ours, ref, atol=ATOL):
    diff = (ours - ref).abs().max().item()
    assert torch.allclose(ours, ref, atol=atol, rtol=0), f"max abs difference {diff:.2e} > {atol}"


def qkv(*shape, S=None, seed=0, dtype=torch.float32):
    """Random q (…, T, E), k and v (…, S, E)."""
    g = torch.Generator().manual_seed(seed)
    *batch, T, E = shape
    S = T if S is None else S
    return (torch.randn(*batch, T, E, generator=g, dtype=dtype), torch.randn(*batch, S, E, generator=g, dtype=dtype),
            torch.randn(*batch, S, E, generator=g, dtype=dtype))


def lengths_mask(lengths, T):
    """(B, T) attention_mask with 1 for the first `length` positions of each row, 0 after."""
    return (torch.arange(T) < torch.tensor(lengths)[:, None]).long()


# ---------------------------------------------------------------- the attention function

SHAPES = [(1, 1, 1, 4), (2, 3, 7, 8), (3, 4, 16, 32), (5, 13, 16)]  # the last one has a single batch axis


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_matches_torch(shape, is_causal):
    q, k, v = qkv(*shape)
    assert_close(scaled_dot_product_attention(q, k, v, is_causal=is_causal),
                 F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_padding_mask_matches_torch(is_causal):
    q, k, v = qkv(3, 2, 9, 8, seed=1)
    pad = padding_mask(lengths_mask([9, 6, 2], 9))  # (B, 1, 1, T)
    torch_mask = pad & causal_mask(9) if is_causal else pad
    assert_close(scaled_dot_product_attention(q, k, v, mask=pad, is_causal=is_causal),
                 F.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask))


def test_sdpa_float_mask_and_scale_match_torch():
    q, k, v = qkv(2, 3, 6, 8, seed=2)
    bias = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    assert_close(scaled_dot_product_attention(q, k, v, mask=bias), F.scaled_dot_product_attention(q, k, v, attn_mask=bias))
    assert_close(scaled_dot_product_attention(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_sdpa_fewer_queries_than_keys():
    q, k, v = qkv(2, 2, 3, 8, S=10, seed=4)
    assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    mask = causal_mask(3, 10)  # the 3 queries are the last 3 of 10 positions
    assert_close(scaled_dot_product_attention(q, k, v, mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    # the last query sees every key: same as no mask
    assert_close(scaled_dot_product_attention(q, k, v, mask=mask)[..., -1, :], scaled_dot_product_attention(q, k, v)[..., -1, :])


def test_sdpa_fully_masked_rows_are_zero_like_torch():
    q, k, v = qkv(1, 2, 4, 8, seed=5)
    mask = torch.tensor([[False] * 4, [True, False, False, False], [False] * 4, [True] * 4])
    ours = scaled_dot_product_attention(q, k, v, mask=mask)
    assert not ours.isnan().any()
    assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_sdpa_gradients_match_torch():
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 5, 8, seed=6))
    scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    for mine, ref in zip(ours, (q.grad, k.grad, v.grad), strict=True):
        assert_close(mine, ref, atol=1e-4)


def test_attention_weights_rows_sum_to_one_and_respect_the_mask():
    q, k, _ = qkv(2, 3, 6, 8, seed=7)
    w = attention_weights(q, k, is_causal=True)
    assert_close(w.sum(-1), torch.ones(2, 3, 6))
    assert (w[..., ~causal_mask(6)] == 0).all()


def test_sdpa_dropout_is_unbiased_and_off_at_zero():
    q, k, v = qkv(1, 2, 5, 4, seed=8)
    exact = scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0), exact)
    torch.manual_seed(0)
    draws = torch.stack([scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5) for _ in range(4000)])
    assert not torch.allclose(draws[0], exact)
    assert_close(draws.mean(0), exact, atol=0.1)


def test_causal_mask_against_its_definition():
    for T, S in [(1, 1), (4, 4), (3, 7), (5, 6)]:
        expected = torch.tensor([[s <= t + S - T for s in range(S)] for t in range(T)])
        assert torch.equal(causal_mask(T, S), expected)
    assert torch.equal(causal_mask(5), causal_mask(5, 5))


def test_padding_mask_shape_and_values():
    attention_mask = lengths_mask([3, 1], 4)
    pad = padding_mask(attention_mask)
    assert pad.shape == (2, 1, 1, 4) and pad.dtype == torch.bool
    assert torch.equal(pad[:, 0, 0], attention_mask.bool())


# ---------------------------------------------------------------- the layers


def mha_pair(d_model, n_heads, bias=True, seed=0):
    torch.manual_seed(seed)
    ours = MultiHeadAttention(d_model, n_heads, bias=bias).eval()
    ref = nn.MultiheadAttention(d_model, n_heads, bias=bias, batch_first=True).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.in_proj_weight)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        if bias:
            ours.qkv.bias.copy_(ref.in_proj_bias)
            ours.out_proj.bias.copy_(ref.out_proj.bias)
    return ours, ref


@pytest.mark.parametrize("d_model,n_heads,T,bias", [(16, 1, 5, True), (32, 4, 9, True), (48, 6, 12, False)])
def test_mha_matches_nn_multihead_attention(d_model, n_heads, T, bias):
    ours, ref = mha_pair(d_model, n_heads, bias=bias)
    x = torch.randn(3, T, d_model, generator=torch.Generator().manual_seed(1))
    attention_mask = lengths_mask([T, T - 2, 1], T)
    with torch.no_grad():
        assert_close(ours(x), ref(x, x, x, attn_mask=~causal_mask(T), need_weights=False)[0])
        assert_close(ours(x, mask=padding_mask(attention_mask)),
                     ref(x, x, x, attn_mask=~causal_mask(T), key_padding_mask=attention_mask == 0, need_weights=False)[0])
        ours.causal = False
        assert_close(ours(x, mask=padding_mask(attention_mask)),
                     ref(x, x, x, key_padding_mask=attention_mask == 0, need_weights=False)[0])


def test_mha_gradients_match_nn_multihead_attention():
    ours, ref = mha_pair(32, 4, seed=2)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    ours(x).square().sum().backward()
    ref(x, x, x, attn_mask=~causal_mask(7), need_weights=False)[0].square().sum().backward()
    assert_close(ours.qkv.weight.grad, ref.in_proj_weight.grad, atol=1e-4)
    assert_close(ours.out_proj.weight.grad, ref.out_proj.weight.grad, atol=1e-4)


def test_mha_dropout_only_in_training():
    torch.manual_seed(4)
    layer = MultiHeadAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 6, 16)
    layer.eval()
    with torch.no_grad():
        a, b = layer(x), layer(x)
        layer.train()
        c = layer(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("d_context", [24, 32])  # 32 == d_model: nn.MultiheadAttention uses in_proj_weight
def test_cross_attention_matches_nn_multihead_attention(d_context):
    torch.manual_seed(5)
    B, T, S, d_model, n_heads = 2, 5, 11, 32, 4
    ours = CrossAttention(d_model, n_heads, d_context=d_context).eval()
    ref = nn.MultiheadAttention(d_model, n_heads, kdim=d_context, vdim=d_context, batch_first=True).eval()
    C = d_model
    with torch.no_grad():
        if d_context == d_model:
            ours.q_proj.weight.copy_(ref.in_proj_weight[:C])
            ours.kv_proj.weight.copy_(ref.in_proj_weight[C:])
        else:
            ours.q_proj.weight.copy_(ref.q_proj_weight)
            ours.kv_proj.weight.copy_(torch.cat([ref.k_proj_weight, ref.v_proj_weight]))
        ours.q_proj.bias.copy_(ref.in_proj_bias[:C])
        ours.kv_proj.bias.copy_(ref.in_proj_bias[C:])
        ours.out_proj.load_state_dict(ref.out_proj.state_dict())
        x, context = torch.randn(B, T, d_model), torch.randn(B, S, d_context)
        context_mask = lengths_mask([S, 4], S)
        assert ours(x, context).shape == (B, T, d_model)
        assert_close(ours(x, context), ref(x, context, context, need_weights=False)[0])
        assert_close(ours(x, context, mask=padding_mask(context_mask)),
                     ref(x, context, context, key_padding_mask=context_mask == 0, need_weights=False)[0])


# ---------------------------------------------------------------- online softmax and tiled attention


@pytest.mark.parametrize("block_size", [1, 3, 16, 128, 1000])
def test_online_softmax_matches_torch(block_size):
    x = torch.randn(3, 5, 37, generator=torch.Generator().manual_seed(0)) * 10
    assert_close(online_softmax(x, block_size=block_size), torch.softmax(x, dim=-1))


def test_online_softmax_with_masked_entries():
    x = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    causal = x.masked_fill(torch.ones(6, 50, dtype=torch.bool).triu(1), float("-inf"))
    left_padded = x.masked_fill(torch.arange(50) < 20, float("-inf"))  # the first blocks are entirely -inf
    for scores in (causal, left_padded):
        assert_close(online_softmax(scores, block_size=8), torch.softmax(scores, dim=-1))


def test_online_softmax_does_not_overflow():
    x = torch.tensor([[1000.0, 1001.0, 999.0, -1000.0]])
    assert_close(online_softmax(x, block_size=1), torch.softmax(x, dim=-1))


@pytest.mark.parametrize("T,block_size", [(1, 8), (5, 128), (37, 16), (100, 32), (129, 64), (64, 64)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_tiled_matches_naive_and_torch(T, block_size, is_causal):
    q, k, v = qkv(2, 3, T, 16, seed=T)
    out = tiled_attention(q, k, v, block_size=block_size, is_causal=is_causal)
    assert_close(out, naive_attention(q, k, v, is_causal=is_causal))
    assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=is_causal))


def test_tiled_with_more_keys_than_queries_and_other_value_width():
    q, k, _ = qkv(2, 2, 33, 16, S=129, seed=9)
    v = torch.randn(2, 2, 129, 24)
    assert_close(tiled_attention(q, k, v, block_size=32), F.scaled_dot_product_attention(q, k, v))


def test_tiled_large_scores_do_not_overflow():
    q, k, v = qkv(1, 2, 90, 64, seed=10)
    q, k = q * 4, k * 4  # scores in the hundreds with scale=1
    assert_close(tiled_attention(q, k, v, block_size=32, is_causal=True, scale=1.0),
                 naive_attention(q, k, v, is_causal=True, scale=1.0))


def test_tiled_keeps_the_input_dtype():
    q, k, v = qkv(1, 2, 40, 8, seed=11, dtype=torch.float64)
    out = tiled_attention(q, k, v, block_size=16, is_causal=True)
    assert out.dtype == torch.float64
    assert_close(out, naive_attention(q, k, v, is_causal=True), atol=1e-12)
    assert tiled_attention(*(t.bfloat16() for t in (q, k, v)), block_size=16).dtype == torch.bfloat16


def test_memory_profile_counts_what_it_should():
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    peak, largest = memory_profile(lambda: a @ b)
    assert peak == largest == 256 * 256 * 4


def test_tiled_never_materialises_the_matrix():
    q, k, v = qkv(1, 4, 512, 32, seed=12)
    matrix, output = 4 * 512 * 512 * 4, 4 * 512 * 32 * 4
    naive_peak, naive_largest = memory_profile(lambda: naive_attention(q, k, v, is_causal=True))
    tiled_peak, tiled_largest = memory_profile(lambda: tiled_attention(q, k, v, block_size=64, is_causal=True))
    assert naive_largest >= matrix
    assert tiled_largest <= output
    assert tiled_peak < naive_peak / 4


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("make,error,message", [
    (lambda: MultiHeadAttention(100, 3), ValueError, "d_model=100 is not divisible by n_heads=3"),
    (lambda: MultiHeadAttention(64, 0), ValueError, "must be positive"),
    (lambda: MultiHeadAttention(64, 4, dropout=1.5), ValueError, "dropout is a probability"),
    (lambda: CrossAttention(30, 4), ValueError, "d_model=30 is not divisible by n_heads=4"),
    (lambda: MultiHeadAttention(64, 4)(torch.randn(2, 5, 32)), ValueError, r"shape \(batch, seq_len, 64\)"),
    (lambda: MultiHeadAttention(64, 4)(torch.randn(5, 64)), ValueError, r"got \(5, 64\)"),
    (lambda: CrossAttention(64, 4, d_context=16)(torch.randn(2, 5, 64), torch.randn(2, 7, 64)), ValueError,
     "context of shape"),
    (lambda: CrossAttention(64, 4)(torch.randn(2, 5, 64), torch.randn(3, 7, 64)), ValueError, "same batch size"),
    (lambda: scaled_dot_product_attention(*qkv(1, 4, 8)[:1], *qkv(1, 4, 6)[1:]), ValueError, "same head dimension"),
    (lambda: scaled_dot_product_attention(torch.randn(1, 4, 8), torch.randn(1, 4, 8), torch.randn(1, 5, 8)),
     ValueError, "same number of positions"),
    (lambda: scaled_dot_product_attention(torch.randn(8), torch.randn(8), torch.randn(8)), ValueError, "must have shape"),
    (lambda: scaled_dot_product_attention(*qkv(1, 2, 8, S=4), is_causal=True), ValueError, "causal_mask"),
    (lambda: scaled_dot_product_attention(*qkv(1, 4, 8), mask=torch.ones(4, 4, dtype=torch.long)), TypeError,
     "padding_mask"),
    (lambda: scaled_dot_product_attention(*qkv(1, 4, 8), mask=torch.ones(3, 3, dtype=torch.bool)), ValueError,
     "does not broadcast"),
    (lambda: scaled_dot_product_attention(*qkv(1, 4, 8), dropout_p=-0.1), ValueError, "dropout_p is a probability"),
    (lambda: causal_mask(5, 3), ValueError, "1 <= T <= S"),
    (lambda: padding_mask(torch.ones(2, 1, 4)), ValueError, r"\(batch, seq_len\)"),
    (lambda: tiled_attention(*qkv(1, 4, 8), block_size=0), ValueError, "block_size"),
    (lambda: tiled_attention(*qkv(1, 2, 8, S=4), is_causal=True), ValueError, "as many queries as keys"),
    (lambda: tiled_attention(torch.randn(1, 4, 8), torch.randn(1, 4, 6), torch.randn(1, 4, 6)), ValueError,
     "same head dimension"),
    (lambda: online_softmax(torch.randn(3, 4), block_size=0), ValueError, "block_size"),
    (lambda: online_softmax(torch.tensor(1.0)), ValueError, "at least one element"),
])
def test_bad_input_raises_a_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()
