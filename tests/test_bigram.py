"""Chapter 01's claim: a learned bigram (an embedding table of logits) reaches the count model's validation loss.

Both are scored on every pair of the whole validation split. The learned table here is fitted by full-batch
gradient descent on the training pair counts (the same cross-entropy the notebook's mini-batch loop minimises),
so the test is independent of the notebook's training loop and takes a second.
"""

import torch
import torch.nn.functional as F

from scratchlm.data import CharTokenizer, tinyshakespeare, train_val_split


def test_learned_bigram_reaches_the_count_model():
    text = tinyshakespeare()
    tok = CharTokenizer.from_text(text)
    train, val = train_val_split(torch.tensor(tok.encode(text)))
    V = tok.vocab_size
    counts = torch.zeros(V, V, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64), accumulate=True)
    smoothed = (counts + 1) / (counts + 1).sum(dim=1, keepdim=True)
    counted_val = -smoothed[val[:-1], val[1:]].log().mean().item()

    logits = torch.zeros(V, V, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([logits], lr=0.1)
    for _ in range(300):
        loss = -(counts * F.log_softmax(logits, dim=1)).sum() / counts.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        learned_val = F.cross_entropy(logits[val[:-1]], val[1:]).item()

    assert 2.4 < counted_val < 2.6  # far below a uniform guess, ln 65 = 4.17
    assert abs(learned_val - counted_val) < 0.01, (learned_val, counted_val)
