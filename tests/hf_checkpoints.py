"""Helpers shared by the tests that build random tiny Hugging Face checkpoints (Llama family, Qwen3-MoE, DeepSeek-V3)."""

import torch


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
