"""scratchlm.align (notebooks/06_alignment/08_align.ipynb): summarize's means and ranges, tied_groups' ranking only
where ranges do not overlap (chains of overlaps tie), the training clock leaving paused time out, run_method's bad
input, and one cheap row end to end at the ci profile."""

import time

import pytest

from scratchlm.align import (
    METHODS,
    TrainingClock,
    format_table,
    method_steps,
    run_method,
    summarize,
    tied_groups,
)


def rows_of(results: dict[str, list[float]]) -> list[dict]:
    return [{"method": m, "seed": s, "accuracy_before": 0.5, "accuracy_after": a, "seconds": 1.0 + s}
            for m, accs in results.items() for s, a in enumerate(accs)]


def test_summarize_gives_mean_min_max_per_method_in_first_seen_order():
    summary = summarize(rows_of({"b": [0.2, 0.4, 0.9], "a": [0.5, 0.5, 0.8]}))
    assert [s["method"] for s in summary] == ["b", "a"]
    b = summary[0]
    assert b["seeds"] == [0, 1, 2] and b["accuracy_after"] == pytest.approx(0.5)
    assert (b["min"], b["max"], b["seconds"]) == (0.2, 0.9, pytest.approx(2.0))
    assert "min-max" in format_table(summary) and "seed" in format_table(rows_of({"a": [0.1]}))


def test_tied_groups_rank_only_where_ranges_do_not_overlap():
    # x overlaps y, y overlaps z, x does not overlap z: a chain, so all three tie; w is below all of them
    summary = summarize(rows_of({"w": [0.1, 0.2], "x": [0.90, 0.99], "y": [0.80, 0.91], "z": [0.70, 0.81]}))
    assert tied_groups(summary) == [["x", "y", "z"], ["w"]]
    apart = summarize(rows_of({"low": [0.1, 0.3], "high": [0.5, 0.6], "mid": [0.35, 0.45]}))
    assert tied_groups(apart) == [["high"], ["mid"], ["low"]]
    touching = summarize(rows_of({"a": [0.5, 0.6], "b": [0.4, 0.5]}))  # equal endpoints overlap: a tie
    assert tied_groups(touching) == [["a", "b"]]


def test_training_clock_leaves_paused_time_out():
    clock = TrainingClock()
    with clock.paused():
        end = time.process_time() + 0.05
        while time.process_time() < end:  # burn CPU that must not count
            pass
    assert clock.seconds() < 0.04


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="reinforce"), "unknown method 'reinforce'"),
    (dict(method="grpo", lora_rank=0), "lora_rank must be a positive integer"),
])
def test_run_method_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_method(base=None, cfg=None, split={}, **kwargs)


def test_every_method_has_steps_at_every_profile():
    assert all(method_steps(m, p) > 0 for m in METHODS for p in ("ci", "cpu", "gpu"))


def test_ipo_row_end_to_end_at_ci(tmp_path, monkeypatch):
    """One cheap row from a small base: the row's keys, the curve from the start to the final model, and a finite
    number of CPU seconds that excludes scoring."""
    from scratchlm import arith

    monkeypatch.setattr(arith, "base_folder", lambda profile=None, seed=0: tmp_path / f"base-{profile}-seed{seed}")
    monkeypatch.setattr(arith, "task_config", lambda profile=None: arith.TaskConfig(sft_steps=50))
    base, cfg = arith.base_model(0, "ci")
    split = arith.addition_split()
    row = run_method("ipo", base, cfg, split, seed=0, profile="ci", curve_points=2, accuracy_before=0.25)
    assert {"method", "seed", "accuracy_before", "accuracy_after", "seconds", "curve"} <= set(row)
    assert row["accuracy_before"] == 0.25 and 0 <= row["accuracy_after"] <= 1 and row["seconds"] > 0
    assert len(row["curve"]) == 3 and row["curve"][0][0] == 0.0 and row["curve"][-1][0] == row["seconds"]
    assert [s for s, _ in row["curve"]] == sorted(s for s, _ in row["curve"])
