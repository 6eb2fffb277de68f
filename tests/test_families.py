"""scratchlm.families: the encoder-only slot model, the decoder-only framing, equal sizes, bad input."""

import pytest
import torch
import torch.nn.functional as F

from scratchlm.bert import BertConfig
from scratchlm.families import (
    MAX_DIGITS,
    N_SLOTS,
    SEP_ID,
    SEQUENCE_LENGTH,
    SLOT_ID,
    TOKENIZER,
    VOCAB_SIZE,
    SlotModel,
    decode_answer,
    decoder_examples,
    decoder_loss,
    decoder_translate,
    matched_configs,
    slot_inputs,
    slot_loss,
    slot_targets,
    slot_translate,
    train_pairs,
    words_to_number,
)
from scratchlm.gpt import GPT, GPTConfig
from scratchlm.seq2seq import T5, T5Config, number_to_words
from scratchlm.train import TrainConfig


def tiny_slot_model(n_slots: int = N_SLOTS) -> SlotModel:
    torch.manual_seed(0)
    return SlotModel(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=MAX_DIGITS + 1 + n_slots), n_slots)


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB_SIZE, block_size=SEQUENCE_LENGTH, n_layer=1, n_head=2, n_embd=16))


def test_slot_inputs_layout_and_model_shapes():
    ids, mask = slot_inputs(["4096", "7"])
    assert ids.shape == mask.shape == (2, MAX_DIGITS + 1 + N_SLOTS)
    assert ids[0, :4].tolist() == TOKENIZER.encode("4096") and ids[1, 0].item() == TOKENIZER.encode("7")[0]
    assert mask[0].tolist()[:MAX_DIGITS] == [1, 1, 1, 1, 0, 0] and mask[1].tolist()[:MAX_DIGITS] == [1, 0, 0, 0, 0, 0]
    assert (ids[:, MAX_DIGITS] == SEP_ID).all() and (ids[:, MAX_DIGITS + 1 :] == SLOT_ID).all()
    assert (mask[:, MAX_DIGITS:] == 1).all()
    model = tiny_slot_model()
    logits = model(ids, mask)
    assert logits.shape == (2, N_SLOTS, VOCAB_SIZE)
    out = slot_translate(model, ["4096", "7", "999999"])
    assert len(out) == 3 and all(isinstance(s, str) and len(s) <= N_SLOTS for s in out)


def test_slot_loss_ignores_padding_slots():
    words = ["four thousand ninety-six", "seven"]
    targets = slot_targets(words)
    for row, w in zip(targets, words, strict=True):
        n = len(w) + 1
        assert row[:n].tolist() == TOKENIZER.encode(w) + [TOKENIZER.eos_id]
        assert (row[n:] == -100).all()
    model = tiny_slot_model()
    ids, mask = slot_inputs(["4096", "7"])
    with torch.no_grad():
        logits = model(ids, mask)
        kept = targets != -100
        expected = F.cross_entropy(logits[kept], targets[kept])  # only the answer slots and their </s>
        assert torch.allclose(slot_loss(model, ids, mask, targets), expected, atol=1e-6)
        scrambled = logits.clone()
        scrambled[~kept] = 50 * torch.randn_like(scrambled[~kept])
        a = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        b = F.cross_entropy(scrambled.flatten(0, 1), targets.flatten(), ignore_index=-100)
        assert a == b


def test_slot_loss_reads_padding_digits_not():
    # the digit places after a short number are masked: what sits there does not change the slots' logits
    model = tiny_slot_model().eval()
    ids, mask = slot_inputs(["7"])
    other = ids.clone()
    other[0, 1:MAX_DIGITS] = torch.tensor(TOKENIZER.encode("12345"))
    with torch.no_grad():
        assert torch.allclose(model(ids, mask), model(other, mask), atol=1e-5)


def test_decoder_examples_mask_covers_only_the_answer():
    pairs = [("4096", "four thousand ninety-six"), ("7", "seven")]
    ids, answer_mask = decoder_examples(pairs)
    for row, m, (d, w) in zip(ids, answer_mask, pairs, strict=True):
        full = TOKENIZER.encode(d) + [SEP_ID] + TOKENIZER.encode(w) + [TOKENIZER.eos_id]
        assert row[: len(full)].tolist() == full and (row[len(full) :] == TOKENIZER.pad_id).all()
        expected = [False] * (len(d) + 1) + [True] * (len(w) + 1) + [False] * (len(row) - len(full))
        assert m.tolist() == expected
    model = tiny_gpt()
    with torch.no_grad():
        logits = model(ids[:, :-1])
        losses = [F.cross_entropy(logits[i, t], ids[i, t + 1]) for i in range(2) for t in range(ids.size(1) - 1)
                  if answer_mask[i, t + 1]]
        assert len(losses) == 25 + 6
        assert torch.allclose(decoder_loss(model, ids, answer_mask), torch.stack(losses).mean(), atol=1e-6)
        # the digits and "=" are not predicted: changing what the model says there changes nothing
        bigger = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
        assert torch.allclose(decoder_loss(model, bigger, torch.cat([answer_mask, torch.zeros(2, 3, dtype=torch.bool)], 1)),
                              decoder_loss(model, ids, answer_mask), atol=1e-6)
    out = decoder_translate(model, ["4096", "7", "12"])
    assert len(out) == 3 and all(isinstance(s, str) for s in out)


def test_answer_longer_than_the_slots_is_a_clear_error():
    with pytest.raises(ValueError, match="n_slots"):
        slot_targets([number_to_words(777_777)], n_slots=40)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        SlotModel(BertConfig(vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=40))
    with pytest.raises(ValueError, match="vocab_size"):
        SlotModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, max_position_embeddings=SEQUENCE_LENGTH))
    with pytest.raises(ValueError, match="input_ids must be"):
        tiny_slot_model()(torch.zeros(1, 10, dtype=torch.long))


@pytest.mark.parametrize("bad", [["4,096"], ["1000000"], ["-5"], [""], "4096", []])
def test_bad_numbers(bad):
    with pytest.raises(ValueError):
        slot_inputs(bad)
    if isinstance(bad, list) and bad:
        with pytest.raises(ValueError):
            decoder_examples([(bad[0], "x")])


def test_matched_configs_equal_sizes():
    t5 = T5Config(vocab_size=TOKENIZER.vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                  feed_forward_proj="gated-gelu")
    gpt_config, bert_config = matched_configs(t5)
    n_t5 = sum(p.numel() for p in T5(t5).parameters())
    n_gpt = GPT(gpt_config).num_parameters()
    n_bert = SlotModel(bert_config).num_parameters()
    assert gpt_config.n_layer == bert_config.num_hidden_layers == 4
    assert abs(n_gpt - n_t5) / n_t5 < 0.03 and abs(n_bert - n_t5) / n_t5 < 0.03


def test_decode_answer_shows_input_only_ids():
    assert decode_answer(TOKENIZER.encode("ten") + [SEP_ID, SLOT_ID, TOKENIZER.eos_id, 5]) == "ten=_"


def test_words_to_number():
    for n in (0, 7, 12, 20, 99, 100, 4096, 10_000, 100_001, 777_777, 999_999):
        assert words_to_number(number_to_words(n)) == n
    for bad in ("", "four thousand ninty-six", "thousand", "one thousand thousand", "seven hundred seven hundred",
                "four thousand  six"):
        assert words_to_number(bad) is None


def test_train_pairs_learns_and_checks_rows():
    model = tiny_gpt()
    pairs = [(str(n), number_to_words(n)) for n in range(0, 64)]
    data = decoder_examples(pairs)
    cfg = TrainConfig(batch_size=16, max_steps=30, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=15,
                      weight_decay=0.0, device="cpu")
    history = train_pairs(model, decoder_loss, data, data, cfg, progress_bar=False)
    assert len(history["train_loss"]) == 30 and history["val_step"] == [0, 15, 30]
    assert history["val_loss"][-1] < history["val_loss"][0]
    with pytest.raises(ValueError, match="one row per example"):
        train_pairs(model, decoder_loss, (data[0], data[1][:3]), data, cfg, progress_bar=False)
