"""scratchlm.mtp: DeepSeek-V3's multi-token prediction, against transformers' inference-only MtpModel.

References: random tiny DeepseekV3ForCausalLM checkpoints (eager attention and experts, noisy norms and correction
biases) saved with save_pretrained, to which a random transformers MtpModel's weights are added as DeepSeek's released
checkpoints store them (model.layers.{num_hidden_layers}.*, per-expert matrices, shared_head.norm, copies of the
embedding and head); its depth-1 logits from MtpModel.forward_layer and the shared head. transformers 5.23 has no MTP
training loss (MtpModel's labels= path raises), so the loss is checked against a direct computation; self-speculative
decoding against greedy decoding (ours, itself checked against transformers' generate in test_deepseek.py). No downloads.
"""

import pytest
import torch
import torch.nn.functional as F
from hf_checkpoints import DEEPSEEK_V3_SIZES, checkpoint_cache, jitter_norms, random_ids
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config as HFDeepseekV3Config
from transformers import DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

from scratchlm.deepseek import DeepseekV3, DeepseekV3Config
from scratchlm.generation import generate
from scratchlm.gpt import CheckpointMismatchError, from_hf
from scratchlm.mtp import final_hidden, mtp_loss, predict_ahead, speculative_generate
from scratchlm.train import build_model, next_token_loss

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 10000.0,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
SIZES = {**DEEPSEEK_V3_SIZES, "num_hidden_layers": 2, "max_position_embeddings": 64}
CASES = {
    "qlora-interleaved": dict(),
    "no-qlora-half-rope-tied": dict(q_lora_rank=None, rope_interleave=False, tie_word_embeddings=True),
    "yarn-no-dense-no-groups-top3": dict(rope_parameters=YARN, first_k_dense_replace=0, n_group=1, topk_group=1,
                                         num_experts_per_tok=3, num_hidden_layers=3),
}


def released_mtp_tensors(mtp, layer, main):
    """MtpModel's depth-1 weights under the names of DeepSeek's released checkpoints (model.layers.{layer}.*)."""
    state, out = mtp.layers[0].state_dict(), {}
    for name, tensor in state.items():
        name = name.removeprefix("mtp_block.").replace("post_norm.", "shared_head.norm.")
        if name.endswith("experts.gate_up_proj"):  # fused in transformers, one matrix per expert in the files
            prefix = name.removesuffix("gate_up_proj")
            down = state["mtp_block." + prefix + "down_proj"]
            for e, (gate, up) in enumerate(zip(*tensor.chunk(2, dim=1), strict=True)):
                out |= {f"{prefix}{e}.gate_proj.weight": gate, f"{prefix}{e}.up_proj.weight": up,
                        f"{prefix}{e}.down_proj.weight": down[e]}
        elif not name.endswith("experts.down_proj"):
            out[name] = tensor
    out["embed_tokens.weight"] = main.model.embed_tokens.weight
    out["shared_head.head.weight"] = main.lm_head.weight
    return {f"model.layers.{layer}.{name}": t.detach().clone().contiguous() for name, t in out.items()}


def make_checkpoint(name, folder, seed):
    torch.manual_seed(seed)
    config = HFDeepseekV3Config(**{**SIZES, **CASES[name]})
    main = DeepseekV3ForCausalLM._from_config(config, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    mtp = MtpModel(main, num_mtp_layers=1).eval()
    jitter_norms(main)
    with torch.no_grad():
        for param_name, p in mtp.layers.named_parameters():  # MtpModel leaves its experts and router uninitialised
            p.copy_(1 + 0.2 * torch.randn_like(p)) if "norm" in param_name else p.normal_(0, config.initializer_range)
        for model in (main, mtp):
            for buffer_name, buffer in model.named_buffers():
                if buffer_name.endswith("e_score_correction_bias"):
                    buffer.normal_(0, 0.1)
    main.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors") | released_mtp_tensors(mtp, config.num_hidden_layers, main)
    save_file(tensors, folder / "model.safetensors")
    return main, mtp


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return checkpoint_cache(tmp_path_factory.mktemp("deepseek_v3_mtp"), make_checkpoint)


def hf_depth1_logits(main, mtp, ids):
    positions = torch.arange(1, ids.size(1)).expand(ids.size(0), -1)  # those of the tokens depth 1 embeds
    h = main(ids, output_hidden_states=True).hidden_states[-1]  # after the final norm
    return mtp.shared_head(mtp.forward_layer(0, h[:, :-1], positions, None, input_ids=ids[:, 1:]))


@pytest.mark.parametrize("name", list(CASES))
def test_mtp_logits_match_transformers_mtp_model(checkpoints, name):
    (main, mtp), folder = checkpoints(name)
    ours = from_hf(folder)
    assert len(ours.mtp) == 1
    ids = random_ids(SIZES["vocab_size"], (2, 24))
    with torch.no_grad():
        logits, (depth1,) = ours(ids, with_mtp=True)
        assert (logits - main(ids).logits).abs().max().item() < 1e-5
        assert (depth1 - hf_depth1_logits(main, mtp, ids)).abs().max().item() <= 1e-5
        ours.use_absorption()
        assert (predict_ahead(ours, final_hidden(ours, ids), ids)[0] - depth1).abs().max().item() < 1e-5


def test_transformers_has_no_mtp_training_loss(checkpoints):
    (main, mtp), _ = checkpoints("qlora-interleaved")
    ids = random_ids(SIZES["vocab_size"], (1, 8))
    h = main(ids, output_hidden_states=True).hidden_states[-1]
    with pytest.raises(TypeError):  # `loss = None; loss += ...` in transformers 5.23
        mtp(input_ids=ids[:, 1:], last_hidden_states=h[:, :-1], attention_mask=None,
            position_ids=torch.arange(1, 8)[None], mtp_cache=None, labels=ids[:, 1:])


@pytest.mark.parametrize("depth,weight", [(1, 0.3), (2, 0.1), (3, 1.0)])
def test_mtp_loss_equals_a_direct_computation(depth, weight):
    g = torch.Generator().manual_seed(depth)
    B, T, V = 3, 9, 11
    targets = torch.randint(0, V, (B, T), generator=g)
    logits = [torch.randn(B, T - k, V, generator=g) for k in range(1, depth + 1)]
    direct = sum(torch.stack([-F.log_softmax(logits[k - 1][b, i], -1)[targets[b, i + k]]
                              for b in range(B) for i in range(T - k)]).mean() for k in range(1, depth + 1))
    assert abs(mtp_loss(logits, targets, weight).item() - weight / depth * direct.item()) < 1e-6


def test_depth_k_predicts_the_token_k_plus_1_ahead_and_sees_no_later_token():
    torch.manual_seed(0)
    model = DeepseekV3(DeepseekV3Config(**{**_char_sizes(), "num_nextn_predict_layers": 2})).eval()
    ids = random_ids(65, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 65  # tokens from position 10 on
    with torch.no_grad():
        _, ahead = model(ids, with_mtp=True)
        _, ahead_changed = model(changed, with_mtp=True)
    for k, (a, b) in enumerate(zip(ahead, ahead_changed, strict=True), start=1):
        assert a.shape == (2, 16 - k, 65)
        # depth k at position i reads tokens up to i + k: unchanged for i + k < 10, changed once it reads token 10
        assert torch.allclose(a[:, : 10 - k], b[:, : 10 - k], atol=1e-6)
        assert not torch.allclose(a[:, 10 - k], b[:, 10 - k])


def test_the_mtp_loss_trains_the_main_model_through_the_shared_parts():
    torch.manual_seed(0)
    model = DeepseekV3(DeepseekV3Config(**{**_char_sizes(), "num_nextn_predict_layers": 1})).train()
    ids = random_ids(65, (2, 17))
    _, ahead = model(ids[:, :-1], with_mtp=True)
    mtp_loss(ahead, ids[:, 1:]).backward()
    for param in (model.embed_tokens.weight, model.lm_head.weight, model.layers[0].self_attn.kv_b_proj.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_the_main_model_does_not_depend_on_the_mtp_depth():
    config = _char_sizes()
    torch.manual_seed(3)
    plain = build_model("deepseek", config)
    torch.manual_seed(3)
    with_mtp = build_model("deepseek", {**config, "num_nextn_predict_layers": 2})
    assert not any(name.startswith("mtp.") for name in plain.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, with_mtp.state_dict()[name]), name
    assert with_mtp.active_parameters() == plain.active_parameters()


def _char_sizes():
    return dict(vocab_size=65, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=48, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
                n_group=2, topk_group=1, first_k_dense_replace=1, tie_word_embeddings=True)


@pytest.mark.parametrize("name", list(CASES))
def test_speculative_decoding_equals_greedy_on_random_checkpoints(checkpoints, name):
    (main, _), folder = checkpoints(name)
    ours = from_hf(folder)
    for seed in range(3):
        prompt = random_ids(SIZES["vocab_size"], (1, 5), seed=seed)
        ids, stats = speculative_generate(ours, prompt, max_new_tokens=30)
        assert torch.equal(ids, generate(ours, prompt, max_new_tokens=30))
        with torch.no_grad():
            assert torch.equal(ids, main.generate(prompt, max_new_tokens=30, do_sample=False))
        assert stats["new_tokens"] == 30 and stats["main_forwards"] == 30 - stats["accepted"]
    one_dim, _ = speculative_generate(ours, prompt[0], max_new_tokens=4)
    assert one_dim.dim() == 1 and torch.equal(one_dim, generate(ours, prompt[0], max_new_tokens=4))


def test_speculative_decoding_equals_greedy_on_a_trained_model_and_accepts_drafts():
    """A small model trained on a repeating text drafts well; the output must still be exactly greedy."""
    torch.manual_seed(0)
    model = DeepseekV3(DeepseekV3Config(**{**_char_sizes(), "num_nextn_predict_layers": 1}))
    text = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] * 40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        starts = torch.randint(0, len(text) - 33, (8,), generator=g)
        x = torch.stack([text[s : s + 32] for s in starts])
        y = torch.stack([text[s + 1 : s + 33] for s in starts])
        logits, ahead = model(x, with_mtp=True)
        (next_token_loss(logits, y) + mtp_loss(ahead, y)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    accepted = drafted = 0
    for start in (0, 3, 7, 11):
        prompt = text[start : start + 6]
        ids, stats = speculative_generate(model, prompt, max_new_tokens=40)
        assert torch.equal(ids, generate(model, prompt, max_new_tokens=40))
        accepted, drafted = accepted + stats["accepted"], drafted + stats["drafted"]
    assert accepted / drafted > 0.5
    noisy = torch.randint(0, 65, (6,), generator=g)  # a prompt unlike the training text
    ids, _ = speculative_generate(model, noisy, max_new_tokens=40)
    assert torch.equal(ids, generate(model, noisy, max_new_tokens=40))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_speculative_decoding_equals_greedy_on_an_untrained_character_model(seed):
    from scratchlm.deepseek import char_deepseek_config
    from scratchlm.train import shakespeare_char_config

    torch.manual_seed(seed)
    model = build_model("deepseek", {**char_deepseek_config(shakespeare_char_config("ci", 65)[0]),
                                     "num_nextn_predict_layers": 1}).eval()
    prompt = random_ids(65, (8,), seed=seed)
    ids, stats = speculative_generate(model, prompt, model.config.block_size - 8)
    assert torch.equal(ids, generate(model, prompt, model.config.block_size - 8))
    assert stats["accepted"] <= stats["drafted"] == stats["main_forwards"] - 2


def test_bad_mtp_input_is_named():
    with pytest.raises(ValueError, match="num_nextn_predict_layers=-1 must be a whole number >= 0"):
        DeepseekV3Config(**{**_char_sizes(), "num_nextn_predict_layers": -1})
    model = DeepseekV3(DeepseekV3Config(**{**_char_sizes(), "num_nextn_predict_layers": 2})).eval()
    ids = random_ids(65, (1, 10))
    with pytest.raises(ValueError, match="a sequence of 2 tokens is too short for 2 MTP depth"):
        model(ids[:, :2], with_mtp=True)
    with pytest.raises(ValueError, match="hidden size mismatch: h has 7 features"):
        model.mtp[0](torch.zeros(1, 4, 7), torch.zeros(1, 4, 7), *model.rotary_emb(4))
    with pytest.raises(ValueError, match="must cover the same batch and positions"):
        model.mtp[0](torch.zeros(1, 4, 32), torch.zeros(1, 3, 32), *model.rotary_emb(4))
    with pytest.raises(ValueError, match=r"depth 1's logits have shape \(1, 10, 65\)"):
        mtp_loss([torch.zeros(1, 10, 65)], ids)
    with pytest.raises(ValueError, match="no MTP logits"):
        mtp_loss([], ids)
    with pytest.raises(ValueError, match="one prompt at a time, got a batch of 2"):
        speculative_generate(model, ids.expand(2, -1), 5)
    with pytest.raises(ValueError, match="does not slide the context window: ask for at most 38 new tokens"):
        speculative_generate(model, ids, 39)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        speculative_generate(model, ids, -1)
    with pytest.raises(ValueError, match="has no MTP module"):
        speculative_generate(DeepseekV3(DeepseekV3Config(**_char_sizes())), ids, 5)


def test_mtp_layers_out_of_sequence_are_refused(checkpoints, tmp_path):
    _, folder = checkpoints("qlora-interleaved")
    tensors = {name.replace("model.layers.2.", "model.layers.3."): t  # the MTP layer as depth 2, without depth 1
               for name, t in load_file(folder / "model.safetensors").items()}
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"has MTP layers \[3\] but not all of the layers from 2"):
        from_hf(tmp_path)
