"""scratchlm.arith (notebooks/06_alignment/00_noisy_addition.ipynb), the chapter's task: the split is a fixed
partition of all 8,100 problems, the annotator reverses about the asked share of answers, the mask covers exactly
the answer tokens, the three routes to the answer loss agree, greedy answers are the argmax chain, and a seeded
ci-profile SFT run learns the task's format (direction: its answers are correct or reversed far above chance).
"""

import pytest
import torch
import torch.nn.functional as F

from scratchlm.arith import (
    BASE_RECIPE,
    EOS,
    PAD,
    TOKENIZER,
    accuracy,
    addition_split,
    answer_loss,
    base_model,
    correct_answers,
    encode_examples,
    greedy_answers,
    load_base,
    noisy_answers,
    noisy_sft_data,
    prompts,
    reversed_answers,
    save_base,
    task_config,
    task_model,
    token_logps,
    train_sft,
)


def test_split_is_a_fixed_partition():
    split = addition_split()
    assert {k: len(v) for k, v in split.items()} == {"test": 1500, "val": 500, "train": 6100}
    seen = [tuple(p) for v in split.values() for p in v.tolist()]
    assert len(set(seen)) == 8100 and all(10 <= a <= 99 and 10 <= b <= 99 for a, b in seen)
    assert torch.equal(addition_split()["test"], split["test"])


def test_annotator_and_answers():
    problems = torch.tensor([[37, 45], [50, 60], [99, 99]])
    assert prompts(problems) == ["37+45=", "50+60=", "99+99="]
    assert correct_answers(problems) == ["82", "110", "198"]
    assert reversed_answers(problems) == ["28", "011", "891"]
    many = addition_split()["train"]
    answers = noisy_answers(many, 0.3, torch.Generator().manual_seed(0))
    flipped = sum(a != c for a, c in zip(answers, correct_answers(many), strict=True))
    palindromes = sum(c == r for c, r in zip(correct_answers(many), reversed_answers(many), strict=True))
    assert abs(flipped / (len(many) - palindromes) - 0.3) < 0.03


def test_mask_covers_the_answer_and_eos_only():
    ids, mask = encode_examples(["12+34=", "99+99="], ["46", "198"])
    assert ids.shape == (2, 10)
    assert TOKENIZER.decode(ids[0].tolist()) == "12+34=46" + EOS + PAD
    assert mask[0].tolist() == [False] * 6 + [True] * 3 + [False]
    assert mask[1].tolist() == [False] * 6 + [True] * 4


def test_answer_loss_token_logps_and_a_loop_agree():
    model = task_model(task_config("ci"), seed=0).eval()
    ids, mask = encode_examples(["12+34=", "99+99=", "10+10="], ["46", "198", "02"])
    with torch.no_grad():
        loop = [-F.log_softmax(model(row[None, :t + 1])[0, -1], -1)[row[t + 1]]
                for row, m in zip(ids, mask, strict=True) for t in range(len(row) - 1) if m[t + 1]]
        loop = torch.stack(loop)
        torch.testing.assert_close(answer_loss(model, ids, mask), loop.mean())
        torch.testing.assert_close(-token_logps(model, ids, mask).sum(), loop.sum())


def test_greedy_answers_follow_the_argmax():
    model = task_model(task_config("ci"), seed=3).eval()
    problems = addition_split()["test"][:5]
    got = greedy_answers(model, problems)
    for prompt, answer in zip(prompts(problems), got, strict=True):
        ids = TOKENIZER.encode(prompt)
        want = ""
        for _ in range(4):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(nxt)
            if TOKENIZER.decode([nxt]) == EOS:
                break
            want += TOKENIZER.decode([nxt])
        assert answer == want


def test_ci_sft_learns_the_annotators_two_answers():
    """Seeded, ci profile: direction only. The ci model is too small to reach the cpu profile's 51%, but after
    600 steps over a quarter of its held-out answers are the correct or the reversed sum (chance: ~1 in 100)."""
    cfg = task_config("ci")
    split = addition_split()
    model = task_model(cfg, seed=0)
    losses = train_sft(model, *noisy_sft_data(split["train"], cfg, seed=0), cfg.sft_steps, cfg.batch_size, cfg.lr)
    assert losses[-1] < losses[0] / 2
    test = split["test"][:500]
    answers = greedy_answers(model, test)
    either = sum(a in (c, r) for a, c, r in zip(answers, correct_answers(test), reversed_answers(test), strict=True))
    assert either / len(test) > 0.25
    assert 0.1 < accuracy(model, test) < 0.9


def test_bad_input():
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        encode_examples(["1+1=", "2+2="], ["2"])
    with pytest.raises(ValueError, match="not a profile"):
        task_config("laptop")


def test_the_split_deals_unordered_pairs():
    """A problem and its commuted twin always share a split: no held-out problem's twin is trained on. The sizes are
    the asked ones, the splits partition all 8,100 problems, and the same seed gives the same split."""
    split = addition_split()
    assert {k: len(v) for k, v in split.items()} == {"test": 1500, "val": 500, "train": 6100}
    name_of = {tuple(p): name for name, problems in split.items() for p in problems.tolist()}
    assert len(name_of) == 8100
    assert all(name_of[(b, a)] == name for (a, b), name in name_of.items())
    assert all(torch.equal(split[k], addition_split()[k]) for k in split)
    assert not torch.equal(addition_split(seed=1)["test"], split["test"])


def test_base_model_is_saved_once_and_loaded(tmp_path, monkeypatch):
    """base_model trains and saves when the folder holds no base, and loads (without training) when it does; a base
    of another seed, profile or recipe is trained again, not loaded; load_base refuses an older recipe."""
    import json

    calls = []

    def quick_sft(model, *args, **kwargs):  # stands in for a minute of training; changes the weights
        calls.append(1)
        with torch.no_grad():
            model.lm_head.weight.add_(1.0)
        return [0.0]

    monkeypatch.setattr("scratchlm.arith.train_sft", quick_sft)
    folder = tmp_path / "base"
    first, cfg = base_model(seed=3, profile="ci", folder=folder)
    assert calls == [1] and cfg == task_config("ci")
    assert sorted(p.name for p in folder.parent.iterdir()) == ["base"]  # no temporary folder left behind
    again, _ = base_model(seed=3, profile="ci", folder=folder)
    assert calls == [1]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True))
    base_model(seed=4, profile="ci", folder=folder)  # another seed: trained again, and saved over the old one
    base_model(seed=4, profile="cpu", folder=folder)  # another profile's TaskConfig: trained again
    assert calls == [1, 1, 1]

    old = tmp_path / "old"
    save_base(first, cfg, old, seed=0)
    saved = json.loads((old / "task_config.json").read_text())
    assert saved["seed"] == 0 and saved["recipe"] == BASE_RECIPE
    (old / "task_config.json").write_text(json.dumps({**saved, "recipe": BASE_RECIPE - 1}))
    with pytest.raises(ValueError, match="older recipe"):
        load_base(old)
    with pytest.raises(FileNotFoundError, match="holds no base model"):
        load_base(tmp_path / "nothing")
