"""Helpers shared by the tests that build random tiny Hugging Face checkpoints (Llama family, Qwen3-MoE, DeepSeek-V3)."""

import torch

# a tiny DeepseekV3Config (test_deepseek.py, test_mtp.py): MLA with query compression, 8 routed experts in 4 groups
DEEPSEEK_V3_SIZES = dict(
    vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
    topk_group=2, first_k_dense_replace=1, max_position_embeddings=128, initializer_range=0.1, bos_token_id=None,
    eos_token_id=None, pad_token_id=None)


def checkpoint_cache(root, build):
    """A function name -> (HF model, folder) that builds each named checkpoint once, under `root`.

    `build(name, folder, seed)` makes and saves the checkpoint; each new name gets the next seed (0, 1, ...).
    """
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (build(name, root / name, seed=len(cache)), root / name)
        return cache[name]

    return get


def random_ids(vocab, shape, seed=0):
    """Token ids below `vocab`, the same for the same seed."""
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def jitter_norms(model, scale=0.2):
    """Move every norm weight away from 1 (in place), so that a norm applied wrongly shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(scale * torch.randn_like(p))


def assert_greedy_matches(ours, reference, vocab, *variants):
    """Greedy tokens of `ours` equal with and without the cache, from each of `variants` (other forms of ours),
    and from the reference's `generate`."""
    from scratchlm.generation import generate

    prompt = random_ids(vocab, (2, 5), seed=1)
    with_cache = generate(ours, prompt, max_new_tokens=20)
    assert torch.equal(with_cache, generate(ours, prompt, max_new_tokens=20, use_cache=False))
    for variant in variants:
        assert torch.equal(with_cache, generate(variant, prompt, max_new_tokens=20))
    with torch.no_grad():
        assert torch.equal(with_cache, reference.generate(prompt, max_new_tokens=20, do_sample=False))
