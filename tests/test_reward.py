"""scratchlm.reward (notebooks/06_alignment/03_reward_model.ipynb): reward_loss equals TRL 1.16's
RewardTrainer.compute_loss on the same batch (a random tiny LlamaForSequenceClassification and TRL's collator),
with and without a margin column and with center_rewards_coefficient; the scalar-head GPT reads the GPT's own hidden
states and the answer's last token; a few seeded ci-sized steps of reward-model training raise held-out pair
accuracy; bad input gets clear errors.
"""

import copy
import math
import tempfile

import pytest
import torch

from scratchlm.arith import (
    TOKENIZER,
    addition_split,
    correct_answers,
    encode_examples,
    noisy_sft_data,
    prompts,
    reversed_answers,
    task_config,
    task_model,
    train_sft,
)
from scratchlm.reward import (
    ScalarHeadGPT,
    answer_pairs,
    last_token_index,
    pair_accuracy,
    reward_loss,
    sequence_rewards,
    train_reward_model,
)

CASES = [(False, None), (False, 0.01), (True, None), (True, 0.01)]


@pytest.fixture(scope="module")
def trl_case():
    import warnings

    import datasets
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from scratchlm.reward import hf_char_tokenizer

    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    datasets.disable_progress_bars()
    tok = hf_char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        num_labels=1, initializer_range=0.5))
    rows = {"prompt": ["37+45=", "29+31=", "99+98=", "12+34=", "50+50="], "chosen": ["82", "60", "197", "46", "100"],
            "rejected": ["28", "06", "791", "64", "1"], "margin": [0.0, 0.5, 1.0, 2.0, -0.5]}
    losses, batches = {}, {}
    with tempfile.TemporaryDirectory() as out:
        for with_margin, coefficient in CASES:
            data = rows if with_margin else {k: v for k, v in rows.items() if k != "margin"}
            args = RewardConfig(output_dir=out, center_rewards_coefficient=coefficient, use_cpu=True, bf16=False,
                                report_to=[], per_device_train_batch_size=5, gradient_checkpointing=False)
            trainer = RewardTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(data),
                                    processing_class=tok)
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(5)])
            with torch.no_grad():
                losses[with_margin, coefficient] = trainer.compute_loss(trainer.model, dict(batch)).item()
            batches[with_margin, coefficient] = batch
    batch = batches[True, None]
    with torch.no_grad():
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    return losses, batches, scores


@pytest.mark.parametrize("with_margin, coefficient", CASES)
def test_equals_trl_reward_trainer(trl_case, with_margin, coefficient):
    losses, batches, scores = trl_case
    chosen, rejected = scores.chunk(2)
    assert (chosen - rejected).abs().max() > 1  # rewards that differ, so the check is not just log 2
    margin = batches[with_margin, coefficient]["margin"] if with_margin else None
    ours = reward_loss(chosen, rejected, margin=margin, center_rewards_coefficient=coefficient).item()
    assert ours == pytest.approx(losses[with_margin, coefficient], abs=1e-6)


def test_by_hand_and_gradient():
    chosen, rejected = torch.tensor([2.0, 0.5], requires_grad=True), torch.tensor([-1.0, 0.5])
    want = (math.log1p(math.exp(-3.0)) + math.log(2)) / 2
    assert reward_loss(chosen, rejected).item() == pytest.approx(want, abs=1e-6)
    assert reward_loss(chosen, rejected, margin=1.0).item() == pytest.approx(  # a margin of 1 on both pairs
        (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0))) / 2, abs=1e-6)
    assert reward_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0])).item() == pytest.approx(
        (math.log1p(math.exp(-2.0)) + math.log(2)) / 2, abs=1e-6)
    assert reward_loss(chosen, rejected, center_rewards_coefficient=0.5).item() == pytest.approx(want + 0.5, abs=1e-6)
    reward_loss(chosen, rejected).backward()
    # d/dr_c of -log sigma(d) / B is -sigma(-d) / B
    torch.testing.assert_close(chosen.grad, -torch.sigmoid(-(chosen - rejected).detach()) / 2)


@pytest.mark.parametrize("call, message", [
    (lambda: reward_loss(torch.zeros(4), torch.zeros(3)), "must have the same shape"),
    (lambda: reward_loss(torch.zeros(4, 1), torch.zeros(4, 1)), "must be a 1-D tensor"),
    (lambda: reward_loss(torch.zeros(()), torch.zeros(())), "must be a 1-D tensor"),
    (lambda: reward_loss([0.0], torch.zeros(1)), "must be a 1-D tensor"),
    (lambda: reward_loss(torch.zeros(4), torch.zeros(4), margin=torch.zeros(2)), "margin"),
    (lambda: reward_loss(torch.zeros(4), torch.zeros(4), center_rewards_coefficient=float("nan")), "finite"),
    (lambda: reward_loss(torch.zeros(4), torch.zeros(4), center_rewards_coefficient=float("inf")), "finite"),
    (lambda: last_token_index(torch.zeros(2, 5, dtype=torch.bool)), "at least one answer token"),
    (lambda: last_token_index(torch.ones(5, dtype=torch.bool)), r"\(B, T\)"),
    (lambda: answer_pairs(torch.tensor([[10, 11]]), ["21"], []), "one of each per problem"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_scalar_head_reads_the_gpt_and_the_last_answer_token():
    gpt = task_model(task_config("ci"), seed=0).eval()
    problems = torch.tensor([[10, 11], [99, 98], [50, 50]])
    ids, mask = encode_examples(prompts(problems), correct_answers(problems))
    with torch.no_grad():
        assert torch.equal(gpt.lm_head(gpt.hidden_states(ids)), gpt(ids))
    assert last_token_index(mask).tolist() == [8, 9, 9]  # "10+11=21\n#", "99+98=197\n", "50+50=100\n"
    model = ScalarHeadGPT(gpt).eval()
    with torch.no_grad():
        scores, rewards = model(ids), sequence_rewards(model, ids, mask)
    assert scores.shape == ids.shape and rewards.shape == (3,)
    torch.testing.assert_close(rewards, scores[torch.arange(3), torch.tensor([8, 9, 9])], rtol=0, atol=0)


def test_answer_pairs_are_the_two_answers_of_each_problem():
    """Row i of each side decodes to prompt + answer + EOS, the mask covers answer + EOS, and a problem whose two
    answers are one string (a sum that reads the same reversed) gives no pair."""
    problems = torch.tensor([[37, 45], [60, 61], [10, 11], [99, 98], [50, 49]])  # 121 and 99 read the same reversed
    (chosen, chosen_mask), (rejected, rejected_mask) = answer_pairs(
        problems, correct_answers(problems), reversed_answers(problems))
    want = [(a, b) for a, b in problems.tolist() if str(a + b) != str(a + b)[::-1]]
    assert len(want) == 3 and chosen.shape[0] == rejected.shape[0] == 3 and chosen.shape == rejected.shape
    for i, (a, b) in enumerate(want):
        total = str(a + b)
        assert TOKENIZER.decode(chosen[i].tolist()).rstrip("#") == f"{a}+{b}={total}\n"
        assert TOKENIZER.decode(rejected[i].tolist()).rstrip("#") == f"{a}+{b}={total[::-1]}\n"
        prompt_length = len(f"{a}+{b}=")
        for mask in (chosen_mask, rejected_mask):
            assert mask[i].nonzero().flatten().tolist() == list(range(prompt_length, prompt_length + len(total) + 1))


def test_training_raises_held_out_pair_accuracy():
    """Seeded, ci sizes: a base model of 300 SFT steps, then 60 reward-model steps; pair accuracy on test pairs.

    The untrained head's accuracy is a random projection's (0.30-0.74 over head seeds 0-2 and CPU kernels); after 60
    steps it measured 0.966-0.970 with head seed 0 (ATEN_CPU_CAPABILITY default and avx512, one thread)."""
    split = addition_split()
    cfg = task_config("ci")
    base = task_model(cfg, seed=0)  # a weak base model is enough: 300 SFT steps
    train_sft(base, *noisy_sft_data(split["train"], cfg, seed=0), 300, cfg.batch_size, cfg.lr, seed=0)
    torch.manual_seed(0)
    model = ScalarHeadGPT(copy.deepcopy(base))
    test = split["test"][:300]
    test_pairs = answer_pairs(test, correct_answers(test), reversed_answers(test))
    before = pair_accuracy(model, *test_pairs)
    train = split["train"]
    history = train_reward_model(model, *answer_pairs(train, correct_answers(train), reversed_answers(train)), 60, seed=0)
    after = pair_accuracy(model, *test_pairs)
    assert len(history) == 60 and set(history[0]) == {"loss", "accuracy", "margin"}
    assert after > 0.9 and after > before + 0.15, (before, after)
    with pytest.raises(ValueError, match="one of each per pair"):
        train_reward_model(model, test_pairs[0], (test_pairs[1][0][:3], test_pairs[1][1][:3]), 1)
