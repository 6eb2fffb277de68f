"""scratchlm.layers: RMSNorm (Llama and Gemma forms), GatedMLP (SwiGLU, GeGLU), llama_hidden_dim, DyT.

References: torch's nn.RMSNorm, and transformers' LlamaRMSNorm, Gemma3RMSNorm, LlamaMLP, Gemma3MLP
built from tiny configs (no downloads); DyT against its formula written with torch ops and torch's gradcheck.
"""

import pytest
import torch
import torch.nn as nn
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP, Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from scratchlm.layers import DyT, GatedMLP, RMSNorm, llama_hidden_dim

DIM = 48


@pytest.fixture
def x():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, DIM, generator=g) * 2.5 + 0.7


@pytest.fixture
def random_weight():
    g = torch.Generator().manual_seed(1)
    return torch.rand(DIM, generator=g) + 0.5


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rmsnorm_matches_torch_and_llama(x, random_weight, eps):
    ours, builtin, llama = RMSNorm(DIM, eps=eps), nn.RMSNorm(DIM, eps=eps), LlamaRMSNorm(DIM, eps=eps)
    ours.weight.data.copy_(random_weight)
    builtin.load_state_dict(ours.state_dict())
    llama.load_state_dict(ours.state_dict())
    with torch.no_grad():
        y = ours(x)
        torch.testing.assert_close(y, builtin(x), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(y, llama(x), atol=1e-6, rtol=1e-5)
    assert y.shape == x.shape


def test_rmsnorm_bfloat16_is_bit_identical_to_llama(x, random_weight):
    ours, llama = RMSNorm(DIM).bfloat16(), LlamaRMSNorm(DIM).bfloat16()
    ours.weight.data.copy_(random_weight)
    llama.weight.data.copy_(random_weight)
    with torch.no_grad():
        y = ours(x.bfloat16())
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, llama(x.bfloat16()))


def test_rmsnorm_defaults_and_rms_of_output(x):
    norm = RMSNorm(DIM)
    assert norm.eps == 1e-6 and torch.equal(norm.weight, torch.ones(DIM))
    with torch.no_grad():
        rms = norm(x).pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma_rmsnorm_matches_gemma3(x, dtype):
    g = torch.Generator().manual_seed(2)
    offset = torch.randn(DIM, generator=g) * 0.2
    ours, gemma = RMSNorm(DIM, unit_offset=True), Gemma3RMSNorm(DIM, eps=1e-6)
    assert torch.equal(ours.weight, gemma.weight)  # both start at zeros
    ours.weight.data.copy_(offset)
    gemma.load_state_dict(ours.state_dict())
    ours, gemma = ours.to(dtype), gemma.to(dtype)
    with torch.no_grad():
        y, want = ours(x.to(dtype)), gemma(x.to(dtype))
    if dtype == torch.float32:
        torch.testing.assert_close(y, want, atol=1e-6, rtol=1e-5)
    else:
        assert torch.equal(y, want)


def test_gemma_rmsnorm_is_plain_rmsnorm_with_one_plus_weight(x):
    g = torch.Generator().manual_seed(3)
    offset = torch.randn(DIM, generator=g) * 0.2
    gemma, plain = RMSNorm(DIM, unit_offset=True), RMSNorm(DIM)
    gemma.weight.data.copy_(offset)
    plain.weight.data.copy_(1 + offset)
    with torch.no_grad():
        torch.testing.assert_close(gemma(x), plain(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_matches_llama_mlp(x, bias):
    torch.manual_seed(0)
    hf = LlamaMLP(LlamaConfig(hidden_size=DIM, intermediate_size=136, num_attention_heads=4, hidden_act="silu", mlp_bias=bias))
    ours = GatedMLP(DIM, 136, activation="silu", bias=bias)
    ours.load_state_dict(hf.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-5)


def test_gated_mlp_gelu_tanh_matches_gemma3_mlp(x):
    torch.manual_seed(0)
    config = Gemma3TextConfig(hidden_size=DIM, intermediate_size=72)
    assert config.hidden_activation == "gelu_pytorch_tanh"
    hf = Gemma3MLP(config)
    for activation in ("gelu_tanh", config.hidden_activation):  # our name and the HF alias
        ours = GatedMLP(DIM, 72, activation=activation)
        ours.load_state_dict(hf.state_dict(), strict=True)
        with torch.no_grad():
            torch.testing.assert_close(ours(x), hf(x), atol=1e-6, rtol=1e-5)


def test_gated_mlp_parameter_names_and_count():
    mlp = GatedMLP(16, 40)
    assert list(mlp.state_dict()) == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert sum(p.numel() for p in mlp.parameters()) == 3 * 16 * 40


@pytest.mark.parametrize(
    "dim, multiple_of, multiplier, intermediate_size",
    [  # Meta's params.json values and the intermediate_size of the matching Hugging Face config.json
        (4096, 256, None, 11008),  # Llama 2 7B
        (5120, 256, None, 13824),  # Llama 2 13B
        (8192, 4096, 1.3, 28672),  # Llama 2 70B, Llama 3 70B
        (4096, 1024, 1.3, 14336),  # Llama 3 8B
        (16384, 4096, 1.2, 53248),  # Llama 3.1 405B
        (2048, 256, 1.5, 8192),  # Llama 3.2 1B
        (3072, 256, 1.0, 8192),  # Llama 3.2 3B
    ],
)
def test_llama_hidden_dim_matches_released_models(dim, multiple_of, multiplier, intermediate_size):
    assert llama_hidden_dim(dim, multiple_of, multiplier) == intermediate_size


def test_llama_hidden_dim_keeps_gelu_parameter_count_before_rounding():
    for dim in (96, 192, 768):  # multiples of 3: 8d/3 is an integer, and multiple_of=1 rounds nothing
        hidden = llama_hidden_dim(dim, 1)
        assert 3 * dim * hidden == 2 * dim * 4 * dim


def test_bad_input_errors():
    with pytest.raises(ValueError, match="activation='relu' is not supported; use one of silu, gelu_tanh"):
        GatedMLP(8, 16, activation="relu")
    with pytest.raises(ValueError, match="positive sizes"):
        GatedMLP(8, 0)
    with pytest.raises(ValueError, match="positive dim"):
        RMSNorm(0)
    with pytest.raises(ValueError, match=r"RMSNorm\(dim=8\) got an input whose last dimension is 7"):
        RMSNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="multiple_of must be positive"):
        llama_hidden_dim(4096, 0)


def test_dyt_parameters_and_initial_values():
    dyt = DyT(DIM)
    assert {name: tuple(p.shape) for name, p in dyt.named_parameters()} == {"alpha": (1,), "weight": (DIM,), "bias": (DIM,)}
    assert dyt.alpha.item() == 0.5 and DyT(DIM, alpha_init=2).alpha.item() == 2.0
    assert torch.equal(dyt.weight, torch.ones(DIM)) and torch.equal(dyt.bias, torch.zeros(DIM))


def test_dyt_matches_its_formula(x, random_weight):
    dyt = DyT(DIM, alpha_init=0.8)
    bias = torch.linspace(-1, 1, DIM)
    with torch.no_grad():
        dyt.weight.copy_(random_weight)
        dyt.bias.copy_(bias)
        expected = random_weight * torch.tanh(0.8 * x) + bias
        torch.testing.assert_close(dyt(x), expected)
        assert dyt(x).shape == x.shape


def test_dyt_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(2)
    dyt = DyT(6, alpha_init=0.7).double()
    params = {name: (torch.rand(p.shape, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
              for name, p in dyt.named_parameters()}
    inputs = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_()

    def f(inp, alpha, weight, bias):
        return torch.func.functional_call(dyt, {"alpha": alpha, "weight": weight, "bias": bias}, (inp,))

    assert torch.autograd.gradcheck(f, (inputs, params["alpha"], params["weight"], params["bias"]))


def test_dyt_replaces_rmsnorm_and_trains():
    # swapped into a block's place: the output keeps its shape, and every DyT parameter gets a gradient
    model = nn.Sequential(nn.Linear(8, 8), DyT(8), nn.Linear(8, 3))
    model(torch.randn(4, 8)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model[1].parameters())


@pytest.mark.parametrize("dim", [0, -3, 2.5, "8", True, None])
def test_dyt_bad_dim(dim):
    with pytest.raises(ValueError, match="DyT needs an integer dim >= 1"):
        DyT(dim)


@pytest.mark.parametrize("alpha_init", [0.0, -0.5, float("nan"), float("inf"), "0.5", None])
def test_dyt_bad_alpha_init(alpha_init):
    with pytest.raises(ValueError, match="DyT needs a positive finite alpha_init"):
        DyT(8, alpha_init=alpha_init)


def test_dyt_wrong_input_width():
    with pytest.raises(ValueError, match=r"DyT\(dim=8\) got an input whose last dimension is 7"):
        DyT(8)(torch.randn(2, 7))
