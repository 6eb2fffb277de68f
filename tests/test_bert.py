"""scratchlm.bert: BERT (masked LM) against transformers' BertForMaskedLM, the masking recipe, the char models.

References: small random transformers BertForMaskedLM models (noise added to the LayerNorms and biases, which it
initialises to constants), saved with save_pretrained into tmp_path and loaded with scratchlm's from_hf; their
logits (fp32, eager and SDPA attention) on padded batches with token types. No downloads.
"""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig as HFBertConfig
from transformers import BertForMaskedLM

import scratchlm
import scratchlm.bert  # noqa: F401  (registers "bert", in case scratchlm.MODEL_MODULES does not list it)
from scratchlm.bert import (
    Bert,
    BertConfig,
    bert_config_from_hf,
    char_tokenizer,
    mask_tokens,
    pretrained_char_models,
)
from scratchlm.gpt import GPT, CheckpointMismatchError

SIZES = dict(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
             max_position_embeddings=20)
CASES = {  # name -> transformers config
    "2-layers-4-heads": HFBertConfig(**SIZES),
    "1-layer-1-head-3-types": HFBertConfig(**{**SIZES, "num_hidden_layers": 1, "num_attention_heads": 1,
                                             "type_vocab_size": 3}),
    "3-layers-12-heads-eps": HFBertConfig(**{**SIZES, "num_hidden_layers": 3, "num_attention_heads": 12,
                                            "intermediate_size": 64, "layer_norm_eps": 1e-5, "pad_token_id": 5}),
}


def tiny_bert(config: HFBertConfig, folder, seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def padded_batch(config: HFBertConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:], mask[2, 2:] = 0, 0  # 11, 7 and 2 real tokens
    types = torch.randint(0, config.type_vocab_size, (3, 11), generator=g)
    return ids, mask, types


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_logits_match_transformers_with_padding_and_token_types(tmp_path, name, impl):
    config = CASES[name]
    tiny_bert(config, tmp_path)
    reference = BertForMaskedLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
    ours = scratchlm.from_hf(tmp_path)
    assert isinstance(ours, Bert) and not ours.training
    ids, mask, types = padded_batch(config)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types)
        assert got.shape == expected.shape == (3, 11, config.vocab_size)
        assert (got - expected).abs().max() < 1e-5
        # without a mask and without token types (all type 0), and the written-out attention
        assert (ours(ids) - reference(input_ids=ids).logits).abs().max() < 1e-5
        for layer in ours.layers:
            layer.attn.use_sdpa = False
        assert (ours(ids, mask, types) - expected).abs().max() < 1e-5


def test_encode_is_the_hidden_state_before_the_head(tmp_path):
    config = CASES["2-layers-4-heads"]
    reference = tiny_bert(config, tmp_path)
    ours = scratchlm.from_hf(tmp_path)
    ids, mask, types = padded_batch(config, seed=1)
    with torch.no_grad():
        expected = reference.bert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        assert (ours.encode(ids, mask, types) - expected).abs().max() < 1e-5


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = Bert(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=16)).eval()
    ids = torch.randint(4, 40, (1, 6))
    padded = torch.cat([ids, torch.randint(4, 40, (1, 5))], dim=1)  # arbitrary tokens where the padding is
    mask = torch.tensor([[1] * 6 + [0] * 5])
    with torch.no_grad():
        assert (model(padded, attention_mask=mask)[:, :6] - model(ids)).abs().max() < 1e-5


def test_tied_decoder_and_pretraining_extras_are_handled(tmp_path):
    config = CASES["2-layers-4-heads"]
    tiny_bert(config, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "cls.predictions.decoder.weight" not in tensors  # save_pretrained writes the tied matrix once
    ours = scratchlm.from_hf(tmp_path)
    # a BertForPreTraining-style file: the decoder written out, plus the pooler and the next-sentence head
    extra = dict(tensors)
    extra["cls.predictions.decoder.weight"] = tensors["bert.embeddings.word_embeddings.weight"].clone()
    extra["bert.pooler.dense.weight"] = torch.zeros(48, 48)
    extra["cls.seq_relationship.weight"] = torch.zeros(2, 48)
    save_file(extra, tmp_path / "model.safetensors")
    again = scratchlm.from_hf(tmp_path)
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids), ours(ids))
    extra["cls.predictions.decoder.weight"] = torch.randn(60, 48)  # an untied decoder
    save_file(extra, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="differs from its word embedding"):
        scratchlm.from_hf(tmp_path)


def test_checkpoint_with_a_mismatched_tensor(tmp_path):
    tiny_bert(CASES["2-layers-4-heads"], tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(95, 48)
    del tensors["bert.embeddings.LayerNorm.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"layers\.1\.fc_in\.weight \(95, 48\)") as err:
        scratchlm.from_hf(tmp_path)
    assert err.value.missing == ["embeddings.norm.bias"]


def test_unsupported_checkpoint_settings():
    for setting in ({"hidden_act": "relu"}, {"position_embedding_type": "relative_key"}, {"is_decoder": True},
                    {"tie_word_embeddings": False}):
        with pytest.raises(ValueError, match=next(iter(setting))):
            bert_config_from_hf({"model_type": "bert", **setting})


def test_bad_input_is_a_clear_value_error():
    model = Bert(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=8, type_vocab_size=2))
    ids = torch.randint(0, 30, (2, 8))
    with pytest.raises(ValueError, match="too long: 9 tokens.*max_position_embeddings=8"):
        model(torch.randint(0, 30, (2, 9)))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 7\) but input_ids has \(2, 8\)"):
        model(ids, attention_mask=torch.ones(2, 7))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(8,\)"):
        model(ids, attention_mask=torch.ones(8))
    with pytest.raises(ValueError, match=r"token_type_ids must be integers in 0\.\.1"):
        model(ids, token_type_ids=torch.full((2, 8), 2))
    with pytest.raises(ValueError, match=r"token_type_ids must be integers in 0\.\.1"):
        model(ids, token_type_ids=torch.full((2, 8), -1))
    with pytest.raises(ValueError, match=r"token_type_ids has shape \(2, 4\)"):
        model(ids, token_type_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be in 0..29"):
        model(torch.full((1, 3), 30))
    with pytest.raises(ValueError, match="batch dimension"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        BertConfig(hidden_size=30, num_attention_heads=4)


def test_mask_recipe_proportions_on_a_large_batch():
    tokenizer = char_tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(tokenizer.special_ids), tokenizer.vocab_size, (128, 512), generator=g)
    ids[:, 0] = tokenizer.cls_id  # special tokens are never chosen
    ids[:, -3:] = tokenizer.pad_id
    inputs, labels = mask_tokens(ids, tokenizer, g)
    chosen = labels != -100
    n, n_ordinary = chosen.sum().item(), (ids >= len(tokenizer.special_ids)).sum().item()
    assert not chosen[:, 0].any() and not chosen[:, -3:].any()
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    masked = (inputs[chosen] == tokenizer.mask_id).float().mean().item()
    same = (inputs[chosen] == ids[chosen]).float().mean().item()
    random = 1 - masked - same
    V = tokenizer.vocab_size - len(tokenizer.special_ids)  # random replacements come from the ordinary tokens
    assert (inputs[chosen] != tokenizer.mask_id).logical_and(inputs[chosen] < len(tokenizer.special_ids)).sum() == 0
    for share, p, count in [(n / n_ordinary, 0.15, n_ordinary), (masked, 0.8, n), (random, 0.1 * (V - 1) / V, n),
                            (same, 0.1 + 0.1 / V, n)]:
        # 5 binomial standard deviations: a false alarm once in ~3.5 million runs
        assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / count), (share, p)


def test_mask_tokens_bad_input_and_rate():
    tokenizer = char_tokenizer()
    ids = torch.randint(4, tokenizer.vocab_size, (64, 256), generator=torch.Generator().manual_seed(1))
    _, labels = mask_tokens(ids, tokenizer, torch.Generator().manual_seed(2), mask_prob=0.5)
    assert abs((labels != -100).float().mean().item() - 0.5) < 5 * math.sqrt(0.25 / ids.numel())
    with pytest.raises(ValueError, match="integer token ids"):
        mask_tokens(torch.rand(2, 3), tokenizer)
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(ids, tokenizer, mask_prob=0.0)
    with pytest.raises(ValueError, match="ids must be in 0..68"):
        mask_tokens(torch.tensor([[69]]), tokenizer)


def test_char_tokenizer():
    tokenizer = char_tokenizer()
    assert tokenizer.vocab_size == 69 and (tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id, tokenizer.mask_id) \
        == (0, 1, 2, 3)
    text = "To be, or not to be:\nthat is the question."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode([tokenizer.cls_id, tokenizer.mask_id] + tokenizer.encode("a")) == "[CLS][MASK]a"
    assert tokenizer.decode([tokenizer.cls_id] + tokenizer.encode("a"), skip_special=True) == "a"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        tokenizer.encode("€")


def test_pretrained_char_models_round_trip(tmp_path, capsys):
    bert, gpt, tokenizer = pretrained_char_models("ci", seed=0, root=tmp_path)
    assert "trained in" in capsys.readouterr().out
    assert isinstance(bert, Bert) and isinstance(gpt, GPT) and not bert.training and not gpt.training
    assert bert.config.vocab_size == gpt.config.vocab_size == tokenizer.vocab_size
    assert (bert.config.hidden_size, bert.config.num_hidden_layers, bert.config.max_position_embeddings) == \
        (gpt.config.n_embd, gpt.config.n_layer, gpt.config.block_size)
    again, gpt_again, tokenizer_again = pretrained_char_models("ci", seed=0, root=tmp_path)
    assert "loaded from" in capsys.readouterr().out
    ids = torch.randint(4, tokenizer.vocab_size, (2, bert.config.max_position_embeddings))
    with torch.no_grad():
        assert torch.equal(again(ids), bert(ids)) and torch.equal(gpt_again(ids), gpt(ids))
    assert tokenizer_again.itos == tokenizer.itos
    assert (tmp_path / "char-ci-seed0" / "bert.safetensors").is_file()
