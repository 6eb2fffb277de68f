"""scratchlm.data: the TinyShakespeare loader, profiles, CharTokenizer, splits and batches."""

import functools
import hashlib
import http.server
import threading
from pathlib import Path

import pytest
import torch

from scratchlm import data
from scratchlm.data import CharTokenizer, by_profile, get_batch, get_profile, tinyshakespeare, train_val_split

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="session")
def good_copy():
    """The real text, found through the loader itself (SCRATCHLM_DATA, data/ or the cache)."""
    return tinyshakespeare().encode("utf-8")


@pytest.fixture
def isolated(tmp_path, monkeypatch, good_copy):  # good_copy first: read before isolating
    """No course data/ folder, an empty SCRATCHLM_DATA folder and an empty home: nothing to find."""
    monkeypatch.setattr(data, "_course_root", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "data"
    folder.mkdir()
    monkeypatch.setenv("SCRATCHLM_DATA", str(folder))
    return folder


@pytest.fixture
def serve(tmp_path):
    """Serve bytes over HTTP on the loopback interface; yields a function payload -> URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def url_for(payload: bytes) -> str:
        (root / "input.txt").write_bytes(payload)
        return f"http://127.0.0.1:{server.server_address[1]}/input.txt"

    yield url_for
    server.shutdown()


def test_text_has_the_published_hash(good_copy):
    assert hashlib.sha256(good_copy).hexdigest() == data.DATA_SHA256
    assert len(good_copy) == 1_115_394


@pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data beside the checkout")
def test_hash_constant_matches_the_shared_copy():
    assert hashlib.sha256(SHARED.read_bytes()).hexdigest() == data.DATA_SHA256


def test_data_env_may_name_the_file_itself(isolated, good_copy, monkeypatch):
    path = isolated / "somewhere.txt"
    path.write_bytes(good_copy)
    monkeypatch.setenv("SCRATCHLM_DATA", str(path))
    assert tinyshakespeare() == good_copy.decode("utf-8")


@pytest.mark.parametrize("damage", ["truncated", "edited"])
def test_corrupted_file_is_refused_with_advice(isolated, good_copy, damage):
    bad = good_copy[:-100] if damage == "truncated" else good_copy.replace(b"ROMEO", b"ROMEX", 1)
    (isolated / "tinyshakespeare.txt").write_bytes(bad)
    with pytest.raises(ValueError, match="SHA-256") as err:
        tinyshakespeare()
    assert "Delete it" in str(err.value)


def test_missing_and_offline_says_where_to_put_the_file(isolated):
    # port 9 (discard) on loopback: connection refused at once, like being offline
    with pytest.raises(FileNotFoundError, match="SCRATCHLM_DATA") as err:
        tinyshakespeare(url="http://127.0.0.1:9/input.txt")
    assert "data/ folder" in str(err.value)
    assert not (isolated / "tinyshakespeare.txt").exists()


def test_download_is_checked_and_saved(isolated, good_copy, serve):
    text = tinyshakespeare(url=serve(good_copy))
    assert text == good_copy.decode("utf-8")
    assert (isolated / "tinyshakespeare.txt").read_bytes() == good_copy
    assert sorted(p.name for p in isolated.iterdir()) == ["tinyshakespeare.txt"]


def test_bad_download_is_not_saved(isolated, good_copy, serve):
    with pytest.raises(ValueError, match="not saved"):
        tinyshakespeare(url=serve(good_copy[:1000]))
    assert list(isolated.iterdir()) == []  # neither the file nor a temporary left behind


def test_profile_from_environment(monkeypatch):
    for name in ("ci", "cpu", "gpu"):
        monkeypatch.setenv("SCRATCHLM_PROFILE", name.upper())
        assert get_profile() == name
    monkeypatch.setenv("SCRATCHLM_PROFILE", "laptop")
    with pytest.raises(ValueError, match="'laptop' is not a profile"):
        get_profile()


@pytest.mark.parametrize("cuda, expected", [(True, "gpu"), (False, "cpu")])
def test_profile_default_follows_cuda(monkeypatch, cuda, expected):
    monkeypatch.delenv("SCRATCHLM_PROFILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert get_profile() == expected
    assert by_profile(ci=1, cpu=2, gpu=3) == {"cpu": 2, "gpu": 3}[expected]


def test_by_profile_explicit():
    assert by_profile(ci="a", cpu="b", gpu="c", profile="ci") == "a"


def test_char_tokenizer_round_trip():
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == len(set(text))
    assert tok.chars == sorted(set(text))
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Fi") == [tok.chars.index("F"), tok.chars.index("i")]


def test_char_tokenizer_bad_input():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="not in the vocabulary: \\['z'\\]"):
        tok.encode("abz")
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"abc")
    with pytest.raises(TypeError, match="list"):
        CharTokenizer.from_text(["a"])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="at least one character"):
        CharTokenizer.from_text("")


def test_split_and_batches():
    ids = torch.arange(100)
    train, val = train_val_split(ids)
    assert (len(train), len(val)) == (90, 10)
    assert torch.equal(torch.cat([train, val]), ids)
    x, y = get_batch(train, block_size=8, batch_size=5, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(y - x, torch.ones_like(x))  # consecutive ids: each target is the next token


def test_split_and_batch_errors():
    with pytest.raises(ValueError, match="1-D"):
        train_val_split(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="between 0 and 1"):
        train_val_split(torch.arange(10), 1.5)
    with pytest.raises(ValueError, match="block_size=8"):
        get_batch(torch.arange(8), block_size=8, batch_size=2)


def test_progress_leaves_a_closing_line(capsys):
    from scratchlm.data import progress

    assert list(progress(range(5), "demo", disable=False, file=None)) == [0, 1, 2, 3, 4]
    assert capsys.readouterr().out.startswith("demo: 5 steps in ")
    for i in progress(range(10), "early", unit="merges"):
        if i == 2:
            break
    assert capsys.readouterr().out.startswith("early: 3 merges in ")  # a break still leaves the line
    assert list(progress(range(3), "quiet", disable=True)) == [0, 1, 2]
    assert capsys.readouterr().out == ""
