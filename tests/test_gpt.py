"""scratchlm.gpt: GPT-2 against transformers, the 124M parameter count, initialisation, and from_hf's errors."""

import dataclasses
import json
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import scratchlm
from scratchlm import gpt
from scratchlm.gpt import (
    GPT,
    CheckpointMismatchError,
    GPTConfig,
    LayerNorm,
    causal_mask,
    from_hf,
    load_checked,
)

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()


def save_random_gpt2(folder, seed=0, **config):
    """A random GPT-2 made by transformers, saved with save_pretrained; returns the HF model."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.1,
                    bos_token_id=None, eos_token_id=None)
    model = GPT2LMHeadModel(GPT2Config(**{**settings, **config})).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    return folder, save_random_gpt2(folder)


def copy_checkpoint(src, dest, tensors=None, config=None):
    dest.mkdir()
    save_file(tensors if tensors is not None else load_file(src / "model.safetensors"), dest / "model.safetensors")
    (dest / "config.json").write_text(json.dumps(config) if config is not None else (src / "config.json").read_text())
    return dest


# --- the model against transformers ---------------------------------------------------------------

@pytest.mark.parametrize("config", [
    dict(n_layer=1, n_head=1, n_embd=16, n_positions=8, vocab_size=50),
    dict(n_layer=2, n_head=4, n_embd=32, n_positions=32, vocab_size=97),
    dict(n_layer=3, n_head=2, n_embd=48, n_positions=20, vocab_size=301),
    dict(n_layer=4, n_head=8, n_embd=64, n_positions=16, vocab_size=128, layer_norm_epsilon=1e-6),
])
def test_logits_match_transformers(tmp_path, config):
    hf = save_random_gpt2(tmp_path, seed=len(tmp_path.name), **config)
    ours = from_hf(tmp_path)
    ids = torch.randint(0, config["vocab_size"], (3, config["n_positions"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max().item() < 1e-5
        assert (ours(ids[:, :5]) - expected[:, :5]).abs().max().item() < 1e-5  # shorter than block_size
    assert expected.std() > 0.3  # the random logits are spread out, so the comparison means something


def test_manual_attention_matches_sdpa(tiny_checkpoint):
    folder, hf = tiny_checkpoint
    fused = from_hf(folder)
    manual = GPT(dataclasses.replace(fused.config, use_sdpa=False)).eval()
    manual.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (manual(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_layer_norm_and_gelu_match_torch():
    torch.manual_seed(0)
    x = torch.randn(4, 7, 24) * 2 + 1
    reference = nn.LayerNorm(24, eps=1e-5)
    nn.init.normal_(reference.weight)
    nn.init.normal_(reference.bias)
    ours = LayerNorm(24)
    ours.load_state_dict(reference.state_dict())
    torch.testing.assert_close(ours(x), reference(x))
    no_bias = LayerNorm(24, bias=False)
    torch.testing.assert_close(no_bias(x), nn.LayerNorm(24, bias=False)(x))
    mlp = gpt.MLP(GPTConfig(n_embd=24, n_head=1))
    expected = mlp.c_proj(F.gelu(mlp.c_fc(x), approximate="tanh"))
    torch.testing.assert_close(mlp(x), expected)


def test_causal_mask_offsets():
    assert torch.equal(causal_mask(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    assert causal_mask(1, 5).all()


def test_no_bias_model_runs_and_has_no_biases():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16, bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert model(torch.zeros(2, 8, dtype=torch.long)).shape == (2, 8, 50)


# --- size and initialisation ----------------------------------------------------------------------

def test_124m_parameter_count_equals_transformers():
    with torch.device("meta"):
        ours = GPT(GPTConfig())
        theirs = GPT2LMHeadModel(GPT2Config())
    assert ours.num_parameters() == theirs.num_parameters() == sum(p.numel() for p in theirs.parameters())
    assert ours.num_parameters(non_embedding=True) == theirs.num_parameters() - 1024 * 768


def test_weights_are_tied_and_state_dict_names_follow_hf():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=2, n_head=2, n_embd=16))
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.device("meta"):
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=8, n_layer=2, n_head=2, n_embd=16))
    assert set(model.state_dict()) == set(hf.state_dict())


def test_gpt2_initialisation():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=2000, block_size=256, n_layer=8, n_head=4, n_embd=256)
    model = GPT(config)
    residual_std = 0.02 / (2 * config.n_layer) ** 0.5
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            assert abs(p.std().item() - residual_std) < 0.05 * residual_std, name
        elif name.endswith(".weight") and "ln_" not in name:
            assert abs(p.std().item() - 0.02) < 0.05 * 0.02, name
        elif "ln_" in name and name.endswith(".weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        else:  # biases
            assert torch.equal(p, torch.zeros_like(p)), name


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=100, n_head=3), "n_embd=100 is not divisible by n_head=3"),
    (dict(n_layer=0), "n_layer must be a positive integer, got 0"),
    (dict(vocab_size=-5), "vocab_size must be a positive integer"),
    (dict(block_size=2.5), "block_size must be a positive integer"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
])
def test_invalid_configs(kwargs, message):
    with pytest.raises(ValueError) as err:
        GPTConfig(**kwargs)
    assert message in str(err.value)


def test_prompt_longer_than_context():
    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ValueError, match=r"9 tokens, but block_size=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"add a batch dimension"):
        model(torch.zeros(8, dtype=torch.long))


def test_sequence_past_context_with_cache():
    from scratchlm.generation import KVCache

    model = GPT(GPTConfig(vocab_size=50, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    cache = KVCache()
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"6 cached positions \+ 3 new tokens = 9, but block_size=8"):
            model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# --- from_hf ----------------------------------------------------------------------------------------

def test_sharded_checkpoint_loads(tmp_path, tiny_checkpoint):
    _, hf = tiny_checkpoint
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (from_hf(tmp_path)(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_original_openai_layout_loads(tmp_path, tiny_checkpoint):
    """The Hub's `gpt2` has no `transformer.` prefix and carries the causal-mask buffers."""
    folder, hf = tiny_checkpoint
    tensors = {name.removeprefix("transformer."): t for name, t in load_file(folder / "model.safetensors").items()}
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 32, 32).tril()
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    tensors["lm_head.weight"] = tensors["wte.weight"].clone()  # a tied head saved anyway
    openai = copy_checkpoint(folder, tmp_path / "openai", tensors)
    ids = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (from_hf(openai)(ids) - hf(ids).logits).abs().max().item() < 1e-5


def test_dtype(tiny_checkpoint):
    model = from_hf(tiny_checkpoint[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    with pytest.raises(ValueError, match="floating-point torch.dtype"):
        from_hf(tiny_checkpoint[0], dtype=torch.int8)


def test_missing_extra_and_misshaped_tensors_are_listed(tmp_path, tiny_checkpoint):
    folder, _ = tiny_checkpoint
    tensors = load_file(folder / "model.safetensors")
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    del tensors["transformer.ln_f.weight"]
    tensors["transformer.h.0.attn.q_norm.weight"] = torch.ones(8)
    tensors["transformer.wte.weight"] = torch.zeros(96, 32)
    broken = copy_checkpoint(folder, tmp_path / "broken", tensors)
    with pytest.raises(CheckpointMismatchError) as err:
        from_hf(broken)
    assert sorted(err.value.missing) == ["transformer.h.1.mlp.c_fc.bias", "transformer.ln_f.weight"]
    assert err.value.unexpected == ["transformer.h.0.attn.q_norm.weight"]
    assert err.value.misshaped == ["transformer.wte.weight (96, 32) (the model has (97, 32))"]
    message = str(err.value)
    for text in ("missing (2)", "transformer.ln_f.weight", "unexpected (1)", "q_norm", "wrong shape (1)", str(broken)):
        assert text in message


def test_load_checked_lists_at_most_ten_then_counts():
    model = GPT(GPTConfig(vocab_size=10, block_size=4, n_layer=4, n_head=1, n_embd=4))
    n = len(model.state_dict()) - 1  # lm_head.weight is wte.weight: expected once
    with pytest.raises(CheckpointMismatchError, match=rf"missing \({n}\): .*\.\.\. and {n - 10} more"):
        load_checked(model, {})


def test_unknown_model_type_lists_supported(tmp_path, tiny_checkpoint):
    folder = copy_checkpoint(tiny_checkpoint[0], tmp_path / "mamba", config={"model_type": "mamba"})
    with pytest.raises(ValueError, match=r"model_type='mamba'.*supported: .*gpt2"):
        from_hf(folder)


def test_unsupported_gpt2_settings(tmp_path, tiny_checkpoint):
    config = json.loads((tiny_checkpoint[0] / "config.json").read_text())
    config["activation_function"] = "relu"
    folder = copy_checkpoint(tiny_checkpoint[0], tmp_path / "relu", config=config)
    with pytest.raises(ValueError, match=r"activation_function='relu'"):
        from_hf(folder)


def test_folder_without_safetensors_or_config(tmp_path, tiny_checkpoint):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tiny_checkpoint[0] / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(FileNotFoundError, match=r"only from safetensors.*pytorch_model\.bin"):
        from_hf(pickled)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_hf(empty)


def test_sharded_index_with_missing_shard(tmp_path, tiny_checkpoint):
    tiny_checkpoint[1].save_pretrained(tmp_path, max_shard_size="20KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(FileNotFoundError, match="names shards that are not in"):
        from_hf(tmp_path)


def test_name_that_is_not_a_folder_offline(tmp_path, monkeypatch):
    """With HF_HUB_OFFLINE the Hub library refuses the network: the same error on every machine."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        from_hf("someone/tiny-gpt2")
    message = str(err.value)
    assert "'someone/tiny-gpt2' is not a local folder" in message
    assert "HF_HUB_OFFLINE is set, so it is not downloaded" in message


def test_a_file_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        from_hf(tmp_path / "model.safetensors")


def test_registry_imports_model_modules(tmp_path, monkeypatch, tiny_checkpoint):
    """from_hf imports every module in scratchlm.MODEL_MODULES, so later chapters can register architectures."""
    (tmp_path / "toy_architecture.py").write_text(
        "import torch.nn as nn\n"
        "from scratchlm.gpt import register_architecture\n"
        "@register_architecture('toy', 'toy2')\n"
        "def build(config, tensors):\n"
        "    model = nn.Linear(config['width'], 1)\n"
        "    model.width = config['width']\n"
        "    return model\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(scratchlm, "MODEL_MODULES", (*scratchlm.MODEL_MODULES, "toy_architecture"))
    monkeypatch.setattr(gpt, "ARCHITECTURES", dict(gpt.ARCHITECTURES))
    folder = copy_checkpoint(tiny_checkpoint[0], tmp_path / "toy", config={"model_type": "toy2", "width": 3})
    try:
        model = from_hf(folder)
    finally:
        sys.modules.pop("toy_architecture", None)
    assert isinstance(model, nn.Linear) and model.width == 3


def test_register_architecture_needs_a_name():
    with pytest.raises(ValueError, match="model_type names"):
        gpt.register_architecture()
