"""scratchlm.moe: routers, the three dispatches, balancing losses, capacity, and Qwen3-MoE against transformers.

References: transformers' Qwen3MoeSparseMoeBlock and Qwen3MoeForCausalLM with eager experts (their logits, aux_loss
and generate), load_balancing_loss_func, and the Switch Transformers router_z_loss_func. Random tiny models, saved
with save_pretrained (per-expert tensors) and also in the stacked layout; no downloads. Noisy top-k gating
(Shazeer et al., 2017) has no library reference: direct computations and a Monte Carlo estimate instead.
"""

import json

import pytest
import torch
from hf_checkpoints import assert_greedy_matches, checkpoint_cache, jitter_norms, random_ids
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig as HFQwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeSparseMoeBlock,
    load_balancing_loss_func,
)
from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

import scratchlm
from scratchlm.gpt import CheckpointMismatchError, from_hf
from scratchlm.moe import (
    DISPATCHES,
    Experts,
    NoisyTopKRouter,
    Qwen3Moe,
    Qwen3MoeConfig,
    SparseMoE,
    TopKRouter,
    dispatch_grouped,
    dispatch_loop,
    dispatch_sorted,
    expert_capacity,
    expert_positions,
    grouped_mm_usable,
    importance_loss,
    load_balancing_loss,
    load_loss,
    router_z_loss,
    smooth_load,
)


def routed_inputs(T=96, d=32, I=16, E=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).requires_grad_()
    gate_up = (torch.randn(E, 2 * I, d, generator=g) * 0.2).requires_grad_()
    down = (torch.randn(E, d, I, generator=g) * 0.2).requires_grad_()
    weights, experts = torch.randn(T, E, generator=g).softmax(-1).topk(k, dim=-1)
    return x, experts, weights.requires_grad_(), gate_up, down


def outputs_and_grads(fn, x, experts, weights, gate_up, down, **kwargs):
    y = fn(x, experts, weights, gate_up, down, **kwargs)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    return [y, *torch.autograd.grad(y, (x, weights, gate_up, down), upstream, allow_unused=True)]


@pytest.mark.parametrize("E,k", [(1, 1), (4, 1), (8, 2), (16, 4), (64, 8)])
def test_sorted_and_grouped_dispatch_equal_the_loop_with_gradients(E, k):
    inputs = routed_inputs(E=E, k=k)
    expected = outputs_and_grads(dispatch_loop, *inputs)
    candidates = [dispatch_sorted]
    if grouped_mm_usable(inputs[0], inputs[3], inputs[4]):
        candidates.append(dispatch_grouped)
    for fn in candidates:
        for want, got in zip(expected, outputs_and_grads(fn, *inputs), strict=True):
            # float32 rounding scales with the values: with two threads, 64 experts' gate_up gradient (entries up
            # to ~26) differs from the loop's by 1.7e-6, a relative 7e-8; the bound is 1e-6 of the largest entry
            scale = max(1.0, want.abs().max().item())
            assert (want - got).abs().max().item() < 1e-6 * scale, fn.__name__


def test_expert_positions_follow_token_order():
    positions, load = expert_positions(torch.tensor([[0, 1], [1, 2], [0, 1]]), 3)
    assert positions.tolist() == [[0, 0], [1, 0], [1, 2]] and load.tolist() == [2, 3, 1]
    experts = torch.randint(0, 8, (50, 1), generator=torch.Generator().manual_seed(0))
    positions, load = expert_positions(experts, 8)
    for e in range(8):  # within each expert: 0, 1, 2, ... in token order
        assert positions[experts == e].tolist() == list(range(load[e].item()))


def test_capacity_drops_the_later_slots_of_overloaded_experts():
    x, experts, weights, gate_up, down = routed_inputs(E=4, k=2)
    capacity = expert_capacity(x.shape[0], 4, 2, capacity_factor=1.0)
    assert capacity == 48
    positions, load = expert_positions(experts, 4)
    dropped = positions >= capacity
    assert dropped.any() and load.max() > capacity
    with torch.no_grad():
        expected = dispatch_loop(x, experts, weights.masked_fill(dropped, 0.0), gate_up, down)
        got = dispatch_sorted(x, experts, weights, gate_up, down, capacity=capacity)
    assert (got - expected).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 4, 2, 0.0)


def hf_block(E, k, norm, d=32, I=24, seed=0):
    config = HFQwen3MoeConfig(hidden_size=d, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                              norm_topk_prob=norm)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("E,k,norm", [(8, 2, True), (8, 2, False), (16, 4, True), (4, 1, False), (6, 6, True)])
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_sparse_moe_matches_qwen3_moe_sparse_block(E, k, norm, dispatch):
    reference = hf_block(E, k, norm)
    ours = SparseMoE(32, E, k, 24, norm_topk_prob=norm, dispatch=dispatch)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() < 1e-6
        logits, weights, experts = reference.gate(x.view(-1, 32))
    assert torch.equal(ours.router_logits, logits) and torch.equal(ours.expert_indices, experts)


def test_router_weights_are_renormalised_softmax_of_the_kept_logits():
    router = TopKRouter(16, 8, 3, norm_topk_prob=True)
    x = torch.randn(20, 16)
    logits, weights, experts = router(x)
    assert torch.allclose(weights, logits.gather(1, experts).softmax(-1), atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(20))
    with pytest.raises(ValueError, match="top_k=9"):
        TopKRouter(16, 8, 9)


def test_load_balancing_loss_matches_transformers_pooled_over_layers():
    g = torch.Generator().manual_seed(0)
    layers = tuple(torch.randn(40, 8, generator=g) * 2 for _ in range(3))
    for k in (1, 2, 4):
        expected = load_balancing_loss_func(layers, 8, k)
        assert abs(load_balancing_loss(layers, k).item() - expected.item()) < 1e-6
        assert abs(load_balancing_loss(list(layers), k).item() - expected.item()) < 1e-6
    per_layer = torch.stack([load_balancing_loss(lg, 2) for lg in layers]).mean()
    assert abs(per_layer.item() - load_balancing_loss(layers, 2).item()) > 1e-3  # pooling is not a mean


def test_load_balancing_loss_is_k_when_balanced_and_e_when_collapsed():
    T, E = 64, 8
    for k in (1, 2, 4):
        balanced = torch.zeros(T, E)
        for j in range(k):
            balanced[torch.arange(T), (torch.arange(T) + j) % E] = 4.0
        assert abs(load_balancing_loss(balanced, k).item() - k) < 1e-5
    collapsed = torch.full((T, E), -30.0)
    collapsed[:, 0] = 0.0
    assert abs(load_balancing_loss(collapsed, 1).item() - E) < 1e-5


def test_router_z_loss_matches_switch_transformers():
    logits = torch.randn(2, 30, 8, generator=torch.Generator().manual_seed(0)) * 3
    expected = router_z_loss_func(logits)
    assert abs(router_z_loss(logits.view(-1, 8)).item() - expected.item()) < 1e-5
    assert abs(router_z_loss([logits[0], logits[1]]).item() - expected.item()) < 1e-5


def test_switch_loss_gradient_lowers_the_overloaded_expert():
    logits = torch.zeros(32, 4)
    logits[:, 0] = 2.0  # every token prefers expert 0
    logits.requires_grad_()
    load_balancing_loss(logits, 1).backward()
    assert (logits.grad[:, 0] > 0).all()  # gradient descent lowers expert 0's logits
    assert (logits.grad[:, 1:] < 0).all()


def test_experts_dispatch_and_activation_checks():
    with pytest.raises(ValueError, match="dispatch='scatter'"):
        Experts(4, 8, 8, dispatch="scatter")
    with pytest.raises(ValueError, match="activation='relu'"):
        Experts(4, 8, 8, activation="relu")
    with pytest.raises(ValueError, match="positive sizes"):
        Experts(0, 8, 8)
    with pytest.raises(ValueError, match="num_experts_per_tok=9"):
        Qwen3MoeConfig(num_experts=8, num_experts_per_tok=9)
    with pytest.raises(ValueError, match="decoder_sparse_step=0"):
        Qwen3MoeConfig(decoder_sparse_step=0)


SIZES = dict(vocab_size=120, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=8, num_experts_per_tok=2,
             norm_topk_prob=True, initializer_range=0.1, max_position_embeddings=64,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
CASES = {
    "every-layer-sparse": dict(),
    "no-renorm-top1-tied": dict(num_experts_per_tok=1, norm_topk_prob=False, tie_word_embeddings=True),
    "sparse-step-2-dense-layer": dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]),
    "top4-of-16-mqa-yarn": dict(num_experts=16, num_experts_per_tok=4, num_key_value_heads=1, rope_parameters={
        "rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "rope_theta": 1e4}),
    "sliding-window-3": dict(use_sliding_window=True, sliding_window=3),
}


def make_checkpoint(name, folder, seed=0):
    torch.manual_seed(seed)
    config = HFQwen3MoeConfig(**{**SIZES, **CASES[name]})
    model = Qwen3MoeForCausalLM._from_config(config, attn_implementation="eager",
                                             experts_implementation="eager").eval()
    jitter_norms(model)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_cache(tmp_path_factory.mktemp("qwen3_moe"), make_checkpoint)


def stacked_copy(hf_model, folder, tmp_path):
    """The same checkpoint with the stacked expert tensors transformers holds in memory."""
    out = tmp_path / "stacked"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    save_file({n: t.clone() for n, t in hf_model.state_dict().items()}, out / "model.safetensors")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_qwen3_moe_logits_match_transformers(checkpoints, name, tmp_path):
    hf_model, folder = checkpoints(name)
    assert any(".experts.0.gate_proj.weight" in key for key in load_file(folder / "model.safetensors"))
    ids = random_ids(SIZES["vocab_size"], (2, 24))
    with torch.no_grad():
        expected = hf_model(ids).logits
        for path in (folder, stacked_copy(hf_model, folder, tmp_path)):
            ours = from_hf(path)
            assert isinstance(ours, Qwen3Moe)
            for dispatch in DISPATCHES:
                for moe in ours.moe_layers():
                    moe.experts.dispatch = dispatch
                assert (ours(ids) - expected).abs().max().item() < 1e-5


def test_qwen3_moe_layer_layout(checkpoints):
    _, folder = checkpoints("sparse-step-2-dense-layer")
    model = from_hf(folder)
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["GatedMLP", "SparseMoE", "GatedMLP", "GatedMLP"]


@pytest.mark.parametrize("name", ["every-layer-sparse", "no-renorm-top1-tied", "sliding-window-3"])
def test_qwen3_moe_greedy_generation_matches_transformers(checkpoints, name):
    hf_model, folder = checkpoints(name)
    assert_greedy_matches(from_hf(folder), hf_model, SIZES["vocab_size"])


def test_qwen3_moe_aux_loss_matches_transformers(checkpoints):
    hf_model, folder = checkpoints("every-layer-sparse")
    ours = from_hf(folder)
    ids = random_ids(SIZES["vocab_size"], (2, 16))
    with torch.no_grad():
        expected = hf_model(ids, output_router_logits=True).aux_loss
        ours(ids)
    assert abs(ours.aux_loss().item() - expected.item()) < 1e-6


def test_qwen3_moe_is_in_model_modules():
    assert "scratchlm.moe" in scratchlm.MODEL_MODULES


def test_parameter_counts_match_transformers_at_full_size():
    with torch.device("meta"):
        ours = Qwen3Moe(Qwen3MoeConfig())
        reference = Qwen3MoeForCausalLM(HFQwen3MoeConfig(
            vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
            num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
            num_experts_per_tok=8))
    assert ours.num_parameters() == reference.num_parameters() == 30_532_122_624
    assert round(ours.active_parameters() / 1e9, 2) == 3.35


def edited_checkpoint(folder, tmp_path, edit):
    out = tmp_path / "edited"
    out.mkdir(parents=True)
    (out / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def test_missing_and_misshaped_expert_tensors_are_named(checkpoints, tmp_path):
    _, folder = checkpoints("every-layer-sparse")

    def drop(tensors):
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]

    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        from_hf(edited_checkpoint(folder, tmp_path / "a", drop))

    def reshape(tensors):
        tensors["model.layers.0.mlp.experts.5.down_proj.weight"] = torch.zeros(32, 8)

    with pytest.raises(CheckpointMismatchError, match=r"experts\.5\.down_proj\.weight \(32, 8\) \(expected \(32, 16\)\)"):
        from_hf(edited_checkpoint(folder, tmp_path / "b", reshape))

    def extra(tensors):
        tensors["model.layers.0.mlp.experts.8.gate_proj.weight"] = torch.zeros(16, 32)

    with pytest.raises(CheckpointMismatchError, match=r"experts\.8\.gate_proj\.weight"):
        from_hf(edited_checkpoint(folder, tmp_path / "c", extra))


def test_misshaped_stacked_expert_tensors_are_named(checkpoints, tmp_path):
    hf_model, folder = checkpoints("every-layer-sparse")
    stacked = stacked_copy(hf_model, folder, tmp_path)
    tensors = load_file(stacked / "model.safetensors")
    tensors["model.layers.1.mlp.experts.gate_up_proj"] = torch.zeros(8, 30, 32)
    save_file(tensors, stacked / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.mlp\.experts\.gate_up_proj \(8, 30, 32\)"):
        from_hf(stacked)


def test_released_style_config_with_num_experts_loads(checkpoints, tmp_path):
    hf_model, folder = checkpoints("every-layer-sparse")
    config = json.loads((folder / "config.json").read_text())
    config["num_experts"] = config.pop("num_local_experts")  # the key of the released config.json files
    out = tmp_path / "released"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    ids = random_ids(SIZES["vocab_size"], (1, 12))
    with torch.no_grad():
        assert (from_hf(out)(ids) - hf_model(ids).logits).abs().max().item() < 1e-5


def test_grouped_mm_is_not_used_for_float64_on_cpu():
    """F.grouped_mm takes float32, bfloat16 and float16 only: float64 falls back to the sorted dispatch."""
    x = torch.randn(6, 16, dtype=torch.float64)
    gate_up, down = torch.randn(4, 32, 16, dtype=torch.float64), torch.randn(4, 16, 16, dtype=torch.float64)
    assert not grouped_mm_usable(x, gate_up, down)
    assert grouped_mm_usable(x.float(), gate_up.float(), down.float()) == hasattr(torch.nn.functional, "grouped_mm")


@pytest.mark.parametrize("hidden,E,k,problem", [(0, 8, 2, "hidden_size"), (16, 0, 1, "num_experts"),
                                                (16, 8, 0, "top_k=0"), (16, 8, 9, "top_k=9")])
def test_noisy_router_rejects_bad_sizes(hidden, E, k, problem):
    with pytest.raises(ValueError, match=problem):
        NoisyTopKRouter(hidden, E, k)


def noisy_router(T=24, d=16, E=8, k=2, seed=0):
    torch.manual_seed(seed)
    router = NoisyTopKRouter(d, E, k).double()
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.noise_weight.normal_(0, 0.5)
    return router, torch.randn(T, d, dtype=torch.float64)


def test_noisy_router_keeps_the_top_k_of_the_noisy_logits_and_softmaxes_them():
    router, x = noisy_router()
    torch.manual_seed(1)
    H, weights, experts = router(x)
    torch.manual_seed(1)
    eps = torch.randn(H.shape, dtype=torch.float64)
    expected_H = x @ router.weight.T + eps * torch.log1p(torch.exp(x @ router.noise_weight.T))
    torch.testing.assert_close(H, expected_H, rtol=0, atol=1e-12)
    dense = torch.full_like(H, float("-inf"))
    for t in range(H.size(0)):  # KeepTopK by a sort, then a softmax over all E: the others weigh 0
        keep = sorted(range(H.size(1)), key=lambda i: -H[t, i].item())[:2]
        dense[t, keep] = H[t, keep]
        assert sorted(keep) == sorted(experts[t].tolist())
    gates = dense.softmax(-1)
    torch.testing.assert_close(weights, gates.gather(1, experts), rtol=0, atol=1e-12)
    assert torch.allclose(gates.sum(-1), torch.ones(H.size(0), dtype=torch.float64))


def test_noisy_router_is_deterministic_and_noise_free_in_eval():
    router, x = noisy_router()
    router.eval()
    first, second = router(x), router(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert torch.equal(first[0], torch.nn.functional.linear(x, router.weight))
    assert torch.equal(router.smooth_load(), torch.zeros_like(first[0]).scatter(1, first[2], 1.0))
    router.train()
    assert not torch.equal(router(x)[0], router(x)[0])


def test_smooth_load_is_the_probability_of_staying_in_the_top_k():
    router, x = noisy_router(T=4, E=5, k=2)
    H = router(x)[0].detach()
    P = router.smooth_load().detach()
    clean, std = router.clean_logits.detach(), router.noise_std.detach()
    N, g = 20_000, torch.Generator().manual_seed(0)
    for i in range(5):  # only expert i's noise drawn again
        h = H.expand(N, 4, 5).clone()
        h[:, :, i] = clean[:, i] + torch.randn(N, 4, generator=g, dtype=torch.float64) * std[:, i]
        frequency = (h.topk(2, dim=-1).indices == i).any(-1).double().mean(0)
        assert ((P[:, i] - frequency).abs() <= 5 * (P[:, i] * (1 - P[:, i]) / N).sqrt() + 1 / N).all()


def test_smooth_load_with_every_expert_kept_is_one():
    lg = torch.randn(5, 3)
    assert torch.equal(smooth_load(lg, lg, torch.ones(5, 3), 3), torch.ones(5, 3))


def test_noisy_gating_losses_are_zero_when_balanced_and_e_minus_one_when_collapsed():
    E, T = 8, 64
    balanced = torch.zeros(T, E, dtype=torch.float64)
    balanced[torch.arange(T), torch.arange(T) % E] = 6.0
    collapsed = torch.zeros(T, E, dtype=torch.float64)
    collapsed[:, 0] = 12.0
    std = torch.full((T, E), 0.7, dtype=torch.float64)
    for lg, expected in ((balanced, 0.0), (collapsed, E - 1.0)):
        chosen = lg.topk(1, dim=-1).indices
        assert importance_loss(lg, chosen).item() == pytest.approx(expected, abs=1e-6)
        assert load_loss(smooth_load(lg, lg, std, 1)).item() == pytest.approx(expected, abs=1e-6)


def test_load_loss_trains_the_noise_and_importance_needs_k_above_one():
    for k in (1, 2):
        router, x = noisy_router(k=k)
        logits, _, experts = router(x)
        params = (router.weight, router.noise_weight)
        for grad in torch.autograd.grad(load_loss(router.smooth_load()), params, retain_graph=True):
            assert grad.isfinite().all() and grad.abs().max() > 0
        for grad in torch.autograd.grad(importance_loss(logits, experts), params):
            assert (grad.abs().max() > 0) == (k > 1)  # at k = 1 the one kept weight is 1


def test_noisy_router_plugs_into_sparse_moe():
    torch.manual_seed(0)
    moe = SparseMoE(16, 8, top_k=2, expert_size=8)
    moe.gate = NoisyTopKRouter(16, 8, 2)
    y = moe(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16) and moe.expert_indices.shape == (10, 2)
    assert moe.gate.smooth_load().shape == (10, 8)
    loss = y.square().sum() + load_loss(moe.gate.smooth_load()) + importance_loss(moe.router_logits, moe.expert_indices)
    loss.backward()
    assert moe.gate.noise_weight.grad.abs().max() > 0
