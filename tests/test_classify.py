"""scratchlm.classify (notebooks/07_encoders/02_classification.ipynb): the poolings on a hand-made batch, the GPT's
last-token classifier against transformers' GPT2ForSequenceClassification on the same weights, padding invariance
on a BERT and a GPT, what each training method may change (head only: nothing in the backbone; LoRA: only the
adapters and the head), the cached-features shortcut, the speaker task's split on a made-up play, the
acceptability task's corruptions and split, and the errors.
"""

import copy
import random

import pytest
import torch

from scratchlm.bert import Bert, BertConfig
from scratchlm.classify import (
    CORRUPTIONS,
    SequenceClassifier,
    acceptability_task,
    accuracy,
    corrupt,
    encode_texts,
    fine_tune,
    labelled_subset,
    last_token_index,
    lora_targets,
    pool,
    prepare_training,
    speaker_task,
    speeches,
    train_classifier,
    trainable_parameters,
)
from scratchlm.gpt import GPT, GPTConfig, from_hf


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=16))


def tiny_bert(seed=0):
    torch.manual_seed(seed)
    return Bert(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=16))


class ToyTokenizer:
    pad_id, cls_id = 0, 1

    def encode(self, text):
        return [2 + "abcdefghijklmnopq".index(ch) for ch in text]


def toy_batch(n=24, seed=0):
    """n right-padded rows of ids 2..19 after [CLS]=1, lengths 3..12, and labels 0..2."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n,), generator=g)
    ids = torch.zeros(n, 12, dtype=torch.long)
    mask = torch.zeros(n, 12, dtype=torch.long)
    for i, n_i in enumerate(lengths.tolist()):
        ids[i, 0] = 1
        ids[i, 1:n_i] = torch.randint(2, 20, (n_i - 1,), generator=g)
        mask[i, :n_i] = 1
    return ids, mask, torch.randint(0, 3, (n,), generator=g)


def test_pool_on_a_hand_made_batch():
    hidden = torch.arange(30, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert pool(hidden, mask, "cls").tolist() == [[0, 1, 2], [15, 16, 17]]
    assert pool(hidden, mask, "last").tolist() == [[9, 10, 11], [18, 19, 20]]  # row 0 token 3, row 1 token 1
    # row 0: mean of tokens 0..3 = (0 + 3 + 6 + 9) / 4 = 4.5 in channel 0; row 1: (15 + 18) / 2 = 16.5
    assert torch.allclose(pool(hidden, mask, "mean"), torch.tensor([[4.5, 5.5, 6.5], [16.5, 17.5, 18.5]]))


def test_last_token_index_either_padding_side():
    assert last_token_index(torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]])).tolist() == [1, 3, 3, 1]


def test_gpt_last_token_classifier_equals_transformers(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    config = GPT2Config(vocab_size=20, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    theirs = GPT2ForSequenceClassification(config).eval()
    lm = GPT2LMHeadModel(config)
    lm.transformer.load_state_dict(theirs.transformer.state_dict())
    lm.save_pretrained(tmp_path)
    ours = SequenceClassifier(from_hf(tmp_path), 3, "last").eval()
    with torch.no_grad():
        ours.head.weight.copy_(theirs.score.weight)  # transformers' score head has no bias
        ours.head.bias.zero_()
    ids, mask, _ = toy_batch(8)  # padded on the right with id 0, transformers' pad_token_id
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, mask)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("make, pooling", [(tiny_gpt, "last"), (tiny_gpt, "mean"), (tiny_bert, "cls"),
                                           (tiny_bert, "mean"), (tiny_bert, "last")])
def test_padding_changes_nothing(make, pooling):
    ids, mask, _ = toy_batch(6)
    clf = SequenceClassifier(make(), 3, pooling).eval()
    with torch.no_grad():
        batched = clf(ids, mask)
        alone = torch.cat([clf(ids[i : i + 1, : int(m.sum())], m[None, : int(m.sum())]) for i, m in enumerate(mask)])
    assert (batched - alone).abs().max() < 1e-5


def test_head_only_leaves_the_backbone_unchanged():
    ids, mask, labels = toy_batch()
    for cache in (False, True):
        clf = prepare_training(SequenceClassifier(tiny_gpt(), 3, "last"), "head")
        backbone_before = copy.deepcopy(clf.backbone.state_dict())
        head_before = clf.head.weight.detach().clone()
        assert trainable_parameters(clf) == 16 * 3 + 3
        train_classifier(clf, ids, mask, labels, steps=5, lr=1e-2, cache_features=cache, show=False)
        assert all(torch.equal(v, clf.backbone.state_dict()[k]) for k, v in backbone_before.items())
        assert not torch.equal(head_before, clf.head.weight)


def test_cached_features_give_the_plain_losses():
    ids, mask, labels = toy_batch()
    losses = []
    for cache in (False, True):
        torch.manual_seed(0)
        clf = prepare_training(SequenceClassifier(tiny_bert(), 3, "mean"), "head")
        losses.append(train_classifier(clf, ids, mask, labels, steps=8, lr=1e-2, cache_features=cache, show=False))
    assert max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-5


@pytest.mark.parametrize("make", [tiny_gpt, tiny_bert])
def test_lora_trains_only_the_adapters_and_the_head(make):
    ids, mask, labels = toy_batch()
    clf = prepare_training(SequenceClassifier(make(), 3, "mean"), "lora", r=2, alpha=4)
    names = [n for n, p in clf.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n or n.startswith("head.") for n in names)
    before = copy.deepcopy(clf.state_dict())
    train_classifier(clf, ids, mask, labels, steps=5, lr=1e-2, show=False)
    changed = {k for k, v in clf.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k or k.startswith("head.") for k in changed)
    assert any("lora_B" in k for k in changed)  # B starts at zero, so its move is the adapters' first change


def test_full_fine_tuning_moves_the_backbone():
    ids, mask, labels = toy_batch()
    clf = prepare_training(SequenceClassifier(tiny_gpt(), 3, "last"), "full")
    before = copy.deepcopy(clf.backbone.state_dict())
    train_classifier(clf, ids, mask, labels, steps=3, lr=1e-2, show=False)
    assert any(not torch.equal(v, clf.backbone.state_dict()[k]) for k, v in before.items())


def test_lora_targets_are_the_blocks_linear_layers():
    assert lora_targets(tiny_gpt()) == ["c_attn", "c_fc", "c_proj"]
    assert lora_targets(tiny_bert()) == ["fc_in", "fc_out", "out_proj", "qkv"]


def test_fine_tune_leaves_its_backbone_alone_and_learns_an_easy_task():
    # label = whether the line's last character is id 2: the last token holds it
    ids, mask, _ = toy_batch(64)
    last = ids[torch.arange(64), last_token_index(mask)]
    ids[torch.arange(64), last_token_index(mask)] = torch.where(torch.arange(64) % 2 == 0, 2, last.clamp(min=3))
    labels = (ids[torch.arange(64), last_token_index(mask)] == 2).long()
    gpt = tiny_gpt()
    before = copy.deepcopy(gpt.state_dict())
    r = fine_tune(gpt, "last", "full", (ids[:48], mask[:48], labels[:48]), (ids[48:], mask[48:], labels[48:]),
                  steps=60, lr=1e-2)
    assert all(torch.equal(v, gpt.state_dict()[k]) for k, v in before.items())
    assert r["train_accuracy"] == 1.0 and r["accuracy"] >= 0.9


def test_encode_texts():
    ids, mask = encode_texts(["abc", "abcdefgh"], ToyTokenizer(), context=6)
    assert ids.tolist() == [[1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 5, 6]]  # [CLS] first, cut at 6, right padding
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6]
    ids, _ = encode_texts(["ab"], ToyTokenizer(), context=6, cls=False)
    assert ids.tolist() == [[2, 3]]


PLAY = "\n\n".join(["Prologue line without a speaker"] + [
    "A:\nA1 one\nA1 two", "B:\nB1 one", "A:\nA2 one", "C:\nC1 one", "B:\nB2 one\nB2 two", "A:\nA3 one\nA3 two\nA3 three",
    "B:\nB3 one", "A:\nA4 one", "C:\nC2 one", "B:\nB4 one", "A:\nA5 one", "B:\nB5 one\nB5 two"]) + "\n"


def test_speaker_task_splits_by_speech():
    every = speeches(PLAY)
    assert [s for s, _, _ in every][:3] == ["A", "B", "A"] and every[0][1] == ["A1 one", "A1 two"]
    assert all(PLAY[offset:].startswith(name + ":\n") for name, _, offset in every)
    task = speaker_task(n_speakers=2, test_fraction=0.4, seed=0, unseen_fraction=1.0, text=PLAY)
    assert task.speakers == ["A", "B"]  # A has 8 lines, B 7, C 2
    train_speeches, test_speeches = {s for _, _, s in task.train}, {s for _, _, s in task.test}
    assert not train_speeches & test_speeches
    assert len(task.train) + len(task.test) == 15
    assert {(line[0], label) for line, label, _ in task.train + task.test} == {("A", 0), ("B", 1)}
    assert len({s for s in test_speeches if every[s][0] == "A"}) == 2  # round(0.4 * 5 speeches)
    assert speaker_task(2, 0.4, 0, 1.0, PLAY) == task and speaker_task(2, 0.4, 1, 1.0, PLAY) != task
    late = speaker_task(n_speakers=2, unseen_fraction=0.5, text=PLAY)
    start = int(0.5 * len(PLAY))
    assert all(every[s][2] >= start for _, _, s in late.train + late.test)


WORDS = ["good", "morrow", "gentle", "sir", "pray", "daughter", "called", "fair", "virtuous", "wrong"]
VERSE = "\n\n".join(
    f"{'ABC'[i % 3]}:\n" + "\n".join(" ".join(WORDS[(i + j + k) % 10] for k in range(4)) for j in range(1 + i % 3))
    for i in range(30)) + "\n"


def test_corrupt_changes_the_line_as_named():
    rng = random.Random(0)
    line = "good morrow, gentle sir"
    for kind in CORRUPTIONS:
        out = corrupt(line, kind, rng)
        assert out != line and sorted(out) == sorted(line)  # the same characters, moved
    chars = corrupt(line, "chars", random.Random(1))
    diff = [i for i, (a, b) in enumerate(zip(line, chars, strict=True)) if a != b]
    assert len(diff) == 2 and diff[1] == diff[0] + 1 and line[diff[0]].isalpha() and line[diff[1]].isalpha()
    assert sorted(corrupt(line, "words", random.Random(2)).split(" ")) == sorted(line.split(" "))
    assert corrupt("aa bb", "chars", rng) is None and corrupt("one", "words", rng) is None
    assert corrupt("a cat", "shuffle", rng) is None


@pytest.mark.parametrize("kind", CORRUPTIONS)
@pytest.mark.parametrize("edits", [1, 2, 3])
def test_acceptability_task(kind, edits):
    task = acceptability_task(kind, edits, test_fraction=0.3, seed=0, unseen_fraction=1.0, text=VERSE)
    for rows, originals in ((task.train, task.originals_train), (task.test, task.originals_test)):
        real = sum(label for _, label, _ in rows)
        assert len(rows) >= 10 and abs(2 * real - len(rows)) <= 1  # balanced within one line
        for (text, label, _), original in zip(rows, originals, strict=True):
            assert (text == original) == (label == 1)  # corrupted lines differ from their originals
            assert sorted(text) == sorted(original)
    assert not {s for _, _, s in task.train} & {s for _, _, s in task.test}  # no speech on both sides
    assert acceptability_task(kind, edits, 0.3, 0, 1.0, VERSE) == task  # deterministic for a seed
    assert acceptability_task(kind, edits, 0.3, 1, 1.0, VERSE) != task
    late = acceptability_task(kind, edits, unseen_fraction=0.5, text=VERSE)
    start = int(0.5 * len(VERSE))
    every = speeches(VERSE)
    assert all(every[s][2] >= start for _, _, s in late.train + late.test)


def test_labelled_subset_is_nested():
    ids, mask, labels = toy_batch(30)
    small, big = labelled_subset((ids, mask, labels), 10), labelled_subset((ids, mask, labels), 20)
    assert torch.equal(small[0], big[0][:10]) and torch.equal(small[2], big[2][:10])


@pytest.mark.parametrize("call, message", [
    (lambda: SequenceClassifier(tiny_gpt(), 1), "num_labels must be an integer >= 2"),
    (lambda: SequenceClassifier(tiny_gpt(), True), "num_labels must be an integer >= 2"),
    (lambda: SequenceClassifier(tiny_gpt(), 3, pooling="max"), "pooling='max' is not one of"),
    (lambda: prepare_training(SequenceClassifier(tiny_gpt(), 3), "adapters"), "method='adapters' is not one of"),
    (lambda: train_classifier(prepare_training(SequenceClassifier(tiny_gpt(), 3), "head"), *toy_batch()[:2],
                              toy_batch()[2] + 1, steps=1, show=False), r"labels must be in 0\.\.2"),
    (lambda: train_classifier(prepare_training(SequenceClassifier(tiny_gpt(), 3), "head"), *toy_batch()[:2],
                              toy_batch()[2] - 1, steps=1, show=False), r"labels must be in 0\.\.2"),
    (lambda: accuracy(SequenceClassifier(tiny_gpt(), 3), *toy_batch()[:2], toy_batch()[2].float()), "torch.long"),
    (lambda: accuracy(SequenceClassifier(tiny_gpt(), 3), *toy_batch()[:2], toy_batch()[2][:5]), "one class index"),
    (lambda: train_classifier(SequenceClassifier(tiny_gpt(), 3).requires_grad_(False), *toy_batch(), steps=1,
                              show=False), "nothing to train"),
    (lambda: SequenceClassifier(tiny_gpt(), 3)(torch.tensor([[0, 1, 5]]), torch.tensor([[0, 1, 1]])),
     "padding on the right"),
    (lambda: pool(torch.zeros(2, 3, 4), torch.tensor([[1, 1, 0], [0, 0, 0]]), "mean"), "no real token"),
    (lambda: pool(torch.zeros(2, 3, 4), torch.ones(2, 4), "mean"), "attention_mask has shape"),
    (lambda: speaker_task(n_speakers=1, text=PLAY), "n_speakers must be an integer >= 2"),
    (lambda: speaker_task(n_speakers=4, unseen_fraction=1.0, text=PLAY), "only 3 speakers"),
    (lambda: speaker_task(test_fraction=1.0, text=PLAY), "test_fraction"),
    (lambda: encode_texts(["ab"], ToyTokenizer(), context=1), "leaves no room"),
    (lambda: labelled_subset(toy_batch(5), 6), "the training set has 5 rows"),
    (lambda: acceptability_task("typos", text=VERSE), "corruption='typos' is not one of"),
    (lambda: acceptability_task(edits=0, text=VERSE), "edits must be an integer >= 1"),
    (lambda: acceptability_task(test_fraction=0.0, text=VERSE), "test_fraction"),
    (lambda: acceptability_task(unseen_fraction=0.0, text=VERSE), "unseen_fraction"),
    (lambda: corrupt("a line", "typos", random.Random(0)), "corruption='typos' is not one of"),
])
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_backbone_without_hidden_states_is_refused():
    with pytest.raises(TypeError, match="neither .encode"):
        SequenceClassifier(torch.nn.Linear(2, 2), 3)
