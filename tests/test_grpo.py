"""scratchlm.grpo (notebooks/06_alignment/06_grpo.ipynb): grpo_loss equals TRL 1.16's GRPOTrainer._compute_loss for
grpo, bnpo and dr_grpo on fixed inputs whose old log-probs differ from the current ones (so ratio and clip act),
with use_bias_correction_kl=False (the paper's k3) and bf16=False; group advantages are normalised per group
(Bessel's std + 1e-4); sampling masks end at the first EOS; clear errors. Seeded ci-profile runs: GRPO lifts
held-out accuracy by more than 10 points over the noisy-SFT base (the ci model is smaller than the cpu profile's,
so the margin asserted is smaller), and `python -m scratchlm align` writes the JSON table and reuses --base.
GRPO's baselines: rejection_sampling_data keeps one copy of the correct answer for exactly the problems solved by
at least one sample (counted here from the samples themselves), rft_loss's gradient equals grpo_loss's with the
rewards as advantages (beta = 0, ratio 1), train_online_rft leaves a model that is never right unchanged (wrong
answers have coefficient 0) and, from one that is sometimes right, raises the log-likelihood of the right answers
it sampled; clear errors for bad counts.
"""

import copy
import json
import tempfile

import pytest
import torch

from scratchlm.arith import exact_match_rewards, sample_groups
from scratchlm.grpo import (
    LOSS_TYPES,
    group_advantages,
    grpo_loss,
    rejection_sampling_data,
    rft_loss,
    train_online_rft,
)
from scratchlm.reward import hf_char_tokenizer


@pytest.fixture(scope="module")
def trl_case():
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    datasets.disable_progress_bars()
    tok = hf_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=15, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                         pad_token_id=1, eos_token_id=14))
    B, P, C = 6, 6, 4
    g = torch.Generator().manual_seed(1)
    prompt_ids, completion_ids = torch.randint(3, 14, (B, P), generator=g), torch.randint(3, 14, (B, C), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    with torch.no_grad():
        logits = model(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, P - 1 : -1]
    current = torch.gather(logits.log_softmax(-1), 2, completion_ids[..., None]).squeeze(-1)
    old = current + 0.3 * torch.randn(B, C, generator=g)
    ref = current + 0.2 * torch.randn(B, C, generator=g)
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0]), 3)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=advantages, old_per_token_logps=old,
                  ref_per_token_logps=ref, num_items_in_batch=completion_mask.sum())
    losses = {}
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(f"{out}/model")
        tok.save_pretrained(f"{out}/model")
        for loss_type in LOSS_TYPES:
            args = GRPOConfig(output_dir=out, beta=0.04, epsilon=0.2, loss_type=loss_type, use_bias_correction_kl=False,
                              max_completion_length=C, num_generations=3, per_device_train_batch_size=3, use_cpu=True,
                              bf16=False, report_to=[])
            trainer = GRPOTrainer(model=f"{out}/model", reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                  args=args, train_dataset=datasets.Dataset.from_dict({"prompt": ["1+2=", "3+4="]}),
                                  processing_class=tok)
            trainer.current_gradient_accumulation_steps = 1
            with torch.no_grad():
                losses[loss_type] = trainer._compute_loss(trainer.model, inputs).item()
    return losses, current, old, ref, advantages, completion_mask, C


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_equals_trl_grpo_trainer(trl_case, loss_type):
    losses, current, old, ref, advantages, mask, C = trl_case
    ratio = (current - old).exp()
    assert ((ratio - 1).abs() > 0.2).any()  # the clip acts on some tokens
    ours = grpo_loss(current, old, ref, advantages, mask, 0.2, 0.04, loss_type, max_completion_length=C).item()
    assert ours == pytest.approx(losses[loss_type], abs=1e-6)


def test_aggregations_differ_and_beta_zero_drops_the_kl(trl_case):
    _, current, old, ref, advantages, mask, C = trl_case
    values = {lt: grpo_loss(current, old, ref, advantages, mask, loss_type=lt).item() for lt in LOSS_TYPES}
    assert len({round(v, 6) for v in values.values()}) == 3
    with_kl = grpo_loss(current, old, ref, advantages, mask, beta=0.04, loss_type="bnpo")
    without = grpo_loss(current, old, ref, advantages, mask, beta=0.0, loss_type="bnpo")
    k3 = torch.exp(ref - current) - (ref - current) - 1
    assert (with_kl - without).item() == pytest.approx(0.04 * (k3 * mask).sum().item() / mask.sum().item(), abs=1e-7)
    # on-policy (old == current): the loss value is -A averaged, whatever the clip
    on_policy = grpo_loss(current, current, current, advantages, mask, loss_type="bnpo")
    want = -(advantages[:, None] * mask).sum() / mask.sum()
    assert on_policy.item() == pytest.approx(want.item(), abs=1e-6)


def test_group_advantages_are_normalised():
    torch.manual_seed(0)
    rewards = torch.rand(4 * 8)
    a = group_advantages(rewards, 8).view(4, 8)
    torch.testing.assert_close(a.mean(1), torch.zeros(4), atol=1e-6, rtol=0)
    stds = rewards.view(4, 8).std(1)
    torch.testing.assert_close(a.std(1), stds / (stds + 1e-4))
    unscaled = group_advantages(rewards, 8, scale=False).view(4, 8)
    torch.testing.assert_close(unscaled, rewards.view(4, 8) - rewards.view(4, 8).mean(1, keepdim=True))
    assert torch.all(group_advantages(torch.ones(8), 4) == 0)  # all-equal groups teach nothing


@pytest.mark.parametrize("call, message", [
    (lambda: group_advantages(torch.zeros(10), 4), "do not split into groups of 4"),
    (lambda: group_advantages(torch.zeros(4), 1), "a group of 1 has no std"),
    (lambda: group_advantages(torch.zeros(4), 0), "group_size must be a positive integer"),
    (lambda: grpo_loss(*[torch.zeros(2, 3)] * 3, torch.zeros(2), torch.ones(2, 3), loss_type="dapo"), "unknown loss_type"),
    (lambda: grpo_loss(*[torch.zeros(2, 3)] * 3, torch.zeros(3), torch.ones(2, 3)), "3 advantages for 2 sequences"),
    (lambda: grpo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)),
     "must all be"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_sampled_masks_end_at_the_first_eos():
    from scratchlm.arith import EOS, TOKENIZER, addition_split, task_config, task_model

    model = task_model(task_config("ci"), seed=0)
    problems = addition_split()["test"][:3]
    ids, mask, answers = sample_groups(model, problems, 4, torch.Generator().manual_seed(0))
    assert ids.shape[0] == mask.shape[0] == len(answers) == 12 and not mask[:, :6].any()
    eos = TOKENIZER.stoi[EOS]
    for row, m, answer in zip(ids.tolist(), mask.tolist(), answers, strict=True):
        completion = [t for t, keep in zip(row, m, strict=True) if keep]
        assert TOKENIZER.decode([t for t in completion if t != eos]) == answer
        assert eos not in completion[:-1]  # nothing after the first EOS is in the mask
    rewards = exact_match_rewards(["82", "28"], torch.tensor([[37, 45]]), 2)
    assert rewards.tolist() == [1.0, 0.0]


def test_ci_grpo_lifts_held_out_accuracy():
    """Seeded, ci profile: GRPO for 20 steps beats the noisy-SFT base, and the control, by more than 10 points."""
    from scratchlm.align import run_method
    from scratchlm.arith import addition_split, task_config, task_model

    cfg = task_config("ci")
    split = addition_split()
    from scratchlm.arith import noisy_sft_data, train_sft

    base = task_model(cfg, seed=0)
    train_sft(base, *noisy_sft_data(split["train"], cfg, seed=0), cfg.sft_steps, cfg.batch_size, cfg.lr, seed=0)
    row = run_method("grpo", base, cfg, split, seed=0, profile="ci")
    assert row["accuracy_after"] > row["accuracy_before"] + 0.1, row
    control = run_method("sft", base, cfg, split, seed=0, profile="ci")
    assert row["accuracy_after"] > control["accuracy_after"] + 0.1, (row, control)


def test_cli_align_writes_json_and_reuses_the_base(tmp_path, capsys):
    from scratchlm.__main__ import main

    out, base = tmp_path / "table.json", tmp_path / "base"
    main(["align", "--method", "grpo", "--profile", "ci", "--seed", "0", "--base", str(base), "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [sorted(r) for r in rows] == [["accuracy_after", "accuracy_before", "method", "seconds", "seed"]]  # one seed: no mean
    assert rows[0]["method"] == "grpo" and 0 <= rows[0]["accuracy_before"] < rows[0]["accuracy_after"] <= 1
    assert (base / "model.safetensors").is_file()
    main(["align", "--method", "sft", "--profile", "ci", "--base", str(base), "--json", str(out)])
    assert "base model loaded from" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["accuracy_before"] == rows[0]["accuracy_before"]
    with pytest.raises(SystemExit):
        main(["align", "--method", "grpo", "--lora", "0", "--profile", "ci"])


def test_mu_updates_per_batch_let_the_clip_act():
    """num_iterations (mu) = 1: the ratio is exactly 1 at the only update, so nothing is clipped. mu = 3 at a large
    learning rate: the later updates move the ratio out of [1 - eps, 1 + eps] and the clip cuts some tokens. The
    untrained model never answers right, so the reward here is a stand-in that varies within groups (the hook)."""
    from scratchlm.arith import addition_split, task_config, task_model
    from scratchlm.grpo import train_grpo

    cfg = task_config("ci")
    problems = addition_split()["train"]
    base = task_model(cfg, seed=0)
    odd_length = lambda answers, batch, group_size: torch.tensor([float(len(a) % 2) for a in answers])
    kw = dict(group_size=4, prompts_per_step=8, lr=1e-2, reward=odd_length)
    one = train_grpo(copy.deepcopy(base), copy.deepcopy(base), problems, 3, **kw)
    assert all(m["clip_ratio"] == 0.0 for m in one)
    three = train_grpo(copy.deepcopy(base), copy.deepcopy(base), problems, 3, num_iterations=3, **kw)
    assert max(m["clip_ratio"] for m in three) > 0.0
    assert all(m["completion_length"] >= 1 for m in three)
    with pytest.raises(ValueError, match="num_iterations"):
        train_grpo(base, base, problems, 1, num_iterations=0)


@pytest.fixture(scope="module")
def sometimes_right():
    """A ci-size task model after 150 SFT steps on the correct answers: it samples the right sum part of the time."""
    from scratchlm.arith import (
        addition_split,
        correct_answers,
        encode_examples,
        prompts,
        task_config,
        task_model,
        train_sft,
    )

    cfg = task_config("ci")
    split = addition_split()
    model = task_model(cfg, seed=0)
    train = split["train"]
    train_sft(model, *encode_examples(prompts(train), correct_answers(train)), 150, 128, 3e-3, seed=0)
    return model, split


def test_rejection_sampling_keeps_one_correct_answer_per_solved_problem(sometimes_right, capsys):
    from scratchlm.arith import EOS, PAD, TOKENIZER

    model, split = sometimes_right
    problems = split["test"][:300]
    ids, mask = rejection_sampling_data(model, problems, samples_per_problem=4, generator=torch.Generator().manual_seed(3))
    # the same draws (one chunk of < 1,024 problems, the same generator seed), checked here against the sums directly
    _, _, answers = sample_groups(model, problems, 4, torch.Generator().manual_seed(3))
    sums = [a + b for a, b in problems.tolist()]
    solved = [s for i, s in enumerate(sums) if str(s) in answers[4 * i : 4 * i + 4]]
    assert 0 < len(solved) < len(problems)  # the fixture's model is sometimes right, not always
    assert ids.shape[0] == mask.shape[0] == len(solved)
    assert f"{len(solved):,} of 300 problems had a correct answer among 4 samples" in capsys.readouterr().out
    kept_prompts, kept_answers = [], []
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        text = TOKENIZER.decode([t for t in row if t != TOKENIZER.stoi[PAD]])
        prompt, answer = text.split("=")
        assert answer.endswith(EOS) and TOKENIZER.decode([t for t, keep in zip(row, m, strict=True) if keep]) == answer
        a, b = map(int, prompt.split("+"))
        assert answer[:-1] == str(a + b)  # every kept answer is correct
        kept_prompts.append(prompt)
        kept_answers.append(int(answer))
    assert len(set(kept_prompts)) == len(kept_prompts)  # one copy per problem: duplicates are dropped
    assert sorted(kept_answers) == sorted(solved)


def test_rft_loss_gradient_is_grpo_with_the_reward_as_advantage():
    g = torch.Generator().manual_seed(0)
    logps = (-torch.rand(6, 5, generator=g) * 3).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    loss = rft_loss(logps, rewards, mask)
    want = -sum(rewards[i] * sum(logps[i, t] for t in range(5) if mask[i, t]) / mask[i].sum() for i in range(6)) / 6
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    (rft_grad,) = torch.autograd.grad(loss, logps)
    (grpo_grad,) = torch.autograd.grad(grpo_loss(logps, logps.detach(), logps.detach(), rewards, mask, beta=0.0), logps)
    torch.testing.assert_close(rft_grad, grpo_grad, atol=1e-7, rtol=0)
    assert torch.all(rft_grad[rewards == 0] == 0)  # wrong answers: coefficient 0
    assert torch.all(rft_grad[2] == -1 / (6 * 5))  # a right answer of 5 tokens: -1 / (N |o|) on each token


def test_online_rft_ignores_wrong_answers_and_raises_right_ones(sometimes_right):
    from scratchlm.arith import addition_split, task_config, task_model, token_logps

    never_right = task_model(task_config("ci"), seed=0)  # untrained: it never samples a correct sum
    before = copy.deepcopy(never_right.state_dict())
    calls = []
    history = train_online_rft(never_right, addition_split()["train"], 2, group_size=4, prompts_per_step=8, lr=1e-2,
                               callback=lambda step, policy, metrics: calls.append((step, metrics["reward"])))
    assert [h["reward"] for h in history] == [0.0, 0.0] and [c[0] for c in calls] == [1, 2]
    assert all(torch.equal(before[k], v) for k, v in never_right.state_dict().items())  # no right answer, no change

    # one step from a model that is sometimes right: the same prompts and samples, drawn here with the seed that
    # train_online_rft uses, have right answers whose log-likelihood the step raises (an SFT step on them)
    model, split = sometimes_right
    policy, problems = copy.deepcopy(model), split["train"]
    generator = torch.Generator().manual_seed(5)
    batch = problems[torch.randint(len(problems), (16,), generator=generator)]
    ids, mask, answers = sample_groups(policy, batch, 4, generator)
    right = torch.tensor([a == str(x + y) for a, (x, y) in zip(answers, batch.repeat_interleave(4, 0).tolist(), strict=True)])
    assert 0 < right.sum() < len(right)

    def right_logp(m):
        with torch.no_grad():
            return token_logps(m, ids, mask).sum(-1)[right].mean().item()

    before = right_logp(policy)
    history = train_online_rft(policy, problems, 1, group_size=4, prompts_per_step=16, lr=1e-4, seed=5)
    assert history[0]["reward"] == pytest.approx(right.float().mean().item())  # the same draws
    assert right_logp(policy) > before


@pytest.mark.parametrize("call, message", [
    (lambda m, p: rejection_sampling_data(m, p, samples_per_problem=0), "samples_per_problem must be a positive integer"),
    (lambda m, p: rejection_sampling_data(m, p, samples_per_problem=2.5), "samples_per_problem must be a positive integer"),
    (lambda m, p: rejection_sampling_data(m, p[0], 4), r"must be a non-empty \(N, 2\)"),
    (lambda m, p: rejection_sampling_data(m, p, 2), "no sampled answer was correct"),
    (lambda m, p: train_online_rft(m, p, 1, group_size=0), "group_size must be a positive integer"),
    (lambda m, p: train_online_rft(m, p, 1, prompts_per_step=0), "prompts_per_step must be a positive integer"),
])
def test_rft_bad_input(call, message):
    from scratchlm.arith import addition_split, task_config, task_model

    never_right = task_model(task_config("ci"), seed=0)  # untrained: it never samples a correct sum
    with pytest.raises(ValueError, match=message):
        call(never_right, addition_split()["test"][:8])
