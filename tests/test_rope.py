"""scratchlm.rope: frequencies and scalings, apply_rotary in both layouts, the layout permutation, RotaryEmbedding.

References: transformers' RoPE initialisation functions (ROPE_INIT_FUNCTIONS and LlamaRotaryEmbedding's default),
LlamaRotaryEmbedding, Gemma3RotaryEmbedding and apply_rotary_pos_emb; Meta's complex-number formulation of the
interleaved layout, written out here. Tiny configs, no downloads.
"""

import math

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from scratchlm.rope import (
    ROPE_TYPES,
    RopeScaling,
    RotaryEmbedding,
    apply_rotary,
    default_inv_freq,
    interleaved_to_half_permutation,
    ntk_aware_base,
    rope_frequencies,
)


def llama_config(head_dim, base, rope_parameters=None, max_position_embeddings=4096, n_heads=2):
    params = {"rope_type": "default", **(rope_parameters or {}), "rope_theta": base}
    return LlamaConfig(hidden_size=n_heads * head_dim, num_attention_heads=n_heads, num_key_value_heads=n_heads,
                       head_dim=head_dim, max_position_embeddings=max_position_embeddings, rope_parameters=params)


def hf_rope(head_dim, base, rope_parameters=None, max_position_embeddings=4096, seq_len=None):
    config = llama_config(head_dim, base, rope_parameters, max_position_embeddings)
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)


def meta_rope(x, positions, inv_freq):
    """Meta's interleaved RoPE: pairs (2i, 2i+1) as complex numbers times e^(i m theta), in float64."""
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2))
    angles = positions[:, None].double() * inv_freq.double()
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2).to(x.dtype)


def cos_sin(positions, inv_freq):
    angles = positions[:, None].to(inv_freq.dtype) * inv_freq
    return angles.cos(), angles.sin()


SCALED_CASES = [  # head_dim, base, rope_parameters (HF keys), max_position_embeddings, seq_len
    (64, 10000.0, {"rope_type": "linear", "factor": 4.0}, 4096, None),
    (128, 500000.0, {"rope_type": "linear", "factor": 2.5}, 4096, None),
    (64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096, None),
    (64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096, 1000),
    (64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, 4096, 12288),
    (128, 500000.0, {"rope_type": "dynamic", "factor": 8.0}, 2048, 20480),
    (128, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}, 131072, None),
    (64, 500000.0, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}, 131072, None),
    (32, 10000.0, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0,
                   "original_max_position_embeddings": 1024}, 4096, None),
    (128, 1000000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072, None),
    (64, 10000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 1.0,
                   "original_max_position_embeddings": 4096}, 163840, None),
    (64, 10000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32,
                   "beta_slow": 1, "original_max_position_embeddings": 4096}, 163840, None),
    (64, 150000.0, {"rope_type": "yarn", "factor": 32.0, "truncate": False,
                    "original_max_position_embeddings": 4096}, 131072, None),
    (32, 10000.0, {"rope_type": "yarn", "factor": 8.0, "attention_factor": 0.5, "beta_fast": 16.0, "beta_slow": 2.0,
                   "original_max_position_embeddings": 2048}, 16384, None),
    (16, 10000.0, {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}, 128, None),
]


@pytest.mark.parametrize("head_dim, base", [(64, 10000.0), (128, 500000.0), (256, 1000000.0), (2, 10000.0)])
def test_default_frequencies_match_transformers(head_dim, base):
    ref, factor = hf_rope(head_dim, base)
    ours, our_factor = rope_frequencies(head_dim, base)
    assert torch.equal(ours, ref) and torch.equal(default_inv_freq(head_dim, base), ref)
    assert our_factor == factor == 1.0
    torch.testing.assert_close(rope_frequencies(head_dim, base, dtype=torch.float64)[0], ref.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("head_dim, base, params, max_pos, seq_len", SCALED_CASES,
                         ids=[f"{c[2]['rope_type']}-{i}" for i, c in enumerate(SCALED_CASES)])
def test_scaled_frequencies_and_attention_factor_match_transformers(head_dim, base, params, max_pos, seq_len):
    ref, ref_factor = hf_rope(head_dim, base, params, max_pos, seq_len)
    inv32, factor = rope_frequencies(head_dim, base, RopeScaling.from_hf(params), max_pos, seq_len=seq_len)
    inv64, factor64 = rope_frequencies(head_dim, base, params, max_pos, seq_len=seq_len, dtype=torch.float64)
    torch.testing.assert_close(inv32, ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(inv64, ref.double(), atol=1e-6, rtol=0)
    assert torch.equal(inv32, ref)  # the same float32 operations in the same order
    assert math.isclose(factor, ref_factor, rel_tol=1e-12) and factor == factor64


def test_dynamic_equals_static_ntk_with_the_implied_alpha_and_default_below_the_context():
    alpha = 2.0 * 10240 / 4096 - 1.0
    dynamic, _ = rope_frequencies(64, 10000.0, RopeScaling("dynamic", factor=2.0), 4096, seq_len=10240)
    assert torch.equal(dynamic, default_inv_freq(64, ntk_aware_base(10000.0, 64, alpha)))
    short, _ = rope_frequencies(64, 10000.0, RopeScaling("dynamic", factor=2.0), 4096, seq_len=4000)
    assert torch.equal(short, default_inv_freq(64))


def test_rope_scaling_from_hf_follows_transformers_defaults():
    assert RopeScaling.from_hf(None) == RopeScaling()
    assert RopeScaling.from_hf({"rope_type": "default", "rope_theta": 1e6}) == RopeScaling()
    assert RopeScaling.from_hf({"type": "linear", "factor": 2.0}) == RopeScaling("linear", factor=2.0)  # legacy key
    assert RopeScaling.from_hf({"rope_type": "yarn", "factor": 4.0, "beta_fast": None},
                               max_position_embeddings=1024) == RopeScaling("yarn", 4.0, 1024)
    assert RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 1.0}).factor == 2.0
    # transformers fills a missing original_max_position_embeddings from max_position_embeddings too
    params = {"rope_type": "yarn", "factor": 4.0}
    ref, ref_factor = hf_rope(32, 10000.0, dict(params), max_position_embeddings=512)
    ours, factor = rope_frequencies(32, 10000.0, params, max_position_embeddings=512)
    assert torch.equal(ours, ref) and factor == ref_factor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_half_matches_transformers(dtype):
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 3, 11, 32
    q, k = torch.randn(B, H, T, D, generator=g).to(dtype), torch.randn(B, H, T, D, generator=g).to(dtype)
    config = llama_config(D, 10000.0)
    hf_cos, hf_sin = LlamaRotaryEmbedding(config)(q, torch.arange(T)[None].expand(B, T))
    want_q, want_k = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = cos_sin(torch.arange(T), default_inv_freq(D))
    torch.testing.assert_close(torch.cat((cos, cos), -1).to(dtype).expand(B, T, D), hf_cos, atol=1e-6, rtol=0)
    got_q, got_k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin, layout="half")
    assert got_q.dtype == dtype
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_apply_rotary_interleaved_matches_complex_formulation():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 9, 16, generator=g)
    positions, inv_freq = torch.arange(9), default_inv_freq(16)
    got = apply_rotary(x, *cos_sin(positions, inv_freq), layout="interleaved")
    torch.testing.assert_close(got, meta_rope(x, positions, inv_freq), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
@pytest.mark.parametrize("scaling", [None, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}])
def test_scores_depend_only_on_the_offset(layout, scaling):
    g = torch.Generator().manual_seed(2)
    D = 64
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    inv_freq, _ = rope_frequencies(D, 10000.0, scaling, max_position_embeddings=2048, dtype=torch.float64)

    def score(m, n):
        cq, sq = cos_sin(torch.tensor([m]), inv_freq)
        ck, sk = cos_sin(torch.tensor([n]), inv_freq)
        return (apply_rotary(q[None], cq, sq, layout) * apply_rotary(k[None], ck, sk, layout)).sum()

    reference = score(3, 17)
    for shift in (1, 7, 100, 5000):
        torch.testing.assert_close(score(3 + shift, 17 + shift), reference, atol=1e-9, rtol=0)
    assert not torch.allclose(score(3, 18), reference)  # a different offset gives a different score


def test_permuted_projection_in_half_layout_equals_meta_interleaved():
    g = torch.Generator().manual_seed(3)
    dim, n_heads, D, T = 24, 3, 8, 10
    x = torch.randn(1, T, dim, generator=g)
    wq, wk = torch.randn(n_heads * D, dim, generator=g), torch.randn(n_heads * D, dim, generator=g)
    positions, inv_freq = torch.arange(T), default_inv_freq(D)

    def heads(t):
        return t.view(1, T, n_heads, D).transpose(1, 2)

    q_meta, k_meta = meta_rope(heads(x @ wq.T), positions, inv_freq), meta_rope(heads(x @ wk.T), positions, inv_freq)
    perm = interleaved_to_half_permutation(D, n_heads)
    hf_cos, hf_sin = LlamaRotaryEmbedding(llama_config(D, 10000.0, n_heads=n_heads))(x, positions[None])
    q_hf, k_hf = apply_rotary_pos_emb(heads(x @ wq[perm].T), heads(x @ wk[perm].T), hf_cos, hf_sin)
    torch.testing.assert_close(q_hf, q_meta[..., interleaved_to_half_permutation(D)], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q_hf @ k_hf.transpose(-1, -2), q_meta @ k_meta.transpose(-1, -2), atol=1e-4, rtol=1e-5)
    # and with our own apply_rotary in both layouts
    cos, sin = cos_sin(positions, inv_freq)
    ours_half = apply_rotary(heads(x @ wq[perm].T), cos, sin, "half")
    ours_interleaved = apply_rotary(heads(x @ wq.T), cos, sin, "interleaved")
    torch.testing.assert_close(ours_half, ours_interleaved[..., interleaved_to_half_permutation(D)], atol=1e-6, rtol=0)


def test_permutation_values_and_inverse():
    assert interleaved_to_half_permutation(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    perm = interleaved_to_half_permutation(6, n_heads=2)
    assert perm.tolist() == [0, 2, 4, 1, 3, 5, 6, 8, 10, 7, 9, 11]
    by_reshape = torch.arange(4 * 16).view(4, 8, 2).transpose(1, 2).reshape(-1)  # the reshape form of the conversion
    assert torch.equal(interleaved_to_half_permutation(16, 4), by_reshape)
    w = torch.randn(12, 3)
    assert torch.equal(w[perm][perm.argsort()], w)


@pytest.mark.parametrize("head_dim, base, params, max_pos", [
    (32, 10000.0, {"rope_type": "default"}, 2048),
    (64, 500000.0, SCALED_CASES[6][2], 131072),
    (32, 1000000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}, 1024),
    (32, 10000.0, {"rope_type": "linear", "factor": 8.0}, 1024),
])
def test_rotary_embedding_tables_match_llama_rotary_embedding(head_dim, base, params, max_pos):
    T = 600
    hf_cos, hf_sin = LlamaRotaryEmbedding(llama_config(head_dim, base, params, max_pos))(torch.zeros(1), torch.arange(T)[None])
    rope = RotaryEmbedding(head_dim, base, params, max_position_embeddings=max_pos)
    cos, sin = rope(T)
    assert cos.shape == (T, head_dim // 2)
    torch.testing.assert_close(cos, hf_cos[0, :, : head_dim // 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, hf_sin[0, :, : head_dim // 2], atol=1e-6, rtol=0)
    torch.testing.assert_close(hf_cos[0, :, head_dim // 2 :], hf_cos[0, :, : head_dim // 2])  # HF duplicates the halves


@pytest.mark.parametrize("length", [100, 256, 700])
def test_rotary_embedding_dynamic_matches_transformers_beyond_the_context(length):
    params = {"rope_type": "dynamic", "factor": 2.0}
    hf_cos, hf_sin = LlamaRotaryEmbedding(llama_config(32, 10000.0, params, 256))(torch.zeros(1), torch.arange(length)[None])
    rope = RotaryEmbedding(32, 10000.0, params, max_position_embeddings=256)
    for cos, sin in (rope(length), rope.for_positions(torch.arange(length))):
        torch.testing.assert_close(cos, hf_cos[0, :, :16], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, hf_sin[0, :, :16], atol=1e-6, rtol=0)


def test_rotary_embedding_offset_decoding_and_positions():
    rope = RotaryEmbedding(16, 10000.0)
    cos, sin = rope(300)  # grows past its first allocation
    rows = [rope(1, offset=t) for t in range(300)]
    assert torch.equal(torch.cat([c for c, _ in rows]), cos) and torch.equal(torch.cat([s for _, s in rows]), sin)
    chunk_cos, _ = rope(5, offset=40)
    assert torch.equal(chunk_cos, cos[40:45])
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])  # e.g. two sequences at different offsets
    by_position, _ = rope.for_positions(positions)
    assert by_position.shape == (2, 4, 8) and torch.equal(by_position, cos[positions])
    assert list(rope.state_dict()) == []  # tables are not checkpoint contents


def test_rotary_embedding_offset_chunks_in_bfloat16_match_transformers():
    g = torch.Generator().manual_seed(4)
    B, H, T, D = 2, 2, 12, 32
    q = torch.randn(B, H, T, D, generator=g).bfloat16()
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}
    rope = RotaryEmbedding(D, 10000.0, params, max_position_embeddings=1024)
    got = torch.cat((apply_rotary(q[:, :, :5], *rope(5)), apply_rotary(q[:, :, 5:], *rope(T - 5, offset=5))), dim=2)
    hf_cos, hf_sin = LlamaRotaryEmbedding(llama_config(D, 10000.0, params, 1024))(q, torch.arange(T)[None].expand(B, T))
    want, _ = apply_rotary_pos_emb(q, q, hf_cos, hf_sin)
    assert torch.equal(got, want)


def test_rotary_embedding_rebuilds_float32_tables_after_a_cast():
    fresh = RotaryEmbedding(64, 500000.0)
    rope = RotaryEmbedding(64, 500000.0).to(torch.bfloat16)
    assert rope.inv_freq.dtype == torch.bfloat16
    cos, _ = rope(1000)
    assert rope.inv_freq.dtype == torch.float32 and cos.dtype == torch.float32
    assert torch.equal(rope.inv_freq, fresh.inv_freq) and torch.equal(cos, fresh(1000)[0])


def test_per_layer_bases_match_gemma3():
    rope_parameters = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                       "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}
    config = Gemma3TextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                              max_position_embeddings=1024, rope_parameters=rope_parameters)
    gemma = Gemma3RotaryEmbedding(config)
    for layer_type, params in rope_parameters.items():
        hf_cos, hf_sin = gemma(torch.zeros(1), torch.arange(200)[None], layer_type)
        cos, sin = RotaryEmbedding(32, params["rope_theta"], params, max_position_embeddings=1024)(200)
        torch.testing.assert_close(cos, hf_cos[0, :, :16], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, hf_sin[0, :, :16], atol=1e-6, rtol=0)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="head_dim=63 must be even for RoPE"):
        rope_frequencies(63)
    with pytest.raises(ValueError, match="head_dim=63 must be even for RoPE"):
        RotaryEmbedding(63)
    with pytest.raises(ValueError, match="head_dim=7 must be even for RoPE"):
        interleaved_to_half_permutation(7)
    with pytest.raises(ValueError, match="must be a positive integer"):
        default_inv_freq(0)
    supported = ", ".join(ROPE_TYPES)
    with pytest.raises(ValueError, match=f"rope_type='longrope' is not supported; use one of {supported}"):
        RopeScaling.from_hf({"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="rope_type='longrope' is not supported"):  # with keys only longrope has
        RopeScaling.from_hf({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]})
    with pytest.raises(ValueError, match="rope_type='ntk' is not supported"):
        rope_frequencies(64, scaling={"type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type='llama3' needs low_freq_factor, high_freq_factor, original_max"):
        RopeScaling.from_hf({"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="rope_type='yarn' needs original_max_position_embeddings"):
        RopeScaling("yarn", factor=4.0)
    with pytest.raises(ValueError, match="rope_type='linear' needs factor"):
        RopeScaling.from_hf({"rope_type": "linear"})
    with pytest.raises(ValueError, match=r"keys \['low_freq_factor'\] are not used by rope_type='linear'"):
        RopeScaling.from_hf({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        RopeScaling.from_hf({"rope_type": "default", "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="high_freq_factor > low_freq_factor"):
        RopeScaling("llama3", 8.0, 8192, low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match="factor=-2.0 must be positive"):
        RopeScaling("linear", factor=-2.0)
    with pytest.raises(ValueError, match="rope_type='dynamic' needs max_position_embeddings"):
        rope_frequencies(64, scaling=RopeScaling("dynamic", factor=2.0))
    with pytest.raises(TypeError, match="scaling must be None, a RopeScaling or a rope_parameters dict"):
        rope_frequencies(64, scaling="linear")
    with pytest.raises(ValueError, match="layout='meta' is not a RoPE layout; use one of half, interleaved"):
        apply_rotary(torch.randn(3, 8), torch.ones(3, 4), torch.ones(3, 4), layout="meta")
    with pytest.raises(ValueError, match="x has head_dim 8, so cos and sin need a last dimension of 4"):
        apply_rotary(torch.randn(3, 8), torch.ones(3, 8), torch.ones(3, 8))
    with pytest.raises(ValueError, match="must not be negative"):
        RotaryEmbedding(8)(4, offset=-1)
