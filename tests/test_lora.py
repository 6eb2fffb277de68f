"""scratchlm.lora (notebooks/06_alignment/01_lora.ipynb) equals peft 0.21.2: outputs, gradients of A and B, and
merged weights, on chapter 03's GPT and on a chapter-04 Llama loaded with from_hf (against peft on the Hugging
Face model), with every B set non-zero first so that the comparison is not vacuous. Also: the wrapped model
starts equal to its base, dropout touches only the bypass, merge/unmerge round-trip, peft's name-matching rule,
the error messages, and a seeded ci-profile fine-tune on the chapter's task (scratchlm.arith) that must move
held-out accuracy up from the noisy-SFT base (direction only: the ci model is small).
"""

import copy

import pytest
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model  # pinned in the dev extras: a missing peft fails, never skips

from scratchlm.gpt import GPT, GPTConfig, from_hf
from scratchlm.lora import LoRALinear, add_lora, merge_lora


def tiny_gpt(seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=14, block_size=16, n_layer=2, n_head=4, n_embd=32))


def wrapped_pair(base, r, alpha, targets, use_rslora=False, prefix="base_model.model."):
    """base wrapped by peft and by add_lora; peft's B made non-zero and its A, B copied into ours."""
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                           use_rslora=use_rslora))
    ours = add_lora(copy.deepcopy(base), r, alpha, targets, use_rslora=use_rslora)
    torch.manual_seed(123)
    peft_params = {}
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                if "lora_B" in name:
                    p.normal_(std=0.1)
                peft_params[name.removeprefix(prefix).replace(".default", "")] = p
        ours_trainable = {n: p for n, p in ours.named_parameters() if p.requires_grad}
        assert sorted(ours_trainable) == sorted(peft_params)
        for name, p in ours_trainable.items():
            p.copy_(peft_params[name])
    return theirs.eval(), ours.eval(), peft_params


@pytest.mark.parametrize("use_rslora", [False, True])
def test_gpt_equals_peft_outputs_grads_and_merged(use_rslora):
    theirs, ours, peft_params = wrapped_pair(tiny_gpt(), 4, 8, ["c_attn", "c_proj", "c_fc"], use_rslora)
    assert all(p.abs().sum() > 0 for n, p in peft_params.items() if "lora_B" in n)
    ids = torch.randint(14, (3, 10))
    out_theirs, out_ours = theirs(ids), ours(ids)
    torch.testing.assert_close(out_ours, out_theirs, atol=1e-6, rtol=0)
    assert (out_ours - tiny_gpt().eval()(ids)).abs().max() > 1e-3  # the non-zero B changed the model
    out_theirs.square().mean().backward()
    out_ours.square().mean().backward()
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().sum() > 0
            torch.testing.assert_close(p.grad, peft_params[name].grad, atol=1e-7, rtol=0)
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = merge_lora(ours).state_dict()
    assert sorted(merged_ours) == sorted(merged_theirs)
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, atol=1e-6, rtol=0)
    assert not any(isinstance(m, LoRALinear) for m in ours.modules())


def test_llama_from_hf_equals_peft_on_the_hf_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=32)).eval()
    hf.save_pretrained(tmp_path)
    llama = from_hf(tmp_path)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    theirs, ours, _ = wrapped_pair(llama, 4, 16, targets)  # peft on our Llama ...
    hf_peft = get_peft_model(hf, LoraConfig(r=4, lora_alpha=16, target_modules=targets)).eval()  # ... and on HF's
    with torch.no_grad():
        for name, p in hf_peft.named_parameters():
            if p.requires_grad:
                p.copy_(dict(ours.named_parameters())[name.removeprefix("base_model.model.model.").replace(".default", "")])
    ids = torch.randint(64, (2, 12))
    torch.testing.assert_close(ours(ids), hf_peft(ids).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours(ids), theirs(ids), atol=1e-6, rtol=0)
    assert sum(isinstance(m, LoRALinear) for m in ours.modules()) == 8


def test_starts_equal_to_base_and_dropout_only_on_the_bypass():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    lora = LoRALinear(copy.deepcopy(base), r=2, alpha=4, dropout=0.5).train()
    x = torch.randn(4, 16)
    assert torch.equal(lora(x), base(x))  # B = 0: the bypass adds exactly zero, dropout or not
    assert torch.all(lora.lora_B.weight == 0) and lora.lora_A.weight.abs().sum() > 0
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    manual_eval = base(x) + (x @ lora.lora_A.weight.T @ lora.lora_B.weight.T) * 2.0
    torch.testing.assert_close(lora.eval()(x), manual_eval)
    torch.manual_seed(5)
    train_out = lora.train()(x)
    torch.manual_seed(5)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    torch.testing.assert_close(train_out, base(x) + (dropped @ lora.lora_A.weight.T @ lora.lora_B.weight.T) * 2.0)
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    lora = LoRALinear(copy.deepcopy(base), r=3, alpha=6, use_rslora=True).eval()
    assert lora.scaling == pytest.approx(6 / 3**0.5)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    x = torch.randn(4, 16)
    before = lora(x)
    lora.merge()
    lora.merge()  # a second merge does nothing, as in peft
    torch.testing.assert_close(lora(x), before, atol=1e-5, rtol=0)
    lora.unmerge()
    torch.testing.assert_close(lora.base_layer.weight, base.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(lora(x), before)


def test_name_matching_follows_peft():
    model = tiny_gpt()
    add_lora(model, 2, 4, ["attn.c_proj"])
    wrapped = sorted(n for n, m in model.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    reference = get_peft_model(tiny_gpt(), LoraConfig(r=2, target_modules=["attn.c_proj"]))
    peft_wrapped = sorted(n.removeprefix("base_model.model.").removesuffix(".lora_A")
                          for n, _ in reference.named_modules() if n.endswith(".lora_A"))
    assert wrapped == peft_wrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.parametrize("call, message", [
    (lambda: LoRALinear(nn.Linear(4, 4), r=0, alpha=8), "rank r must be a positive integer"),
    (lambda: LoRALinear(nn.Linear(4, 4), r=2, alpha=0), "alpha must be positive"),
    (lambda: LoRALinear(nn.Linear(4, 4), r=2, alpha=2, dropout=1.0), "dropout must be in"),
    (lambda: LoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=2), "wraps an nn.Linear"),
    (lambda: add_lora(tiny_gpt(), 2, 4, ["c_attn", "q_proj"]), "'q_proj' matches no nn.Linear"),
    (lambda: add_lora(tiny_gpt(), 2, 4, "c_attn"), "must be a list of module names"),
    (lambda: add_lora(tiny_gpt(), 2, 4, []), "target_modules is empty"),
    (lambda: add_lora(add_lora(tiny_gpt(), 2, 4, ["c_fc"]), 2, 4, ["c_fc"]), "already wrapped"),
])
def test_bad_input(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_lora_fine_tune_on_verified_answers_beats_the_noisy_base():
    """Seeded, ci profile (600 SFT steps): direction only, LoRA on 256 verified answers lifts held-out accuracy."""
    from scratchlm.arith import (
        accuracy,
        addition_split,
        correct_answers,
        encode_examples,
        noisy_sft_data,
        prompts,
        task_config,
        task_model,
        train_sft,
    )

    cfg = task_config("ci")
    split = addition_split()
    base = task_model(cfg, seed=0)
    train_sft(base, *noisy_sft_data(split["train"], cfg, seed=0), cfg.sft_steps, cfg.batch_size, cfg.lr, seed=0)
    before = accuracy(base, split["test"])
    model = add_lora(copy.deepcopy(base), 4, 8, ["c_attn", "c_proj", "c_fc"])
    verified = split["train"][:256]
    train_sft(model, *encode_examples(prompts(verified), correct_answers(verified)), 60, 64, 1e-2, seed=1)
    after = accuracy(model, split["test"])
    assert after > before + 0.05, (before, after)
    assert accuracy(merge_lora(model), split["test"]) == after
