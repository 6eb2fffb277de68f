"""scratchlm.ppo (notebooks/06_alignment/04_ppo.ipynb): gae equals a direct sum over time steps of
(gamma lam)^l delta_{t+l} with the value after the last step taken as zero (and its lam = 0 and lam = 1 ends);
the clipped policy and value losses equal their per-token formulas on a batch where the clip acts; the per-token
KL-penalised reward puts the score on the last answer token; a short seeded PPO run against the exact-match checker
moves the policy, with several updates per batch so the clip fraction is positive; bad input gets clear errors.
"""

import copy
import math

import pytest
import torch

from scratchlm.ppo import (
    checker_reward,
    gae,
    kl_penalised_rewards,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    train_ppo,
)


def gae_by_definition(rewards, values, gamma, lam):
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            total = 0.0
            for l in range(T - t):
                next_value = values[b, t + l + 1].item() if t + l + 1 < T else 0.0
                delta = rewards[b, t + l].item() + gamma * next_value - values[b, t + l].item()
                total += (gamma * lam) ** l * delta
            out[b, t] = total
    return out


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 0.0), (1.0, 1.0), (0.0, 0.7)])
def test_gae_equals_the_definition(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(4, 7, generator=g, dtype=torch.float64) - 0.5
    values = torch.rand(4, 7, generator=g, dtype=torch.float64)
    advantages, returns = gae(rewards, values, gamma, lam)
    torch.testing.assert_close(advantages, gae_by_definition(rewards, values, gamma, lam), rtol=0, atol=1e-12)
    torch.testing.assert_close(returns, advantages + values, rtol=0, atol=0)


def test_gae_ends_of_lambda_and_zero_padding():
    g = torch.Generator().manual_seed(1)
    r, v = torch.rand(3, 5, generator=g, dtype=torch.float64), torch.rand(3, 5, generator=g, dtype=torch.float64)
    next_v = torch.cat([v[:, 1:], torch.zeros(3, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(gae(r, v, 0.9, 0.0)[0], r + 0.9 * next_v - v)  # lam = 0: one-step TD error
    torch.testing.assert_close(gae(r, v, 1.0, 1.0)[1], r.flip(1).cumsum(1).flip(1))  # lam = 1: reward to go
    # zero reward and value after a sequence's end change nothing before it
    padded_r, padded_v = torch.cat([r, torch.zeros(3, 2, dtype=torch.float64)], 1), torch.cat([v, torch.zeros(3, 2, dtype=torch.float64)], 1)
    torch.testing.assert_close(gae(padded_r, padded_v, 0.95, 0.9)[0][:, :5], gae(r, v, 0.95, 0.9)[0])


def test_losses_equal_their_formulas_with_the_clip_acting():
    g = torch.Generator().manual_seed(2)
    B, T, eps = 5, 4, 0.2
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    old = logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2
    adv = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 1
    values, old_values = torch.rand(B, T, generator=g, dtype=torch.float64), torch.rand(B, T, generator=g, dtype=torch.float64)
    returns = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.5
    mask = torch.rand(B, T, generator=g) < 0.8
    mask[:, 0] = True
    p_terms, v_terms, cut, v_cut = [], [], 0, 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                rho, a = math.exp(logps[b, t].item() - old[b, t].item()), adv[b, t].item()
                plain, clipped = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
                p_terms.append(max(plain, clipped))
                cut += clipped > plain
                v, vo, ret = values[b, t].item(), old_values[b, t].item(), returns[b, t].item()
                vc = vo + min(max(v - vo, -eps), eps)
                v_terms.append(0.5 * max((v - ret) ** 2, (vc - ret) ** 2))
                v_cut += (vc - ret) ** 2 > (v - ret) ** 2
    loss, frac = ppo_policy_loss(logps, old, adv, mask, eps)
    vloss, vfrac = ppo_value_loss(values, old_values, returns, mask, eps)
    assert cut > 0 and v_cut > 0  # the clip acts in both
    assert loss.item() == pytest.approx(sum(p_terms) / len(p_terms), abs=1e-12)
    assert frac.item() == pytest.approx(cut / len(p_terms), abs=1e-12)
    assert vloss.item() == pytest.approx(sum(v_terms) / len(v_terms), abs=1e-12)
    assert vfrac.item() == pytest.approx(v_cut / len(v_terms), abs=1e-12)
    # on-policy (ratio 1): nothing is clipped and the loss is -mean(A)
    on, on_frac = ppo_policy_loss(logps, logps, adv, mask, eps)
    assert on_frac.item() == 0.0 and on.item() == pytest.approx(-masked_mean(adv, mask).item(), abs=1e-12)


def test_whiten_and_kl_penalised_rewards():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    w = masked_whiten(x, mask)
    assert masked_mean(w, mask).abs().item() < 1e-6 and abs(masked_mean(w**2, mask).item() - 1) < 1e-5
    assert (w[~mask] == 0).all()
    logps, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -1.5)
    rewards = kl_penalised_rewards(torch.tensor([3.0, -2.0]), logps, ref, mask, 0.1)
    want = torch.tensor([[-0.05, -0.05, 3.0 - 0.05, 0.0], [-0.05, -2.0 - 0.05, 0.0, 0.0]])
    torch.testing.assert_close(rewards, want)


@pytest.mark.parametrize("call, message", [
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 4), 1.0, 0.95), "same shape"),
    (lambda: gae(torch.zeros(3), torch.zeros(3), 1.0, 0.95), r"\(B, T\)"),
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), 1.5, 0.95), r"gamma must be a number in \[0, 1\]"),
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), -0.1, 0.95), "gamma must be"),
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, 1.01), r"lam must be a number in \[0, 1\]"),
    (lambda: gae(torch.zeros(2, 3), torch.zeros(2, 3), 1.0, float("nan")), "lam must be"),
    (lambda: ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3)), "must all be"),
    (lambda: ppo_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)), "must all be"),
    (lambda: kl_penalised_rewards(torch.zeros(3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), 0.1), "expected"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_short_ppo_run_moves_the_policy_and_clips():
    """Seeded and tiny: 3 iterations of 16 prompts from a 200-step SFT model, against the checker."""
    from scratchlm.arith import addition_split, noisy_sft_data, task_config, task_model, train_sft
    from scratchlm.reward import ScalarHeadGPT

    cfg = task_config("ci")
    split = addition_split()
    base = task_model(cfg, seed=0)
    train_sft(base, *noisy_sft_data(split["train"], cfg, seed=0), 200, cfg.batch_size, cfg.lr, seed=0)
    torch.manual_seed(0)
    policy, value_model = copy.deepcopy(base), ScalarHeadGPT(copy.deepcopy(base))
    history = train_ppo(policy, copy.deepcopy(base), value_model, checker_reward, split["train"], 3, prompts_per_step=16,
                        seed=0)
    assert len(history) == 3 and set(history[0]) >= {"score", "exact_match", "kl", "clip_fraction", "value_loss"}
    assert history[0]["kl"] == 0.0  # the first rollout comes from the reference itself
    assert any(h["clip_fraction"] > 0 for h in history)  # 4 epochs x 2 minibatches: later updates are clipped
    moved = max((a - b).abs().max().item() for a, b in zip(policy.parameters(), base.parameters(), strict=True))
    assert moved > 0
    one = train_ppo(copy.deepcopy(base), copy.deepcopy(base), ScalarHeadGPT(copy.deepcopy(base)), checker_reward,
                    split["train"], 2, prompts_per_step=16, epochs=1, minibatches=1, seed=0)
    assert all(h["clip_fraction"] == 0.0 for h in one)  # mu = 1: the ratio is 1, nothing to clip
    with pytest.raises(ValueError, match="epochs >= 1"):
        train_ppo(policy, base, value_model, checker_reward, split["train"], 1, epochs=0)
    with pytest.raises(ValueError, match="gamma"):
        train_ppo(policy, base, value_model, checker_reward, split["train"], 1, gamma=2.0)
