"""The learning-rate schedule of minimm/training.py: warmup, then a cosine, or warmup-stable-decay."""
import math

import pytest

from minimm.training import learning_rate_at


def test_warmup_rises_linearly_to_the_peak():
    rates = [learning_rate_at(s, 1e-3, 1e-5, 10, 100) for s in range(10)]
    assert rates == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])


def test_cosine_falls_from_the_peak_to_min_lr():
    rates = [learning_rate_at(s, 1e-3, 1e-5, 10, 100) for s in range(10, 120)]
    assert rates[0] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(rates[:90], rates[1:90]))  # strictly falling until lr_decay_iters
    assert learning_rate_at(55, 1e-3, 1e-5, 10, 100) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # halfway
    assert rates[-1] == 1e-5 and learning_rate_at(100, 1e-3, 1e-5, 10, 100) == 1e-5


def test_warmdown_holds_the_peak_then_falls_linearly_to_min_lr():
    lr, low = 2e-3, 1e-4
    at = [learning_rate_at(s, lr, low, 50, 700, warmdown_frac=0.3) for s in range(720)]
    assert at[:50] == pytest.approx([lr * (s + 1) / 50 for s in range(50)])  # the same warmup
    assert at[50:490] == [lr] * 440  # the full rate until the last 30% (210 steps) of 700
    steps = [at[s] - at[s + 1] for s in range(490, 699)]
    assert steps == pytest.approx([(lr - low) / 210] * 209)  # then a straight line ...
    assert at[699] == pytest.approx(low + (lr - low) / 210) and at[700:] == [low] * 20  # ... that ends at min_lr
    # and it is never lower than the cosine at the same step: the same run, more of it at the full rate
    assert all(a >= learning_rate_at(s, lr, low, 50, 700) - 1e-12 for s, a in enumerate(at))


def test_a_warmdown_longer_than_the_run_starts_right_after_the_warmup():
    at = [learning_rate_at(s, 1.0, 0.0, 10, 100, warmdown_frac=1.0) for s in range(100)]
    assert at[9] == 1.0 and at[10] == pytest.approx(1.0) and at[55] == pytest.approx(0.5)
    assert not any(math.isnan(a) for a in at)
