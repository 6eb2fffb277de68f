"""scratchlm.optim: equal to torch.optim over 20 steps (with param groups), step(closure), state_dict, bad input."""

import pytest
import torch
import torch.nn as nn

from scratchlm.optim import SGD, Adam, AdamW, RMSprop, ScratchOptimizer


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.Flatten(), nn.Linear(24, 16), nn.LayerNorm(16), nn.GELU(),
                         nn.Linear(16, 11))


def groups(model: nn.Module, lr: float, weight_decay: float | None = None) -> list[dict]:
    """Matrices at lr (with weight_decay, if given) | the rest at lr / 3 (with no decay)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    out = [{"params": matrices}, {"params": rest, "lr": lr / 3}]
    if weight_decay is not None:
        out[0]["weight_decay"], out[1]["weight_decay"] = weight_decay, 0.0
    return out


def train_20_steps(make_optimizer) -> torch.Tensor:
    model = tiny_model()
    optimizer = make_optimizer(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randint(0, 11, (16, 3), generator=g)
        y = torch.randint(0, 11, (16,), generator=g)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


CASES = {
    "sgd": (lambda m: SGD(groups(m, 0.5), lr=0.5), lambda m: torch.optim.SGD(groups(m, 0.5), lr=0.5)),
    "momentum": (lambda m: SGD(groups(m, 0.1), lr=0.1, momentum=0.9),
                 lambda m: torch.optim.SGD(groups(m, 0.1), lr=0.1, momentum=0.9)),
    "nesterov": (lambda m: SGD(groups(m, 0.1), lr=0.1, momentum=0.8, nesterov=True),
                 lambda m: torch.optim.SGD(groups(m, 0.1), lr=0.1, momentum=0.8, nesterov=True)),
    "rmsprop": (lambda m: RMSprop(groups(m, 3e-3), lr=3e-3, alpha=0.9, eps=1e-6),
                lambda m: torch.optim.RMSprop(groups(m, 3e-3), lr=3e-3, alpha=0.9, eps=1e-6)),
    "adam": (lambda m: Adam(groups(m, 1e-2), lr=1e-2, betas=(0.8, 0.99), eps=1e-7),
             lambda m: torch.optim.Adam(groups(m, 1e-2), lr=1e-2, betas=(0.8, 0.99), eps=1e-7)),
    "adamw": (lambda m: AdamW(groups(m, 1e-2, weight_decay=0.5), lr=1e-2),
              lambda m: torch.optim.AdamW(groups(m, 1e-2, weight_decay=0.5), lr=1e-2)),
    "adamw_default_decay": (lambda m: AdamW(m.parameters(), lr=1e-2),
                            lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2)),
}


@pytest.mark.parametrize("name", CASES)
def test_equal_to_torch_optim_over_20_steps(name):
    ours, theirs = CASES[name]
    start = torch.cat([p.detach().flatten() for p in tiny_model().parameters()])
    mine, reference = train_20_steps(ours), train_20_steps(theirs)
    assert (reference - start).abs().max() > 1e-2  # the reference really moved the weights
    torch.testing.assert_close(mine, reference, rtol=0, atol=1e-6)


def test_the_second_group_uses_its_own_lr():
    # a group with its own lr moves differently from the same optimizer with one lr for all
    one_lr = train_20_steps(lambda m: Adam(m.parameters(), lr=1e-2))
    two_lrs = train_20_steps(lambda m: Adam(groups(m, 1e-2), lr=1e-2))
    assert (one_lr - two_lrs).abs().max() > 1e-3


def test_adamw_without_decay_is_adam():
    adam = train_20_steps(lambda m: Adam(m.parameters(), lr=1e-2))
    adamw = train_20_steps(lambda m: AdamW(m.parameters(), lr=1e-2, weight_decay=0.0))
    torch.testing.assert_close(adam, adamw, rtol=0, atol=0)


def test_step_calls_the_closure_and_returns_its_loss():
    w = torch.tensor([2.0], requires_grad=True)
    optimizer, reference = SGD([w], lr=0.25), torch.optim.SGD([w2 := w.detach().clone().requires_grad_()], lr=0.25)
    calls = []

    def closure(param, opt):
        def f():
            opt.zero_grad()
            loss = (param**2).sum()
            loss.backward()
            calls.append(1)
            return loss
        return f

    loss = optimizer.step(closure(w, optimizer))
    assert loss.item() == 4.0 and len(calls) == 1
    reference.step(closure(w2, reference))
    assert w.item() == w2.item() == 1.0  # 2 - 0.25 * 4
    assert optimizer.step() is None


def test_parameters_without_gradient_are_left_alone():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    optimizer = AdamW([a, b], lr=0.1, weight_decay=0.5)
    a.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in optimizer.state
    assert (a.detach() < 1).all()


def test_state_dict_resumes_exactly():
    def run(split: bool) -> torch.Tensor:
        model = tiny_model()
        optimizer = Adam(model.parameters(), lr=1e-2)
        x = torch.randint(0, 11, (16, 3), generator=torch.Generator().manual_seed(2))
        for step in range(10):
            if split and step == 5:  # save and rebuild the optimizer half way
                saved = optimizer.state_dict()
                optimizer = Adam(model.parameters(), lr=1e-2)
                optimizer.load_state_dict(saved)
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(run(True), run(False), rtol=0, atol=0)


def test_a_new_rule_needs_only_update():
    class SignSGD(ScratchOptimizer):
        checks = SGD.checks

        def __init__(self, params, lr):
            super().__init__(params, dict(lr=lr))

        def update(self, p, grad, state, group):
            p.add_(grad.sign(), alpha=-group["lr"])

    w = torch.tensor([1.0, -1.0], requires_grad=True)
    optimizer = SignSGD([w], lr=0.1)
    w.grad = torch.tensor([3.0, -0.01])
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -0.9]))
    with pytest.raises(ValueError, match="lr"):
        SignSGD([w], lr=0.0)


P = [torch.zeros(2, requires_grad=True)]


@pytest.mark.parametrize("make, argument", [
    (lambda: SGD(P, lr=0.0), "lr"),
    (lambda: SGD(P, lr=-0.1), "lr"),
    (lambda: RMSprop(P, lr=0), "lr"),
    (lambda: Adam(P, lr=-1e-3), "lr"),
    (lambda: AdamW(P, lr=0.0), "lr"),
    (lambda: SGD(P, lr="0.1"), "lr"),
    (lambda: SGD(P, lr=0.1, momentum=-0.5), "momentum"),
    (lambda: SGD(P, lr=0.1, momentum=1.0), "momentum"),
    (lambda: SGD(P, lr=0.1, nesterov=True), "nesterov"),
    (lambda: SGD(P, lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
    (lambda: RMSprop(P, lr=1e-3, alpha=1.0), "alpha"),
    (lambda: RMSprop(P, lr=1e-3, alpha=-0.1), "alpha"),
    (lambda: RMSprop(P, lr=1e-3, eps=-1e-8), "eps"),
    (lambda: Adam(P, lr=1e-3, betas=(1.0, 0.999)), r"betas\[0\]"),
    (lambda: Adam(P, lr=1e-3, betas=(0.9, 1.0)), r"betas\[1\]"),
    (lambda: Adam(P, lr=1e-3, betas=(-0.1, 0.999)), r"betas\[0\]"),
    (lambda: AdamW(P, lr=1e-3, betas=(0.9, 1.5)), r"betas\[1\]"),
    (lambda: Adam(P, lr=1e-3, betas=0.9), "betas must be a pair"),
    (lambda: Adam(P, lr=1e-3, eps=-1.0), "eps"),
    (lambda: AdamW(P, lr=1e-3, eps=-1.0), "eps"),
    (lambda: AdamW(P, lr=1e-3, weight_decay=-0.01), "weight_decay"),
    (lambda: Adam([{"params": P, "lr": 0.0}], lr=1e-3), "param group 0: lr"),
    (lambda: AdamW([{"params": P}, {"params": [torch.zeros(1, requires_grad=True)], "weight_decay": -1}], lr=1e-3),
     "param group 1: weight_decay"),
    (lambda: Adam([{"params": P, "weight_decay": 0.1}], lr=1e-3), "use AdamW"),
    (lambda: SGD([{"params": P, "weight_decay": 0.1}], lr=0.1), "use AdamW"),
])
def test_bad_arguments_are_a_clear_value_error(make, argument):
    with pytest.raises(ValueError, match=argument) as error:
        make()
    message = str(error.value)
    assert message.startswith(("SGD", "RMSprop", "Adam"))  # names the optimizer (AdamW starts with Adam)
    assert "got" in message or "use AdamW" in message  # says what it was given, or what to use instead


def test_lr_is_required():
    for cls in (SGD, RMSprop, Adam, AdamW):
        with pytest.raises(TypeError, match="lr"):
            cls(P)


def test_a_bad_group_added_later_is_refused_and_not_kept():
    optimizer = AdamW(P, lr=1e-3)
    extra = torch.zeros(1, requires_grad=True)
    with pytest.raises(ValueError, match="param group 1: betas"):
        optimizer.add_param_group({"params": [extra], "betas": (0.9, 2.0)})
    assert len(optimizer.param_groups) == 1
    optimizer.add_param_group({"params": [extra], "lr": 1e-2, "weight_decay": 0.0})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]
