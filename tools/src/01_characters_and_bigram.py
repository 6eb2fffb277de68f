# %% [markdown]
# # 01 · Characters and a bigram baseline
#
# **What you will build.** The data pipeline every later chapter uses: TinyShakespeare loaded and
# checked by hash, a character-level tokenizer, a 90/10 train/validation split and random training
# batches. On top of it, the simplest language model there is, a *bigram* model that predicts the
# next character from the current one, built twice: once by counting and once by gradient descent.
# Its validation loss (about 2.5 nats per character) is the baseline every later model must beat.
#
# **Prerequisites.** Python and a first look at PyTorch tensors. This is the first notebook.
#
# **Exported to the package** (`scratchlm/data.py`): `tinyshakespeare()`, the profile helpers
# `get_profile()` and `by_profile()`, `CharTokenizer`, `train_val_split()` and `get_batch()`.
#
# Contents
# 1. Profiles: one notebook, three scales
# 2. Loading TinyShakespeare, checked by hash
# 3. A character vocabulary: encode and decode
# 4. Train/validation split and random batches
# 5. A count-based bigram model
# 6. A learned bigram model
# 7. Sampling
# 8. Summary and exercises

# %%
#| default_exp data

# %%
#| export
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import torch

# %%
# NBVAL_IGNORE_OUTPUT
import matplotlib.pyplot as plt
import torch.nn as nn
import torch.nn.functional as F

print("torch", torch.__version__)

# %% [markdown]
# ## 1. Profiles: one notebook, three scales
#
# Every training cell in the course reads one setting, the **profile**, from the environment variable
# `SCRATCHLM_PROFILE`:
#
# | profile | meant for | scale |
# |---|---|---|
# | `ci` | continuous integration, `make test` | seconds: tiny models, a few steps, so every code path runs |
# | `cpu` | a laptop (the default without CUDA) | a few minutes |
# | `gpu` | a CUDA GPU (the default with one) | the real thing, nanoGPT scale |
#
# A cell never skips work on a smaller machine; it does the same thing at a smaller size.

# %%
#| export
PROFILES = ("ci", "cpu", "gpu")


def get_profile() -> str:
    """The active profile: `SCRATCHLM_PROFILE` if set, else `gpu` with CUDA and `cpu` without."""
    profile = os.environ.get("SCRATCHLM_PROFILE", "").strip().lower()
    if not profile:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if profile not in PROFILES:
        raise ValueError(f"SCRATCHLM_PROFILE={profile!r} is not a profile; use one of {', '.join(PROFILES)}")
    return profile


def by_profile(*, ci, cpu, gpu, profile: str | None = None):
    """Pick the value for the active profile: `steps = by_profile(ci=50, cpu=2000, gpu=5000)`."""
    return {"ci": ci, "cpu": cpu, "gpu": gpu}[profile or get_profile()]

# %%
# NBVAL_IGNORE_OUTPUT
PROFILE = get_profile()
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"profile: {PROFILE}, device: {device}")

# %% [markdown]
# ## 2. Loading TinyShakespeare, checked by hash
#
# TinyShakespeare is 1.1 MB of Shakespeare's plays, collected by Andrej Karpathy for char-rnn. The
# loader looks for `tinyshakespeare.txt` in the folder named by `SCRATCHLM_DATA`, then in the
# course's `data/` folder, then in `~/.cache/scratchlm`; only if it finds none does it download the
# file. Whatever it finds or downloads must have the SHA-256 below, so a truncated or edited copy
# is caught here and not three notebooks later as a strange loss curve.

# %%
#| export
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_FILE = "tinyshakespeare.txt"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _course_root() -> Path | None:
    """The course checkout (the folder with notebooks/ and data/) above this module or the working folder."""
    starts = [Path(globals()["__file__"]).resolve().parent] if "__file__" in globals() else []  # none in a notebook
    for start in starts + [Path.cwd().resolve()]:
        for folder in (start, *start.parents):
            if (folder / "notebooks").is_dir() and (folder / "data").is_dir():
                return folder
    return None


def _candidate_folders() -> list[Path]:
    """Where to look, in order; the last ones are also where a download goes."""
    folders = []
    if os.environ.get("SCRATCHLM_DATA"):
        folders.append(Path(os.environ["SCRATCHLM_DATA"]).expanduser())
    if (root := _course_root()) is not None:
        folders.append(root / "data")
    folders.append(Path.home() / ".cache" / "scratchlm")
    return folders


def _checked_text(path: Path) -> str:
    digest = _sha256(path)
    if digest != DATA_SHA256:
        raise ValueError(
            f"{path} has SHA-256 {digest}, expected {DATA_SHA256}: the file is corrupted, truncated or "
            f"not TinyShakespeare. Delete it and call tinyshakespeare() again to download a fresh copy, "
            f"or replace it with a good one from {DATA_URL}"
        )
    return path.read_text(encoding="utf-8")


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=30) as response:
        payload = response.read()
    # write next to the destination and rename, so a failed download never leaves a half file
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(payload)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != DATA_SHA256:
        os.unlink(tmp.name)
        raise ValueError(f"the file downloaded from {url} has SHA-256 {digest}, expected {DATA_SHA256}; not saved")
    os.replace(tmp.name, dest)


def tinyshakespeare(url: str = DATA_URL) -> str:
    """The TinyShakespeare text, from a local copy or downloaded, always checked by SHA-256."""
    folders = _candidate_folders()
    for folder in folders:
        path = folder / DATA_FILE if folder.is_dir() else folder
        if path.is_file():
            return _checked_text(path)
    # not found: download into the first writable folder of those (else the cache, created)
    writable = [f for f in folders if f.is_dir() and os.access(f, os.W_OK)]
    dest = (writable[0] if writable else folders[-1]) / DATA_FILE
    try:
        _download(url, dest)
    except (urllib.error.URLError, OSError) as err:
        searched = ", ".join(str(f) for f in folders)
        raise FileNotFoundError(
            f"{DATA_FILE} is not in any of: {searched}; and downloading it from {url} failed ({err}). "
            f"Put the file in the course's data/ folder, or set SCRATCHLM_DATA to the folder that holds it."
        ) from err
    return _checked_text(dest)

# %%
text = tinyshakespeare()
print(f"{len(text):,} characters")
print(text[:250])

# %% [markdown]
# ## 3. A character vocabulary: encode and decode
#
# The simplest tokenizer maps each distinct character to an integer. Our text has 65 of them: letters,
# punctuation, space and newline. `encode` turns a string into ids and `decode` turns ids back;
# a character the vocabulary has never seen is an error that names it, not a silent replacement.

# %%
#| export
class CharTokenizer:
    """Character-level tokenizer: one id per distinct character, ids in sorted character order.

    >>> tok = CharTokenizer.from_text("hello")
    >>> tok.encode("hell"), tok.decode([1, 0, 2])
    ([1, 0, 2, 2], 'ehl')
    """

    def __init__(self, chars):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise ValueError("CharTokenizer needs at least one character")
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        if not isinstance(text, str):
            raise TypeError(f"CharTokenizer.from_text expects a str, got {type(text).__name__}")
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters not in the vocabulary: {unknown!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < len(self.chars)]
        if bad:
            raise ValueError(f"ids out of range 0..{len(self.chars) - 1}: {bad[:10]}")
        return "".join(self.chars[i] for i in ids)

# %%
tok = CharTokenizer.from_text(text)
print("vocabulary size:", tok.vocab_size)
print("characters:", repr("".join(tok.chars)))
ids = tok.encode("ROMEO: hello!")
print(ids)
print(repr(tok.decode(ids)))
assert tok.decode(tok.encode(text)) == text  # the whole text survives a round trip

# %%
try:
    tok.encode("café")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 4. Train/validation split and random batches
#
# We keep the first 90% of the text for training and the last 10% for validation: a contiguous
# split, so validation measures how well the model continues text it has never seen. A training
# batch is `batch_size` random windows of `block_size + 1` characters; the inputs `x` are the first
# `block_size`, and the targets `y` are the same window shifted by one. One window of 8 characters
# holds 8 training examples, one for each context length from 1 to 8.

# %%
#| export
def train_val_split(data: torch.Tensor, train_fraction: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `train_fraction` of a 1-D tensor of ids for training, the rest for validation."""
    if data.dim() != 1:
        raise ValueError(f"expected a 1-D tensor of token ids, got shape {tuple(data.shape)}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be between 0 and 1, got {train_fraction}")
    n = int(train_fraction * len(data))
    return data[:n], data[n:]


def get_batch(data: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator | None = None,
              device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `data`: inputs (B, T) and the targets shifted by one (B, T)."""
    if len(data) <= block_size:
        raise ValueError(f"data has {len(data)} tokens, need more than block_size={block_size}")
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    x = torch.stack([data[i : i + block_size] for i in starts])
    y = torch.stack([data[i + 1 : i + 1 + block_size] for i in starts])
    return x.to(device), y.to(device)

# %%
data = torch.tensor(tok.encode(text), dtype=torch.long)
train_data, val_data = train_val_split(data)
print("train:", len(train_data), "val:", len(val_data))

g = torch.Generator().manual_seed(1337)
xb, yb = get_batch(train_data, block_size=8, batch_size=4, generator=g)
print("x", tuple(xb.shape), "y", tuple(yb.shape))
for t in range(4):
    context, target = xb[0, : t + 1].tolist(), yb[0, t].item()
    print(f"context {tok.decode(context)!r:>8} -> next {tok.decode([target])!r}")

# %% [markdown]
# ## 5. A count-based bigram model
#
# A bigram model says: the next character depends only on the current one. Its best possible
# version is a table of counts. Count how often each character follows each other character in the
# training text, add one to every cell (*Laplace smoothing*, so no probability is exactly zero), and
# normalise each row. The loss of a model is the average negative log-likelihood of the true next
# character; a uniform guess over 65 characters scores ln 65 ≈ 4.17.

# %%
V = tok.vocab_size
counts = torch.zeros((V, V), dtype=torch.float64)
counts.index_put_((train_data[:-1], train_data[1:]), torch.ones(len(train_data) - 1, dtype=torch.float64), accumulate=True)
probs = (counts + 1) / (counts + 1).sum(dim=1, keepdim=True)


def count_bigram_loss(split: torch.Tensor) -> float:
    return -probs[split[:-1], split[1:]].log().mean().item()


print(f"uniform guess: {torch.tensor(float(V)).log().item():.4f}")
print(f"count bigram, train loss: {count_bigram_loss(train_data):.4f}")
print(f"count bigram, val loss:   {count_bigram_loss(val_data):.4f}")

# %%
top = counts.sum(0).argsort(descending=True)[:20]
fig, ax = plt.subplots(figsize=(6, 5))
ax.imshow(probs[top][:, top].numpy(), cmap="Blues")
labels = [repr(tok.chars[i])[1:-1] for i in top]
ax.set_xticks(range(20), labels)
ax.set_yticks(range(20), labels)
ax.set_xlabel("next character")
ax.set_ylabel("current character")
ax.set_title("P(next | current) for the 20 most common characters")
plt.show()

# %% [markdown]
# ## 6. A learned bigram model
#
# The same model as a neural network: an embedding table of shape (V, V) whose row for the current
# character *is* the vector of logits for the next one. Trained with cross-entropy and AdamW, it
# should approach the count model's loss, since the count table is the maximum-likelihood solution
# this network is searching for. This is the first training loop of the course; later ones add
# more, but keep its shape: sample a batch, compute the loss, step, and now and then evaluate.

# %%
class BigramLanguageModel(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.logits_table = nn.Embedding(vocab_size, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.logits_table(idx)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


@torch.no_grad()
def estimate_loss(model, splits, block_size=8, batch_size=32, iters=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.eval()
    out = {name: torch.tensor([model(*get_batch(d, block_size, batch_size, g))[1] for _ in range(iters)]).mean().item()
           for name, d in splits.items()}
    model.train()
    return out

# %%
torch.manual_seed(1337)
bigram = BigramLanguageModel(V)
print(f"parameters: {sum(p.numel() for p in bigram.parameters()):,}")  # 65 * 65
xb, yb = get_batch(train_data, 8, 32, torch.Generator().manual_seed(0))
_, loss = bigram(xb, yb)
print(f"loss before training: {loss.item():.2f} (random init; ln 65 = 4.17 would be a uniform guess)")

# %%
# NBVAL_IGNORE_OUTPUT
from tqdm.auto import tqdm

steps = by_profile(ci=300, cpu=5000, gpu=5000)
optimizer = torch.optim.AdamW(bigram.parameters(), lr=1e-2)
g = torch.Generator().manual_seed(1337)
train_losses = []
for step in tqdm(range(steps), desc="bigram"):
    xb, yb = get_batch(train_data, 8, 32, g)
    _, loss = bigram(xb, yb)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    train_losses.append(loss.item())
losses = estimate_loss(bigram, {"train": train_data, "val": val_data})
print(f"after {steps} steps: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
print(f"count bigram val loss {count_bigram_loss(val_data):.4f}")

# %%
fig, ax = plt.subplots(figsize=(7, 3.5))
window = max(1, len(train_losses) // 50)
smooth = torch.tensor(train_losses).unfold(0, window, window).mean(1)
ax.plot(range(0, window * len(smooth), window), smooth, label=f"training loss (mean of {window} steps)")
ax.axhline(count_bigram_loss(val_data), color="gray", linestyle="--", label="count bigram, validation")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats)")
ax.set_title("Learned bigram on TinyShakespeare")
ax.legend()
plt.show()

# %% [markdown]
# ## 7. Sampling
#
# To generate, start from a newline, turn the logits for the last character into probabilities,
# draw the next character, append it and repeat. The text has the right letter frequencies and
# word lengths, and no sense at all: one character of context is not enough. Attention, in the
# next chapter, lets the model look further back.

# %%
@torch.no_grad()
def sample(model, idx, max_new_tokens, generator=None):
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -1:])
        probs_next = F.softmax(logits[:, -1, :], dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs_next, 1, generator=generator)], dim=1)
    return idx

# %%
# NBVAL_IGNORE_OUTPUT
start = torch.tensor([[tok.stoi["\n"]]])
print(tok.decode(sample(bigram, start, 300, torch.Generator().manual_seed(42))[0].tolist()))

# %% [markdown]
# ## 8. Summary and exercises
#
# - `tinyshakespeare()` finds or downloads the text and checks its SHA-256.
# - `CharTokenizer` maps 65 characters to ids and back; unknown characters are an error.
# - `train_val_split` and `get_batch` give contiguous splits and random shifted windows.
# - A bigram model scores about 2.48 nats per character on validation, counted or learned: the
#   baseline for every model that follows.
#
# **Exercises** (solutions below, collapsed in JupyterLab: click the margin to open them)
# 1. Drop the +1 smoothing. What happens to the validation loss, and why?
# 2. Build a *trigram* count model (next character from the two before it). How much does the
#    validation loss improve, and how many cells does the table have?
# 3. Train the learned bigram with lr 1e-3 instead of 1e-2. How many steps until it reaches 2.5?
# 4. Sample with temperature: divide the logits by T before the softmax and compare T = 0.5 and 2.

# %% [markdown]
# ### Solutions

# %% jupyter={"source_hidden": true}
# Exercise 1: without smoothing, any pair unseen in training has probability 0, so one unseen pair
# in validation makes the loss infinite.
raw = counts / counts.sum(dim=1, keepdim=True)
unseen = (counts[val_data[:-1], val_data[1:]] == 0).sum().item()
print("validation pairs never seen in training:", unseen)
print("val loss without smoothing:", -raw[val_data[:-1], val_data[1:]].log().mean().item())

# %% jupyter={"source_hidden": true}
# Exercise 2: a (V, V, V) table of counts.
tri = torch.zeros((V, V, V), dtype=torch.float64)
tri.index_put_((train_data[:-2], train_data[1:-1], train_data[2:]), torch.ones(len(train_data) - 2, dtype=torch.float64),
               accumulate=True)
tri_probs = (tri + 1) / (tri + 1).sum(dim=2, keepdim=True)
tri_val = -tri_probs[val_data[:-2], val_data[1:-1], val_data[2:]].log().mean().item()
print(f"trigram table cells: {V**3:,}; val loss {tri_val:.4f} vs bigram {count_bigram_loss(val_data):.4f}")

# %% jupyter={"source_hidden": true}
# NBVAL_IGNORE_OUTPUT
# Exercise 3: a smaller learning rate needs many more steps.
torch.manual_seed(1337)
slow = BigramLanguageModel(V)
opt = torch.optim.AdamW(slow.parameters(), lr=1e-3)
g = torch.Generator().manual_seed(1337)
for step in range(by_profile(ci=200, cpu=20000, gpu=20000)):
    _, loss = slow(*get_batch(train_data, 8, 32, g))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if (step + 1) % 500 == 0 and estimate_loss(slow, {"val": val_data}, iters=20)["val"] < 2.5:
        print(f"lr 1e-3 reaches val loss 2.5 after {step + 1} steps")
        break
else:
    print(f"lr 1e-3 has not reached 2.5 after {step + 1} steps")

# %% jupyter={"source_hidden": true}
# NBVAL_IGNORE_OUTPUT
# Exercise 4: low temperature repeats the likeliest pairs, high temperature approaches uniform noise.
@torch.no_grad()
def sample_with_temperature(model, idx, max_new_tokens, temperature, generator=None):
    for _ in range(max_new_tokens):
        logits, _ = model(idx[:, -1:])
        idx = torch.cat([idx, torch.multinomial(F.softmax(logits[:, -1] / temperature, -1), 1, generator=generator)], 1)
    return idx


for T in (0.5, 2.0):
    out = sample_with_temperature(bigram, start, 120, T, torch.Generator().manual_seed(0))
    print(f"T={T}:", repr(tok.decode(out[0].tolist())))
