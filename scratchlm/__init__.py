"""scratchlm: modern LLMs built from scratch in PyTorch.

The modules of this package are exported from the course notebooks (`notebooks/`); each says which
notebook it comes from. This file is hand-written: it only names the entry points, and imports
each one when it is first used, so `import scratchlm` stays fast.
"""

__version__ = "0.1.0"

# public name -> module that defines it
_ENTRY_POINTS = {
    "tinyshakespeare": "scratchlm.data",
    "get_profile": "scratchlm.data",
    "by_profile": "scratchlm.data",
    "from_hf": "scratchlm.gpt",
    "from_gguf": "scratchlm.gguf",
    "generate": "scratchlm.generation",
    "generate_seq2seq": "scratchlm.seq2seq",
}

# modules that register models: Hugging Face architectures with `scratchlm.gpt.register_architecture`
# (`from_hf` imports them all before it looks up a checkpoint's `model_type`), and trainable models in
# `scratchlm.train.MODEL_REGISTRY` (`build_model` imports them when it meets a name it does not know), and
# optimizers in `scratchlm.train.OPTIMIZERS` (`make_optimizer` does the same: "muon" from scratchlm.speedrun).
# A chapter that adds a model adds its module here.
MODEL_MODULES = ("scratchlm.gpt", "scratchlm.llama", "scratchlm.char_llama", "scratchlm.speedrun", "scratchlm.moe",
                 "scratchlm.deepseek", "scratchlm.bert", "scratchlm.seq2seq")

__all__ = sorted(_ENTRY_POINTS)


def __getattr__(name):
    if name in _ENTRY_POINTS:
        import importlib

        return getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
    raise AttributeError(f"module 'scratchlm' has no attribute {name!r}")
