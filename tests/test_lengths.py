"""scratchlm.lengths (notebooks/06_alignment/07_lengths.ipynb): the long-sum task. Problems are (N, 6) rows of 2-6
numbers in 1..9 then zeros; chain answers write the partial sums (checked against sums computed here), the annotator's
repeats change the length and never the final sum; left-padded encodings decode back to prompt + answer + EOS with
the mask on the answer; sample_sums returns ids of a fixed width with masks up to the first EOS; the checker reads only
the final sum of a finished answer; train_grpo runs with both hooks; clear errors for bad input.
"""

import copy

import pytest
import torch

from scratchlm.arith import EOS, PAD, TOKENIZER
from scratchlm.grpo import train_grpo
from scratchlm.lengths import (
    MAX_ANSWER,
    MAX_TERMS,
    PROMPT_LEN,
    annotator_answers,
    chain_answers,
    encode_sum_examples,
    encode_sum_prompts,
    final_sum_rewards,
    final_sums,
    lengths_model,
    sample_sums,
    sum_problems,
    sum_prompts,
)


def test_sum_problems_shape_range_and_seed():
    p = sum_problems(500, seed=4)
    assert p.shape == (500, MAX_TERMS)
    count = (p > 0).sum(1)
    assert count.min().item() == 2 and count.max().item() == 6  # 500 draws hit both ends
    for row, k in zip(p.tolist(), count.tolist(), strict=True):
        assert all(1 <= x <= 9 for x in row[:k]) and all(x == 0 for x in row[k:])
    assert torch.equal(p, sum_problems(500, seed=4)) and not torch.equal(p, sum_problems(500, seed=5))
    short = sum_problems(50, min_terms=3, max_terms=3)
    assert ((short > 0).sum(1) == 3).all()


def test_prompts_chains_and_sums():
    p = torch.tensor([[3, 5, 7, 0, 0, 0], [9, 9, 9, 9, 9, 9], [4, 2, 0, 0, 0, 0]])
    assert sum_prompts(p) == ["3+5+7=", "9+9+9+9+9+9=", "4+2="]
    assert chain_answers(p) == ["8=15", "18=27=36=45=54", "6"]
    assert final_sums(p) == [15, 54, 6]
    random = sum_problems(200, seed=1)
    expected = random.cumsum(1)  # partial sums, computed independently of chain_answers
    for chain, row, k in zip(chain_answers(random), expected.tolist(), (random > 0).sum(1).tolist(), strict=True):
        assert chain.split("=") == [str(s) for s in row[1:k]]


def test_annotator_repeats_change_length_not_the_sum():
    p = sum_problems(300, seed=2)
    assert annotator_answers(p, 0.0) == chain_answers(p)
    always = annotator_answers(p, 1.0)
    for a, c in zip(always, chain_answers(p), strict=True):
        fields = c.split("=")
        assert a.split("=") == [f for f in fields for _ in range(2)]
    some = annotator_answers(p, 0.3, torch.Generator().manual_seed(0))
    assert [a.split("=")[-1] for a in some] == [str(s) for s in p.sum(1).tolist()]
    lengths = [len(a) for a in some]
    assert any(a != c for a, c in zip(some, chain_answers(p), strict=True))
    assert max(lengths) + 1 <= MAX_ANSWER  # EOS included


def test_encoding_round_trip_and_mask():
    p = sum_problems(20, seed=3)
    answers = annotator_answers(p, 0.5, torch.Generator().manual_seed(1))
    ids, mask = encode_sum_examples(p, answers)
    assert ids.shape[1] == PROMPT_LEN + max(len(a) for a in answers) + 1
    for row, m, prompt, answer in zip(ids.tolist(), mask.tolist(), sum_prompts(p), answers, strict=True):
        text = TOKENIZER.decode(row)
        assert text.startswith(PAD * (PROMPT_LEN - len(prompt)) + prompt + answer + EOS)
        assert set(text[PROMPT_LEN + len(answer) + 1 :]) <= {PAD}
        assert sum(m) == len(answer) + 1 and all(m[PROMPT_LEN : PROMPT_LEN + len(answer) + 1])
    prompt_ids = encode_sum_prompts(p)
    assert torch.equal(prompt_ids, ids[:, :PROMPT_LEN])


def test_rewards_read_the_final_sum_of_finished_answers():
    p = torch.tensor([[3, 5, 7, 0, 0, 0], [4, 2, 0, 0, 0, 0]])
    answers = ["8=15\n", "15\n", "8=8=15\n", "8=16\n",  # problem 1 (15): right, right, right, wrong sum
               "6", "6=6\n", "=6\n", "7\n"]  # problem 2 (6): cut (no EOS), right, empty field, wrong
    assert final_sum_rewards(answers, p, 4).tolist() == [1, 1, 1, 0, 0, 1, 0, 0]


def test_sample_sums_fixed_width_and_masks():
    model = lengths_model(seed=0).eval()
    p = sum_problems(3, seed=0)
    ids, mask, answers = sample_sums(model, p, 4, torch.Generator().manual_seed(0), max_new_tokens=10)
    assert ids.shape == mask.shape == (12, PROMPT_LEN + 10) and len(answers) == 12
    assert not mask[:, :PROMPT_LEN].any()
    for row, m, answer in zip(ids.tolist(), mask.tolist(), answers, strict=True):
        assert sum(m) == len(answer)  # the EOS, when there is one, is part of both
        assert TOKENIZER.decode(row[PROMPT_LEN : PROMPT_LEN + len(answer)]) == answer
        assert answer.endswith(EOS) or len(answer) == 10  # finished, or cut by the budget
        assert EOS not in answer[:-1]
    prompts = [TOKENIZER.decode(r) for r in ids[::4, :PROMPT_LEN].tolist()]
    assert [t.lstrip(PAD) for t in prompts] == sum_prompts(p)


def test_train_grpo_with_the_hooks():
    base = lengths_model(seed=0).eval()
    policy = copy.deepcopy(base)
    history = train_grpo(policy, copy.deepcopy(base), sum_problems(100, seed=0), 2, group_size=4,
                         prompts_per_step=4, loss_type="dr_grpo", num_iterations=2, seed=0, sample=sample_sums,
                         reward=final_sum_rewards)
    assert len(history) == 2
    assert all(1 <= h["completion_length"] <= MAX_ANSWER and 0 <= h["clip_ratio"] <= 1 for h in history)
    # an untrained model is never right, so every advantage is 0: a reward with spread (finished or not) moves it
    finished = lambda answers, problems, group_size: torch.tensor([float(a.endswith(EOS)) for a in answers])
    history = train_grpo(policy, copy.deepcopy(base), sum_problems(100, seed=0), 2, group_size=4,
                         prompts_per_step=4, seed=0, sample=sample_sums, reward=finished)
    assert any(h["reward"] > 0 for h in history)
    assert any((a - b).abs().max() > 0 for a, b in zip(policy.parameters(), base.parameters(), strict=True))


@pytest.mark.parametrize("call, message", [
    (lambda: sum_prompts(torch.zeros(2, 4, dtype=torch.long)), "must be an \\(N, 6\\) tensor"),
    (lambda: sum_prompts([[3, 5, 0, 0, 0, 0]]), "must be an \\(N, 6\\) tensor"),
    (lambda: sum_prompts(torch.tensor([[3, 0, 5, 0, 0, 0]])), "followed by zeros"),
    (lambda: sum_prompts(torch.tensor([[3, 0, 0, 0, 0, 0]])), "2 to 6 numbers"),
    (lambda: sum_prompts(torch.tensor([[3, 12, 0, 0, 0, 0]])), "in 1..9"),
    (lambda: sum_problems(4, min_terms=1), "min_terms"),
    (lambda: sum_problems(4, min_terms=4, max_terms=3), "min_terms"),
    (lambda: sum_problems(4, max_terms=7), "max_terms"),
    (lambda: annotator_answers(sum_problems(2), repeat=1.5), "probability"),
    (lambda: encode_sum_examples(sum_problems(2), ["1"]), "2 problems but 1 answers"),
    (lambda: encode_sum_examples(sum_problems(1, min_terms=2, max_terms=2), ["1=" * 20 + "1"]), "MAX_ANSWER"),
    (lambda: final_sum_rewards(["8=15\n"] * 3, torch.tensor([[3, 5, 7, 0, 0, 0]]), 2), "group_size"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()
