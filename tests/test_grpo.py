"""scratchlm.grpo (notebooks/06_alignment/06_grpo.ipynb): grpo_loss equals TRL 1.16's GRPOTrainer._compute_loss for
grpo, bnpo and dr_grpo on fixed inputs whose old log-probs differ from the current ones (so ratio and clip act),
with use_bias_correction_kl=False (the paper's k3) and bf16=False; group advantages are normalised per group
(Bessel's std + 1e-4); sampling masks end at the first EOS; clear errors. Seeded ci-profile runs: GRPO lifts
held-out accuracy by more than 10 points over the noisy-SFT base (the ci model is smaller than the cpu profile's,
so the margin asserted is smaller), and `python -m scratchlm align` writes the JSON table and reuses --base.
"""

import copy
import json
import tempfile

import pytest
import torch

from scratchlm.arith import exact_match_rewards, sample_groups
from scratchlm.dpo import hf_char_tokenizer
from scratchlm.grpo import LOSS_TYPES, group_advantages, grpo_loss


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
    assert [sorted(r) for r in rows] == [["accuracy_after", "accuracy_before", "method", "seconds"]]
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
