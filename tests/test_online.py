"""The online paths, against servers on 127.0.0.1: from_hf and load_hf_tokenizer with a Hub name, tinyshakespeare's download.

The fake Hub answers the requests huggingface_hub makes (repo info, tree listing, HEAD and GET on
/{repo}/resolve/{revision}/{file}) from folders saved here with save_pretrained, and counts them.
"""

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from scratchlm import data
from scratchlm.gpt import from_hf
from scratchlm.hf_tokenizer import load_hf_tokenizer

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # the one revision every repo of the fake Hub has


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 with `handler_class`, which reads `state` from `server_state`; records
    (method, path) of every request."""

    def __init__(self, handler_class, **state):
        self.requests = []
        self.__dict__.update(state)
        outer = self

        class Handler(handler_class):
            server_state = outer

            def log_message(self, *args):  # quiet: pytest shows the test's own output
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def free_port_url() -> str:
    """The URL of a port on 127.0.0.1 where nothing listens: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- a Hugging Face Hub on the loopback -----------------------------------------------------------

class HubHandler(http.server.BaseHTTPRequestHandler):
    """Model repos `server_state.repos` ({"org/name": folder}) at the revision COMMIT, as the Hub serves them."""

    protocol_version = "HTTP/1.1"

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def send(self, status, body=b"", headers=(), head=False):
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def not_found(self, code, head):
        self.send(404, json.dumps({"error": code}).encode(), [("X-Error-Code", code), ("Content-Type", "application/json")],
                  head)

    def answer(self, head):
        path = unquote(urlsplit(self.path).path)
        self.server_state.requests.append((self.command, path))
        repos = self.server_state.repos
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for kind in ("/revision/", "/tree/"):
                if kind in rest:
                    repo = rest.split(kind)[0]
                    break
            else:
                return self.send(400, b"unexpected API call", head=head)
            if repo not in repos:
                return self.not_found("RepoNotFound", head)
            files = sorted(p.name for p in repos[repo].iterdir() if p.is_file())
            if kind == "/revision/":
                info = {"id": repo, "modelId": repo, "sha": COMMIT, "private": False,
                        "siblings": [{"rfilename": f} for f in files]}
            else:
                info = [{"type": "file", "path": f, "size": (repos[repo] / f).stat().st_size,
                         "oid": hashlib.sha1((repos[repo] / f).read_bytes()).hexdigest()} for f in files]
            return self.send(200, json.dumps(info).encode(), [("Content-Type", "application/json")], head)
        if "/resolve/" in path:
            repo, _, filename = path[1:].partition("/resolve/")
            filename = filename.partition("/")[2]  # after the revision
            if repo not in repos:
                return self.not_found("RepoNotFound", head)
            file = repos[repo] / filename
            if not file.is_file():
                return self.not_found("EntryNotFound", head)
            body = file.read_bytes()
            return self.send(200, body, [("X-Repo-Commit", COMMIT), ("ETag", f'"{hashlib.sha256(body).hexdigest()}"'),
                                         ("Content-Type", "application/octet-stream")], head)
        self.send(404, b"", head=head)


@pytest.fixture
def hub_env(tmp_path, monkeypatch):
    """An empty Hugging Face cache in tmp_path, online; returns a function url -> point the Hub client at url."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)  # a Hub name must not be found as a folder in the working directory

    def point_at(url):
        # huggingface_hub reads HF_ENDPOINT once, at import, into these two constants
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")

    return point_at


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    """A folder as a model repo holds it: a random GPT-2 saved by transformers, and a small trained tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path_factory.mktemp("tiny-gpt2-repo")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=None, eos_token_id=None)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_a_hub_name_downloads_and_loads_as_the_folder_does(hub_env, tiny_repo):
    with LoopbackServer(HubHandler, repos={"someone/tiny-gpt2": tiny_repo}) as hub:
        hub_env(hub.url)
        model = from_hf("someone/tiny-gpt2")
        fetched = {path.rsplit("/", 1)[1] for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    local = from_hf(tiny_repo)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert model.state_dict().keys() == local.state_dict().keys()
    assert all(torch.equal(model.state_dict()[k], local.state_dict()[k]) for k in local.state_dict())
    ids = torch.tensor([[1, 5, 7, 96]])
    with torch.no_grad():
        assert torch.equal(model(ids), local(ids))


def test_hf_endpoint_set_before_import_reaches_the_server(tmp_path, tiny_repo):
    """The way a user points the client elsewhere: HF_ENDPOINT and HF_HOME in the environment of a new process."""
    env = {**os.environ, "HF_ENDPOINT": "", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN"):
        env.pop(name, None)
    script = "import scratchlm; m = scratchlm.from_hf('someone/tiny-gpt2'); print(m.config.n_layer, m.config.vocab_size)"
    with LoopbackServer(HubHandler, repos={"someone/tiny-gpt2": tiny_repo}) as hub:
        env["HF_ENDPOINT"] = hub.url
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["2", "97"]
    assert ("GET", "/someone/tiny-gpt2/resolve/" + COMMIT + "/model.safetensors") in hub.requests
    assert (tmp_path / "hf-home" / "hub" / "models--someone--tiny-gpt2").is_dir()


def test_the_second_call_makes_no_request(hub_env, tiny_repo):
    """A model or tokenizer in the cache is loaded from it without asking the Hub (so it also works offline)."""
    with LoopbackServer(HubHandler, repos={"someone/tiny-gpt2": tiny_repo}) as hub:
        hub_env(hub.url)
        first = from_hf("someone/tiny-gpt2")
        tok_first = load_hf_tokenizer("someone/tiny-gpt2")
        made = len(hub.requests)
        assert made > 0
        second = from_hf("someone/tiny-gpt2")
        tok_second = load_hf_tokenizer("someone/tiny-gpt2")
        assert len(hub.requests) == made, hub.requests[made:]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True))
    text = "to be or not to be"
    assert tok_first.encode(text) == tok_second.encode(text) == load_hf_tokenizer(tiny_repo).encode(text)


def test_a_tokenizer_fetched_first_does_not_pass_for_the_whole_model(hub_env, tiny_repo):
    """load_hf_tokenizer caches tokenizer.json alone; from_hf then still downloads the weights."""
    with LoopbackServer(HubHandler, repos={"someone/tiny-gpt2": tiny_repo}) as hub:
        hub_env(hub.url)
        tok = load_hf_tokenizer("someone/tiny-gpt2")
        assert [p.rsplit("/", 1)[1] for m, p in hub.requests if m == "GET" and "/resolve/" in p] == ["tokenizer.json"]
        model = from_hf("someone/tiny-gpt2")
    assert tok.encode("to be") == load_hf_tokenizer(tiny_repo).encode("to be")
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([[3, 4]])), from_hf(tiny_repo)(torch.tensor([[3, 4]])))


def test_a_name_the_hub_does_not_have(hub_env, tiny_repo):
    with LoopbackServer(HubHandler, repos={"someone/tiny-gpt2": tiny_repo}) as hub:
        hub_env(hub.url)
        with pytest.raises(FileNotFoundError) as err:
            from_hf("someone/no-such-model")
        with pytest.raises(FileNotFoundError) as tok_err:
            load_hf_tokenizer("someone/no-such-model")
    for message in (str(err.value), str(tok_err.value)):
        assert "'someone/no-such-model'" in message
        assert f"the Hugging Face Hub at {hub.url} has no public model of that name" in message


def test_a_model_without_tokenizer_json(hub_env, tiny_repo, tmp_path):
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "config.json").write_bytes((tiny_repo / "config.json").read_bytes())
    with LoopbackServer(HubHandler, repos={"someone/slow": slow}) as hub:
        hub_env(hub.url)
        with pytest.raises(FileNotFoundError, match="the Hub model 'someone/slow' has no tokenizer.json"):
            load_hf_tokenizer("someone/slow")


def test_a_hub_that_is_down_says_how_to_work_offline(hub_env):
    url = free_port_url()
    hub_env(url)
    with pytest.raises(FileNotFoundError) as err:
        from_hf("someone/tiny-gpt2")
    with pytest.raises(FileNotFoundError) as tok_err:
        load_hf_tokenizer("someone/tiny-gpt2")
    for message in (str(err.value), str(tok_err.value)):
        assert message.startswith("'someone/tiny-gpt2' is not a local")
        assert f"the Hub at {url} could not be reached" in message
        assert "To work offline, pass the path of a" in message and "HF_HUB_OFFLINE=1" in message
        assert "ConnectError" in message  # the cause, from the network layer


def test_offline_mode_uses_the_cache_and_names_the_setting(hub_env, tiny_repo, monkeypatch):
    import huggingface_hub.constants as constants

    with LoopbackServer(HubHandler, repos={"someone/tiny-gpt2": tiny_repo}) as hub:
        hub_env(hub.url)
        from_hf("someone/tiny-gpt2")
        made = len(hub.requests)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert isinstance(from_hf("someone/tiny-gpt2"), torch.nn.Module)
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, so it is not downloaded"):
            from_hf("someone/other-model")
        with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set, so it is not downloaded"):
            load_hf_tokenizer("someone/other-model")
        assert len(hub.requests) == made


# --- TinyShakespeare's download -------------------------------------------------------------------
# tests/test_data.py covers a good download (saved, checked) and a short file served whole; these cover
# a corrupted file, a transfer cut short, a server that is down, and what is left on disk after each.

class FileHandler(http.server.BaseHTTPRequestHandler):
    """GET answers `server_state.payload`; with `server_state.cut`, says the full length but sends `cut` bytes."""

    def do_GET(self):
        self.server_state.requests.append(("GET", self.path))
        payload, cut = self.server_state.payload, getattr(self.server_state, "cut", None)
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload[:cut] if cut is not None else payload)
        self.close_connection = True


@pytest.fixture(scope="module")
def real_text():
    """The real TinyShakespeare's bytes, found where the loader finds it (SCRATCHLM_DATA in CI, data/, the cache)."""
    for folder in data._candidate_folders():
        path = folder / data.DATA_FILE if folder.is_dir() else folder
        if path.is_file():
            payload = path.read_bytes()
            assert hashlib.sha256(payload).hexdigest() == data.DATA_SHA256
            return payload
    pytest.skip("no copy of TinyShakespeare to serve (set SCRATCHLM_DATA to the folder that holds it)")


@pytest.fixture
def data_folder(tmp_path, monkeypatch, real_text):  # real_text first: found before the search is emptied
    """An empty SCRATCHLM_DATA folder holding one unrelated file, no course data/ folder, an empty home."""
    monkeypatch.setattr(data, "_course_root", lambda: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    monkeypatch.setenv("SCRATCHLM_DATA", str(folder))
    return folder


def left_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_served_good_file_is_saved_under_its_name(data_folder, real_text):
    with LoopbackServer(FileHandler, payload=real_text) as server:
        assert data.tinyshakespeare(url=server.url + "/input.txt") == real_text.decode("utf-8")
        assert data.tinyshakespeare(url=server.url + "/input.txt") == real_text.decode("utf-8")
        assert len(server.requests) == 1  # the second call reads the saved copy
    assert left_in(data_folder) == {"notes.txt": b"mine", "tinyshakespeare.txt": real_text}


def test_a_corrupted_download_names_both_hashes_and_saves_nothing(data_folder, real_text):
    corrupted = real_text.replace(b"ROMEO", b"ROMEX", 1)
    with LoopbackServer(FileHandler, payload=corrupted) as server, pytest.raises(ValueError) as err:
        data.tinyshakespeare(url=server.url + "/input.txt")
    message = str(err.value)
    assert hashlib.sha256(corrupted).hexdigest() in message and data.DATA_SHA256 in message
    assert "not saved" in message and str(data_folder / "tinyshakespeare.txt") in message
    assert left_in(data_folder) == {"notes.txt": b"mine"}


def test_a_corrupted_local_copy_is_refused_and_kept(data_folder, real_text):
    """The loader deletes nothing it did not write: the user's bad copy stays, the error says what to do."""
    bad = real_text[:-100]
    (data_folder / "tinyshakespeare.txt").write_bytes(bad)
    with LoopbackServer(FileHandler, payload=real_text) as server, pytest.raises(ValueError) as err:
        data.tinyshakespeare(url=server.url + "/input.txt")
    assert hashlib.sha256(bad).hexdigest() in str(err.value) and data.DATA_SHA256 in str(err.value)
    assert server.requests == []  # a copy was found: no download attempted
    assert left_in(data_folder) == {"notes.txt": b"mine", "tinyshakespeare.txt": bad}


def test_a_transfer_cut_short_leaves_nothing_and_says_so(data_folder, real_text):
    with LoopbackServer(FileHandler, payload=real_text, cut=300_000) as server, \
            pytest.raises(FileNotFoundError) as err:
        data.tinyshakespeare(url=server.url + "/input.txt")
    message = str(err.value)
    assert f"the connection closed after 300,000 of {len(real_text):,} bytes" in message
    assert f"save it as {data_folder / 'tinyshakespeare.txt'}" in message
    assert left_in(data_folder) == {"notes.txt": b"mine"}  # no half file, no temporary


def test_no_network_says_where_to_put_the_file(data_folder):
    url = free_port_url() + "/input.txt"
    with pytest.raises(FileNotFoundError) as err:
        data.tinyshakespeare(url=url)
    message = str(err.value)
    assert f"downloading it from {url} failed" in message and "Connection refused" in message
    assert f"save it as {data_folder / 'tinyshakespeare.txt'}" in message and "SCRATCHLM_DATA" in message
    assert left_in(data_folder) == {"notes.txt": b"mine"}
