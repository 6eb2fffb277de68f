"""scratchlm.real_align: the JSON-answer task, its checker, chat examples for SFT, greedy replies, memory accounting."""
import json

import pytest
import torch
import torch.nn as nn

from scratchlm.generation import generate
from scratchlm.gguf import IM_END, chatml, smollm2_path, tokenizer_from_gguf
from scratchlm.llama import Llama, LlamaConfig
from scratchlm.real_align import (
    JSON_SYSTEM,
    QUESTION_KINDS,
    chat_prompt_ids,
    check_reply,
    encode_chat_examples,
    expected_training_bytes,
    greedy_replies,
    json_answer,
    measured_training_bytes,
    one_word_questions,
    score_replies,
    split_questions,
)


@pytest.fixture(scope="module")
def tok():
    return tokenizer_from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def end_id(tok):
    return tok.encode(IM_END, allowed_special="all")[0]


def test_questions_fill_every_template():
    questions = one_word_questions()
    assert len(questions) == sum(len(table) for _, table in QUESTION_KINDS.values()) == 70
    assert ("capital", "What is the capital of France?", "Paris") in questions
    assert ("young", "What is a baby cat called?", "kitten") in questions
    assert len({q for _, q, _ in questions}) == len(questions)
    assert one_word_questions(["legs"]) == [(k, q, a) for k, q, a in questions if k == "legs"]


def test_split_is_seeded_disjoint_and_holds_out_the_unseen_kind():
    train, held_out = split_questions(45, "young", seed=0)
    assert (train, held_out) == split_questions(45, "young", seed=0)
    assert train != split_questions(45, "young", seed=1)[0]
    assert len(train) == 45 and len(held_out) == 70 - 45
    assert sorted(train + held_out) == sorted(one_word_questions())
    assert not {q for _, q, _ in train} & {q for _, q, _ in held_out}
    assert all(k != "young" for k, _, _ in train)
    assert sum(k == "young" for k, _, _ in held_out) == len(QUESTION_KINDS["young"][1])


@pytest.mark.parametrize("call, message", [
    (lambda: split_questions(0), "n_train must be an integer between 1 and 60"),
    (lambda: split_questions(61), "n_train must be an integer between 1 and 60"),
    (lambda: split_questions(4.5), "n_train must be an integer"),
    (lambda: split_questions(10, unseen_kind="rivers"), "not a question kind"),
    (lambda: one_word_questions(["capital", "rivers"]), "unknown question kind 'rivers'"),
])
def test_task_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("reply, expected, want", [
    ('{"answer": "Paris"}', "Paris", (True, True)),
    ('{"answer": "PARIS"}', "Paris", (True, True)),
    (' {"answer": "Paris"}\n', "Paris", (True, True)),  # JSON allows whitespace around the object
    ("The capital of France is Paris.", "Paris", (False, True)),
    ('{"answer": "Lyon"}', "Paris", (True, False)),
    ('{"answer": "Parisian"}', "Paris", (True, False)),  # a whole word, not a prefix
    ('{"answer": "Paris", "sure": true}', "Paris", (False, True)),  # only the key "answer"
    ('{"answer": 4}', "4", (False, True)),  # the value must be a string
    ('["Paris"]', "Paris", (False, True)),
    ("{'answer': 'Paris'}", "Paris", (False, True)),  # not JSON
    ('```json\n{"answer": "Paris"}\n```', "Paris", (False, True)),
    ("", "Paris", (False, False)),
])
def test_check_reply(reply, expected, want):
    assert check_reply(reply, expected) == want


def test_json_answer_is_what_the_checker_accepts():
    for answer in ("Paris", "St. Petersburg", 'say "hi"'):
        assert json.loads(json_answer(answer)) == {"answer": answer}
        assert check_reply(json_answer(answer), answer)[0]
    assert json_answer("Paris") == '{"answer": "Paris"}'


def test_score_replies():
    replies = ['{"answer": "Paris"}', "It is Rome.", '{"answer": "Oslo"}', "no idea"]
    assert score_replies(replies, ["Paris", "Rome", "Bergen", "Cairo"]) == (0.5, 0.5)


@pytest.mark.parametrize("call, message", [
    (lambda: check_reply('{"answer": "4"}', ""), "non-empty expected answer"),
    (lambda: check_reply(None, "4"), "reply string"),
    (lambda: score_replies(["4"], ["4", "5"]), "as many replies as answers"),
    (lambda: score_replies([], []), "at least one"),
])
def test_checker_refuses_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_chat_prompt_is_chatml_with_the_system_message(tok):
    text = "<|im_start|>system\n" + JSON_SYSTEM + "<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt_ids(tok, "Hi?") == tok.encode(text, allowed_special="all")
    bare = chatml([{"role": "user", "content": "Hi?"}])
    assert chat_prompt_ids(tok, "Hi?", system=None) == tok.encode(bare, allowed_special="all")


def test_encode_chat_examples_masks_the_reply_and_its_end(tok, end_id):
    questions = ["What is the capital of France?", "What is the opposite of hot?"]
    replies = [json_answer("Paris"), json_answer("a much longer answer than the first one")]
    ids, mask = encode_chat_examples(tok, questions, replies, end_id)
    assert ids.shape == mask.shape and ids.dtype == torch.long and mask.dtype == torch.bool
    for row, m, q, r in zip(ids.tolist(), mask.tolist(), questions, replies, strict=True):
        prompt = chat_prompt_ids(tok, q)
        trained = [t for t, keep in zip(row, m, strict=True) if keep]
        assert tok.decode(trained) == r + IM_END
        assert row[: len(prompt)] == prompt and not any(m[: len(prompt)])
        first = len(prompt) + len(trained)
        assert all(t == end_id for t in row[first:]) and not any(m[first:])  # right padding, not trained on
    assert mask[1].sum() > mask[0].sum() and mask[1, -1]


def test_encode_chat_examples_refuses_mismatched_lists(tok, end_id):
    with pytest.raises(ValueError, match="one reply per question"):
        encode_chat_examples(tok, ["a?", "b?"], ["x"], end_id)
    with pytest.raises(ValueError, match="at least one"):
        encode_chat_examples(tok, [], [], end_id)


def tiny_llama(vocab_size: int) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    return Llama(config).double().eval()  # float64: batched and one-by-one greedy choices cannot differ by a tie


def test_greedy_replies_equal_one_prompt_at_a_time(tok):
    model = tiny_llama(len(tok.hf_vocab))
    questions = ["What is the capital of France?", "What is the capital of Japan?", "What colour is snow?",
                 "How many legs does a spider have?"]
    prompts = [chat_prompt_ids(tok, q) for q in questions]
    assert len(prompts[0]) == len(prompts[1]) != len(prompts[2])  # one batch of two, and batches of one
    n = 6
    alone = [generate(model, torch.tensor(p), n)[len(p):].tolist() for p in prompts]
    end_id = alone[1][2]  # a token the model writes: replies are cut there
    expected = [tok.decode(new[: new.index(end_id)] if end_id in new else new) for new in alone]
    assert greedy_replies(model, tok, questions, end_id, max_new_tokens=n) == expected
    assert len(expected[1]) < len(tok.decode(alone[1]))  # the cut happened


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_greedy_replies_refuses_bad_max_new_tokens(tok, end_id, bad):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        greedy_replies(tiny_llama(len(tok.hf_vocab)), tok, ["Hi?"], end_id, max_new_tokens=bad)


@pytest.mark.parametrize("dtype, size", [(torch.float32, 4), (torch.float64, 8)])
def test_training_bytes_expected_equal_adamws_real_state(dtype, size):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).to(dtype)
    model[0].requires_grad_(False)  # frozen: no gradient, no state
    params = [p for p in model.parameters() if p.requires_grad]
    numbers = 3 * 2 + 2  # the second layer's weight and bias
    expected = expected_training_bytes(list(model.parameters()))
    assert expected == {"gradients": numbers * size, "AdamW state": 2 * numbers * size + 4 * 2}  # + 2 step counters
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    assert measured_training_bytes(params, optimizer) == {"gradients": 0, "AdamW state": 0}
    model(torch.randn(5, 4, dtype=dtype)).sum().backward()
    optimizer.step()
    assert measured_training_bytes(params, optimizer) == expected
