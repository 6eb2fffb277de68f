"""scratchlm.generation: greedy and beam search against transformers, the KV cache, top-k/top-p, bad arguments."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.generation import KVCache, beam_search, generate, sample_next, top_k_filter, top_p_filter
from scratchlm.gpt import GPT, GPTConfig, from_hf

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

CONFIGS = [
    dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4),
    dict(vocab_size=211, n_positions=48, n_embd=48, n_layer=3, n_head=3),
]


@pytest.fixture(scope="module", params=range(len(CONFIGS)), ids=["2-layer", "3-layer"])
def pair(request, tmp_path_factory):
    """(transformers GPT-2, the same weights loaded with from_hf)."""
    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(request.param)
    hf = GPT2LMHeadModel(GPT2Config(**CONFIGS[request.param], initializer_range=0.1, bos_token_id=None,
                                    eos_token_id=None)).eval()
    hf.save_pretrained(folder)
    return hf, from_hf(folder)


def hf_generate(hf, ids, **kwargs):
    return hf.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=False, **kwargs)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return GPT(GPTConfig(**{**config, **overrides})).eval()


# --- against transformers ---------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(pair, use_cache):
    hf, ours = pair
    vocab, block = hf.config.vocab_size, hf.config.n_positions
    prompts = torch.randint(0, vocab, (3, 5), generator=torch.Generator().manual_seed(0))
    new = block - 5  # up to the full context
    expected = hf_generate(hf, prompts, max_new_tokens=new, use_cache=use_cache)
    got = generate(ours, prompts, new, use_cache=use_cache)
    assert torch.equal(got, expected)
    assert len(set(expected[:, 5:].flatten().tolist())) > 10  # not one repeated token


def test_beam_search_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(2))
    for num_beams, length_penalty in ((2, 1.0), (4, 1.0), (5, 0.0)):
        expected = hf_generate(hf, prompt, max_new_tokens=10, num_beams=num_beams, length_penalty=length_penalty,
                               early_stopping=True, output_scores=True, return_dict_in_generate=True)
        for use_cache in (True, False):
            got, score = beam_search(ours, prompt, 10, num_beams=num_beams, length_penalty=length_penalty,
                                     use_cache=use_cache, return_score=True)
            assert torch.equal(got, expected.sequences)
            assert score == pytest.approx(expected.sequences_scores.item(), abs=1e-4)


def test_beam_search_with_eos_matches_transformers(pair):
    hf, ours = pair
    prompt = torch.randint(0, hf.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(3))
    greedy = generate(ours, prompt, 12)[0, 4:].tolist()
    eos = greedy[3]  # a token the model likes to produce, so some beams end
    expected = hf_generate(hf, prompt, max_new_tokens=12, num_beams=3, eos_token_id=eos, early_stopping=True)
    got = beam_search(ours, prompt, 12, num_beams=3, eos_token_id=eos)
    assert torch.equal(got, expected)


# --- the KV cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_sdpa", [True, False])
def test_cache_in_pieces_equals_full_pass(use_sdpa):
    model = tiny_gpt(use_sdpa=use_sdpa)
    seq = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(seq)
        cache = KVCache()
        bounds = [0, 4, 5, 6, 9, 10, 16]  # a prompt, single tokens and chunks (the offset causal mask)
        pieces = [model(seq[:, a:b], cache=cache) for a, b in itertools.pairwise(bounds)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)
    assert cache.seq_len == 16


@pytest.mark.parametrize("kwargs", [{}, dict(temperature=1.0), dict(temperature=0.8, top_k=5),
                                    dict(temperature=1.2, top_p=0.8)])
def test_cache_gives_identical_tokens_past_block_size(kwargs):
    model = tiny_gpt()
    prompts = torch.randint(0, 50, (3, 4), generator=torch.Generator().manual_seed(1))
    runs = [generate(model, prompts, 40, use_cache=c, generator=torch.Generator().manual_seed(7), **kwargs)
            for c in (True, False)]
    assert runs[0].shape == (3, 44)
    assert torch.equal(runs[0], runs[1])


def test_long_prompt_is_cropped_to_block_size():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (1, 40), generator=torch.Generator().manual_seed(2))
    out = generate(model, prompt, 3)
    cropped = generate(model, prompt[:, -16:], 3)
    assert torch.equal(out[:, -3:], cropped[:, -3:])
    assert torch.equal(out, generate(model, prompt, 3, use_cache=False))


def test_kv_cache_update_grow_crop_reorder():
    cache = KVCache()
    k0, v0 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    k, v = cache.update(0, k0, v0)
    assert torch.equal(k, k0) and torch.equal(v, v0) and cache.seq_len == 5
    chunks = [torch.randn(2, 3, 1, 4) for _ in range(40)]  # forces the storage to grow several times
    for c in chunks:
        k, v = cache.update(0, c, -c)
    assert torch.equal(k, torch.cat([k0, *chunks], dim=2)) and torch.equal(v, torch.cat([v0, *(-c for c in chunks)], 2))
    assert cache.nbytes == 2 * 2 * 3 * 45 * 4 * 4
    cache.crop(7)
    assert cache.seq_len == 7 and torch.equal(cache[0][0], torch.cat([k0, *chunks[:2]], dim=2))
    cache.reorder(torch.tensor([1, 1, 0]))
    assert torch.equal(cache[0][0], torch.cat([k0, *chunks[:2]], dim=2)[[1, 1, 0]])
    latent = KVCache()  # any number of tensors, time on dim -2
    (c,) = latent.update(3, torch.ones(2, 6, 8))
    assert c.shape == (2, 6, 8) and latent.seq_len == 0  # seq_len is layer 0's, empty here
    with pytest.raises(ValueError, match="do not match the cached ones"):
        cache.update(0, torch.randn(3, 3, 1, 5), torch.randn(3, 3, 1, 5))
    with pytest.raises(ValueError, match="cannot crop a cache of 7 positions to 8"):
        cache.crop(8)


# --- filters and sampling -----------------------------------------------------------------------------

def top_k_reference(row, k):
    threshold = sorted(row.tolist(), reverse=True)[k - 1]
    return [v if v >= threshold else -math.inf for v in row.tolist()]


def top_p_reference(row, p):
    """Add probabilities in descending order (float64) until they reach p; keep those tokens."""
    probs = F.softmax(row.double(), dim=-1).tolist()
    keep, total = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        keep.add(i)
        total += probs[i]
        if total >= p:
            break
    return [v if i in keep else -math.inf for i, v in enumerate(row.tolist())]


LOGITS = torch.randn(16, 200, generator=torch.Generator().manual_seed(0)) * 2.5


@pytest.mark.parametrize("k", [1, 2, 7, 199, 200, 500])
def test_top_k_against_loop_and_transformers(k):
    got = top_k_filter(LOGITS, k)
    assert got.tolist() == [top_k_reference(row, min(k, 200)) for row in LOGITS]
    assert torch.equal(got, TopKLogitsWarper(k)(None, LOGITS.clone()))
    assert ((got > -math.inf).sum(-1) == min(k, 200)).all()


def test_top_k_keeps_ties():
    assert top_k_filter(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 1).tolist() == [[-math.inf, 2.0, 2.0, -math.inf]]


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
def test_top_p_against_loop_and_transformers(p):
    got = top_p_filter(LOGITS, p)
    assert got.tolist() == [top_p_reference(row, p) for row in LOGITS]
    assert torch.equal(got, TopPLogitsWarper(p)(None, LOGITS.clone()))


def test_top_p_worked_example():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    assert (top_p_filter(probs.log(), 0.75) > -math.inf).tolist() == [False, True, False, True]
    assert (top_p_filter(probs.log(), 0.81) > -math.inf).tolist() == [False, True, True, True]


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.0])
    n = 40_000
    draws = sample_next(logits.expand(n, 5), temperature=0.7, top_k=4, top_p=0.9,
                        generator=torch.Generator().manual_seed(0))
    expected = F.softmax(top_p_filter(top_k_filter(logits / 0.7, 4), 0.9), dim=-1)
    observed = torch.bincount(draws, minlength=5) / n
    assert (observed - expected).abs().max() < 0.01
    assert observed[expected == 0].sum() == 0


def test_temperature_zero_is_argmax_and_same_seed_same_sample():
    model = tiny_gpt()
    prompt = torch.tensor([1, 2, 3])
    assert torch.equal(generate(model, prompt, 5, top_k=3, top_p=0.5), generate(model, prompt, 5))
    a = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_shapes_1d_and_2d_and_zero_tokens():
    model = tiny_gpt()
    assert generate(model, torch.tensor([1, 2, 3]), 4).shape == (7,)
    assert generate(model, [[1, 2, 3], [4, 5, 6]], 4).shape == (2, 7)
    assert torch.equal(generate(model, torch.tensor([1, 2]), 0), torch.tensor([1, 2]))
    assert beam_search(model, torch.tensor([1, 2]), 3).shape == (5,)


def test_eos_pads_finished_rows_and_stops():
    model = tiny_gpt()
    prompts = torch.randint(0, 50, (2, 3), generator=torch.Generator().manual_seed(4))
    free = generate(model, prompts, 12)
    eos = free[0, 3 + 2].item()  # the third token row 0 generates
    out = generate(model, prompts, 12, eos_token_id=eos)
    for row in range(2):
        hits = (free[row, 3:] == eos).nonzero()
        end = 3 + hits[0].item() + 1 if len(hits) else out.size(1)
        assert torch.equal(out[row, :end], free[row, :end])
        assert (out[row, end:] == eos).all()
    if not (free[1, 3:] == eos).any():
        assert out.size(1) == 15


def test_generate_restores_training_mode():
    model = tiny_gpt(dropout=0.1).train()
    generate(model, torch.tensor([1]), 2)
    assert model.training


# --- beam search --------------------------------------------------------------------------------------

def test_one_beam_is_greedy():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (1, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(beam_search(model, prompt, 20, num_beams=1), generate(model, prompt, 20))


def test_best_beam_score_never_increases_with_length():
    model = tiny_gpt(seed=3)
    prompt = torch.tensor([4, 8])
    scores = [beam_search(model, prompt, n, num_beams=3, length_penalty=0.0, return_score=True)[1]
              for n in range(1, 10)]
    assert all(later <= earlier + 1e-6 for earlier, later in itertools.pairwise(scores))
    assert scores[-1] < scores[0]


def test_enough_beams_is_exhaustive_search():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=16, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0)
        start = torch.tensor([[0, 3]])
        every = torch.cartesian_prod(*[torch.arange(5)] * 3)  # (125, 3)
        logp = F.log_softmax(model(torch.cat([start.expand(125, 2), every], dim=1)), dim=-1)
        seq_logp = logp[:, 1:4].gather(-1, every[..., None]).squeeze(-1).sum(-1)
    found, score = beam_search(model, start, 3, num_beams=25, length_penalty=0.0, return_score=True)
    assert torch.equal(found[0, 2:], every[seq_logp.argmax()])
    assert score == pytest.approx(seq_logp.max().item(), abs=1e-5)
    greedy_score = beam_search(model, start, 3, num_beams=1, length_penalty=0.0, return_score=True)[1]
    assert score >= greedy_score


# --- bad arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=0), "top_k must be a positive integer"),
    (dict(temperature=1.0, top_k=2.5), "top_k must be a positive integer"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
])
def test_bad_sampling_arguments(kwargs, message):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), torch.tensor([1, 2]), **kwargs)


@pytest.mark.parametrize("ids, message", [
    (torch.tensor([1.0, 2.0]), "integer token ids"),
    (torch.zeros(1, 1, 2, dtype=torch.long), r"\(time,\) or \(batch, time\)"),
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
])
def test_bad_input_ids(ids, message):
    with pytest.raises(ValueError, match=message):
        generate(tiny_gpt(), ids, 3)


def test_beam_search_bad_arguments():
    with pytest.raises(ValueError, match="one prompt at a time"):
        beam_search(tiny_gpt(), torch.zeros(2, 3, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1"):
        beam_search(tiny_gpt(), torch.tensor([1]), 3, num_beams=0)


def test_model_may_bring_its_own_cache():
    """A model with make_cache() gets its own kind of cache from generate and beam_search."""
    made = []

    class CountingCache(KVCache):
        def __init__(self):
            super().__init__()
            self.updates = 0
            made.append(self)

        def update(self, layer_idx, *new):
            self.updates += 1
            return super().update(layer_idx, *new)

    model = tiny_gpt()
    model.make_cache = CountingCache
    prompt = torch.tensor([[3, 1, 4]])
    assert torch.equal(generate(model, prompt, 5), generate(model, prompt, 5, use_cache=False))
    assert len(made) == 1 and made[0].updates == 5 * model.config.n_layer
    beam_search(model, prompt, 3, num_beams=2)
    assert len(made) == 2 and made[1].seq_len == 5  # the prompt and two of the three new tokens
