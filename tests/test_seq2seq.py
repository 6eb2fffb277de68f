"""scratchlm.seq2seq: the number-to-words task, and T5 (original ReLU and v1.1 gated-GELU, tied and untied heads)
against transformers' T5ForConditionalGeneration: logits with padding, teacher-forced loss, greedy and beam-search
generate. Every reference is a small random transformers model saved with save_pretrained into tmp_path (its norm
weights moved away from 1); no downloads.
"""

import json

import pytest
import torch
from hf_checkpoints import jitter_norms, random_ids
from safetensors.torch import load_file, save_file
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration

import scratchlm
from scratchlm.gpt import from_hf
from scratchlm.seq2seq import (
    MAX_NUMBER,
    MAX_WORDS_LENGTH,
    T5,
    Seq2SeqCache,
    Seq2SeqTokenizer,
    T5Config,
    generate_seq2seq,
    load_translator,
    number_to_words,
    number_words_split,
    relative_position_bucket,
    save_translator,
    seq2seq_loss,
    shift_right,
    train_translator,
    translate,
    translator_config,
)

SIZES = dict(vocab_size=24, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
             relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
             eos_token_id=1)
CASES = {  # name -> (feed_forward_proj, untied head, num_decoder_layers)
    "relu-tied": ("relu", False, 2),
    "gated-gelu-untied": ("gated-gelu", True, 2),
    "relu-untied-3-decoder-layers": ("relu", True, 3),
    "gated-gelu-tied-3-decoder-layers": ("gated-gelu", False, 3),
}


def words_to_number(words: str) -> int:
    """The inverse of number_to_words, written independently (a parser of the words)."""
    units = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                        "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
    units.update({w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)})
    total = group = 0
    for word in words.split():
        if word == "thousand":
            total, group = group * 1000, 0
        elif word == "hundred":
            group *= 100
        else:
            group += sum(units[part] for part in word.split("-"))
    return total + group


def make_checkpoint(folder, name, seed=0, eos_boost=1.0):
    """A random T5ForConditionalGeneration saved in `folder`; eos_boost scales the EOS row of the head (so that
    greedy and beam search meet EOS at different steps in different rows)."""
    proj, untied, dec_layers = CASES[name]
    torch.manual_seed(seed)
    hf = T5ForConditionalGeneration(HFT5Config(**SIZES, feed_forward_proj=proj, num_decoder_layers=dec_layers,
                                               tie_word_embeddings=not untied))
    jitter_norms(hf)
    with torch.no_grad():
        hf.shared.weight[1] *= eos_boost
    hf.save_pretrained(folder)
    if untied:  # transformers 5 always ties on save; write a head of its own, as T5 v1.1 checkpoints have
        tensors = load_file(folder / "model.safetensors")
        tensors["lm_head.weight"] = torch.randn(SIZES["vocab_size"], SIZES["d_model"]) * 3
        tensors["lm_head.weight"][1] *= eos_boost
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((folder / "config.json").read_text())
        config["tie_word_embeddings"] = False
        config.pop("scale_decoder_outputs", None)
        (folder / "config.json").write_text(json.dumps(config))
        hf = T5ForConditionalGeneration.from_pretrained(folder)
    return hf.eval()


def padded_inputs(batch=3, length=9, seed=0):
    ids = random_ids(SIZES["vocab_size"] - 2, (batch, length), seed) + 2
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, length - 2 * row:] = 0
    return ids.masked_fill(mask == 0, 0), mask


# the task

def test_number_to_words_examples_and_an_independent_parser():
    assert number_to_words(4096) == "four thousand ninety-six"
    assert number_to_words(0) == "zero" and number_to_words(112) == "one hundred twelve"
    assert number_to_words(999_999) == "nine hundred ninety-nine thousand nine hundred ninety-nine"
    assert number_to_words(20_000) == "twenty thousand" and number_to_words(1_001) == "one thousand one"
    numbers = list(range(0, 2000)) + torch.randint(0, MAX_NUMBER + 1, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    assert all(words_to_number(number_to_words(n)) == n for n in numbers)
    assert max(len(number_to_words(n)) for n in range(0, MAX_NUMBER + 1, 37)) <= MAX_WORDS_LENGTH == 64


@pytest.mark.parametrize("bad", [-1, 1_000_000, 3.5, "12", True])
def test_number_to_words_refuses_what_is_not_in_range(bad):
    with pytest.raises(ValueError, match="number_to_words"):
        number_to_words(bad)


def test_split_is_disjoint_and_its_test_set_fixed():
    a = number_words_split(seed=0, n_train=3000, n_val=100, n_test=200)
    b = number_words_split(seed=1, n_train=500, n_val=50, n_test=200)
    assert [len(a[k]) for k in ("train", "val", "test")] == [3000, 100, 200]
    assert a["test"] == b["test"] and a["train"] != b["train"]
    numbers = {k: {int(d) for d, _ in v} for k, v in a.items()}
    assert not numbers["test"] & numbers["train"] and not numbers["test"] & numbers["val"]
    assert not numbers["val"] & numbers["train"] and min(numbers["test"]) >= 1000
    assert all(number_to_words(int(d)) == w for d, w in a["train"][:200])
    with pytest.raises(ValueError, match="n_train"):
        number_words_split(n_train=0)


def test_tokenizer_round_trip_specials_and_unknown_characters():
    tok = Seq2SeqTokenizer()
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 40)
    ids = tok.encode("four thousand ninety-six")
    assert tok.decode(ids) == "four thousand ninety-six" and min(ids) >= 2
    assert tok.decode([0] + ids[:4] + [1] + ids) == "four"  # start (pad) skipped, stops at EOS
    batch, mask = tok.batch(["12", "4096"])
    assert batch.tolist() == [tok.encode("12") + [1, 0, 0], tok.encode("4096") + [1]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="','"):
        tok.encode("4,096")


# T5 against transformers

def test_relative_position_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 16), (10, 20)):
            ours = relative_position_bucket(distance, bidirectional, buckets, max_distance)
            ref = T5Attention._relative_position_bucket(distance, bidirectional, buckets, max_distance)
            assert torch.equal(ours, ref)


@pytest.mark.parametrize("name", CASES)
def test_logits_and_loss_equal_transformers_with_padding(name, tmp_path):
    hf = make_checkpoint(tmp_path, name)
    model = scratchlm.from_hf(tmp_path)
    assert isinstance(model, T5) and model.config.tie_word_embeddings == (not CASES[name][1])
    assert model.config.feed_forward_proj == CASES[name][0] and len(model.decoder.blocks) == CASES[name][2]
    ids, mask = padded_inputs()
    labels = random_ids(SIZES["vocab_size"], (3, 6), seed=5)
    labels[1, 4:] = -100
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        logits = model(ids, shift_right(labels), mask)
        loss = seq2seq_loss(model, ids, mask, labels)
    assert (logits - ref.logits).abs().max() < 1e-5
    assert abs(loss.item() - ref.loss.item()) < 1e-5


def test_shift_right_equals_transformers(tmp_path):
    hf = make_checkpoint(tmp_path, "relu-tied")
    labels = torch.tensor([[5, 6, 7, 1], [8, 1, -100, -100]])
    assert torch.equal(shift_right(labels), hf._shift_right(labels))


def test_cached_decoding_equals_the_full_decoder(tmp_path):
    make_checkpoint(tmp_path, "gated-gelu-tied-3-decoder-layers")
    model = from_hf(tmp_path)
    ids, mask = padded_inputs()
    decoder_ids = random_ids(SIZES["vocab_size"], (3, 7), seed=3)
    with torch.no_grad():
        full = model(ids, decoder_ids, mask)
        encoded = model.encode(ids, mask)
        cache = Seq2SeqCache(model, encoded, mask)
        steps = [model.decode(decoder_ids[:, :3], None, cache=cache)]  # a prefix, then one token at a time
        steps += [model.decode(decoder_ids[:, t:t + 1], None, cache=cache) for t in range(3, 7)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-5 and cache.length == 7


@pytest.mark.parametrize("name", ["relu-tied", "gated-gelu-untied"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_equals_transformers(name, num_beams, tmp_path):
    """Rows stop at EOS at different steps (the boosted EOS row), some before max_new_tokens."""
    hf = make_checkpoint(tmp_path, name, eos_boost=4.0)
    model = from_hf(tmp_path)
    ids, mask = padded_inputs(batch=6, length=9, seed=1)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, num_beams=num_beams,
                          do_sample=False)
    ours = scratchlm.generate_seq2seq(model, ids, 12, attention_mask=mask, num_beams=num_beams)
    assert torch.equal(ours, ref)
    assert (ours[:, 1:] == 1).any()  # EOS occurred
    for row in ids.split(1):  # one row at a time: each stops at its own EOS, so lengths differ
        with torch.no_grad():
            ref = hf.generate(input_ids=row, max_new_tokens=12, num_beams=num_beams, do_sample=False)
        assert torch.equal(generate_seq2seq(model, row, 12, num_beams=num_beams), ref)


# bad input

def test_unsupported_feed_forward_is_refused(tmp_path):
    make_checkpoint(tmp_path, "relu-tied")
    config = json.loads((tmp_path / "config.json").read_text())
    for proj in ("gated-silu", "swish"):
        config["feed_forward_proj"] = proj
        (tmp_path / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=f"feed_forward_proj='{proj}'"):
            from_hf(tmp_path)
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gelu")


def test_mismatched_shapes_are_refused():
    model = T5(T5Config(**{k: v for k, v in SIZES.items()}))
    ids, mask = padded_inputs()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids, ids[:, :3], mask[:, :5])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate_seq2seq(model, ids, 4, attention_mask=mask[:2])
    with pytest.raises(ValueError, match="decoder_input_ids has batch 2 but input_ids has 3"):
        model(ids, ids[:2, :3], mask)
    with pytest.raises(ValueError, match="outside 0..23"):
        model(ids + 30, ids[:, :3])
    with pytest.raises(ValueError, match="num_beams"):
        generate_seq2seq(model, ids, 4, num_beams=0)


# training and checkpoints

def test_a_short_training_run_lowers_the_loss_and_saves_a_transformers_checkpoint(tmp_path):
    config, train_config = translator_config("ci")
    split = number_words_split(seed=0, n_train=400, n_val=40, n_test=20)
    train_config = type(train_config)(**{**train_config.__dict__, "max_steps": 12, "warmup_steps": 2,
                                         "eval_interval": 12})
    model, history = train_translator(split, config, train_config, progress_bar=False)
    assert history["val_loss"][-1] < history["val_loss"][0] - 1.0 and len(history["train_loss"]) == 12
    save_translator(model, tmp_path, metadata={"note": "test"})
    loaded, tokenizer = load_translator(tmp_path)
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask = tokenizer.batch(["4096", "12"])
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(generate_seq2seq(loaded, ids, 10, mask), ref)
    assert translate(loaded, ["4096", "12"], tokenizer, max_new_tokens=10) == \
        [tokenizer.decode(row[1:]) for row in ref.tolist()]
