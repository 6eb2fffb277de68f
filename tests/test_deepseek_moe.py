"""scratchlm.deepseek_moe: DeepSeek-V3's router and MoE block against transformers' DeepseekV3MoE, the bias update,
the balance loss, and the settings that are refused.

References: transformers' DeepseekV3MoE and DeepseekV3TopkRouter (eager experts) with random weights and a random
non-zero e_score_correction_bias; no downloads.
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

from scratchlm.deepseek_moe import DeepSeekMoE, DeepSeekRouter, balance_loss, check_group_routing
from scratchlm.moe import DISPATCHES


def hf_block(E, k, n_group, topk_group, norm, n_shared, scale=2.5, d=32, I=16, seed=0):
    config = DeepseekV3Config(hidden_size=d, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                              n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                              n_shared_experts=n_shared, routed_scaling_factor=scale)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    block = DeepseekV3MoE(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
        block.gate.e_score_correction_bias.normal_(0, 0.1)
    return block


SETTINGS = [  # E, k, n_group, topk_group, norm_topk_prob, n_shared_experts, routed_scaling_factor
    (16, 4, 4, 2, True, 1, 2.5),
    (16, 4, 1, 1, False, 2, 2.5),
    (8, 2, 2, 1, True, 1, 1.0),
    (32, 8, 8, 4, True, 1, 2.5),
    (12, 6, 3, 2, False, 1, 16.0),
    (8, 8, 4, 4, True, 3, 1.0),  # every expert: k = all the experts the groups hold
]


@pytest.mark.parametrize("E,k,n_group,topk_group,norm,n_shared,scale", SETTINGS)
@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_deepseek_moe_matches_transformers(E, k, n_group, topk_group, norm, n_shared, scale, dispatch):
    reference = hf_block(E, k, n_group, topk_group, norm, n_shared, scale)
    ours = DeepSeekMoE(32, E, k, 16, n_shared, n_group, topk_group, norm, scale, dispatch=dispatch)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 10, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), rtol=1e-5, atol=1e-5)  # outputs reach ~200 with scale 16
        _, hf_weights, hf_experts = reference.gate(x)
    order, hf_order = ours.expert_indices.argsort(-1), hf_experts.argsort(-1)  # transformers' top-k is unsorted
    assert torch.equal(ours.expert_indices.gather(1, order), hf_experts.gather(1, hf_order))
    _, weights, _ = ours.gate(x.view(-1, 32))
    assert torch.allclose(weights.gather(1, order), hf_weights.gather(1, hf_order), atol=1e-6)


def test_bias_chooses_but_does_not_weigh():
    torch.manual_seed(0)
    router = DeepSeekRouter(8, 8, top_k=2, routed_scaling_factor=2.5)
    x = torch.randn(64, 8)
    with torch.no_grad():
        router.e_score_correction_bias[3] = 10.0  # expert 3 is always chosen
        logits, weights, experts = router(x)
    assert (experts == 3).any(-1).all()
    chosen = logits.sigmoid().gather(1, experts)
    assert torch.allclose(weights, 2.5 * chosen / chosen.sum(-1, keepdim=True), atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5))


def test_group_limit_keeps_experts_inside_the_chosen_groups():
    torch.manual_seed(0)
    router = DeepSeekRouter(16, 32, top_k=6, n_group=8, topk_group=3)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(0, 0.2)
        _, _, experts = router(torch.randn(200, 16))
    groups_used = [len(set(row)) for row in (experts // 4).tolist()]
    assert max(groups_used) <= 3 and min(groups_used) >= 2  # 6 experts need at least 2 groups of 4


def test_bias_update_moves_load_towards_balance_on_a_skewed_router():
    torch.manual_seed(0)
    moe = DeepSeekMoE(32, 16, top_k=2, expert_size=8, n_shared_experts=0)
    with torch.no_grad():
        moe.gate.weight[:4] += 0.3
    batches = torch.Generator().manual_seed(1)
    imbalance = []
    with torch.no_grad():
        for step in range(1000):
            moe(torch.randn(1024, 32, generator=batches) + 0.2)
            load = moe.load()
            if step == 0:
                overloaded, underloaded = load > load.float().mean(), load < load.float().mean()
                moe.update_bias(load, gamma=0.001)
                bias = moe.gate.e_score_correction_bias
                assert (bias[overloaded] == -0.001).all() and (bias[underloaded] == 0.001).all()
            else:
                moe.update_bias(load, gamma=0.001)
            imbalance.append((load.max() / load.float().mean()).item())
    assert sum(imbalance[-100:]) / 100 < imbalance[0] / 2
    assert (moe.gate.e_score_correction_bias[:4] < 0).all()


def test_balance_loss_values():
    E, k, T = 8, 2, 16
    logits = torch.zeros(2 * T, E)
    for j in range(k):
        logits[torch.arange(2 * T), (torch.arange(2 * T) + j) % E] = 3.0
    chosen = logits.topk(k, dim=-1).indices
    assert abs(balance_loss(logits, chosen, k).item() - 1.0) < 1e-5
    assert abs(balance_loss(logits, chosen, k, seq_len=T).item() - 1.0) < 1e-5
    # a direct computation of V3 eq. 17-20 for one sequence of random routing
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g)
    chosen = torch.randperm(E, generator=g)[:k].repeat(T, 1)
    s = logits.sigmoid()
    f = torch.tensor([E / (k * T) * (chosen == i).sum().item() for i in range(E)])
    P = (s / s.sum(-1, keepdim=True)).mean(0)
    assert abs(balance_loss(logits, chosen, k, seq_len=T).item() - (f * P).sum().item()) < 1e-6
    with pytest.raises(ValueError, match="seq_len=5"):
        balance_loss(logits, chosen, k, seq_len=5)


def test_balance_loss_gradient_pushes_probability_off_busy_experts():
    logits = torch.zeros(32, 4)
    logits[:, 0] = 2.0
    logits.requires_grad_()
    chosen = torch.zeros(32, 1, dtype=torch.long)
    balance_loss(logits, chosen, 1).backward()
    assert (logits.grad[:, 0] > 0).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_experts=10, top_k=2, n_group=4, topk_group=2), "n_routed_experts=10 is not divisible by n_group=4"),
    (dict(num_experts=8, top_k=2, n_group=8, topk_group=2), "at least 2"),
    (dict(num_experts=16, top_k=2, n_group=4, topk_group=5), "topk_group=5 must be between 1 and n_group=4"),
    (dict(num_experts=16, top_k=9, n_group=4, topk_group=2), "num_experts_per_tok=9 must be between 1 and the 8"),
    (dict(num_experts=16, top_k=2, n_group=0, topk_group=1), "n_group=0"),
])
def test_impossible_group_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_group_routing(**kwargs)
    with pytest.raises(ValueError, match=message):
        DeepSeekMoE(16, kwargs["num_experts"], kwargs["top_k"], 8, n_group=kwargs["n_group"],
                    topk_group=kwargs["topk_group"])


def test_router_runs_in_float32_for_bfloat16_inputs():
    torch.manual_seed(0)
    moe = DeepSeekMoE(16, 8, 2, 8).to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y = moe(x)
    assert y.dtype == torch.bfloat16 and moe.router_logits.dtype == torch.float32
    assert torch.equal(moe.router_logits, F.linear(x.float(), moe.gate.weight.float()))
