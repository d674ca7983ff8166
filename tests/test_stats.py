"""steer.stats: Wilson interval, exact McNemar, exact sign-flip test, against values computed by hand."""

import math

import pytest

from steer.stats import mcnemar_exact, sign_flip_test, wilson_ci


def test_wilson_known_values_and_edges():
    lo, hi = wilson_ci(21, 40)  # the MoTE baseline: 21 of 40 French answers
    assert lo == pytest.approx(0.37497, abs=1e-4) and hi == pytest.approx(0.67065, abs=1e-4)
    assert wilson_ci(0, 10)[0] == 0.0 and wilson_ci(10, 10)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_ci(0, 0))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_ci(5, 3)


def test_mcnemar_exact_by_hand():
    # 3 gained, 0 lost of 40: p = 2 * P[Bin(3, .5) <= 0] = 2/8
    a = [False] * 3 + [True] * 10 + [False] * 27
    b = [True] * 3 + [True] * 10 + [False] * 27
    r = mcnemar_exact(a, b)
    assert (r.gained, r.lost, r.discordant, r.n) == (3, 0, 3, 40)
    assert r.p_value == 0.25 and r.change == pytest.approx(3 / 40)
    # 1 gained, 1 lost: p = 1; no discordant pair: p = 1, change 0
    assert mcnemar_exact([1, 0, 1], [0, 1, 1]).p_value == 1.0
    assert mcnemar_exact([1, 0], [1, 0]).p_value == 1.0 and mcnemar_exact([1, 0], [1, 0]).change == 0.0
    # 10 lost, 0 gained: p = 2 / 1024; 8 vs 2: p = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact([1] * 10, [0] * 10).p_value == pytest.approx(2 / 1024)
    assert mcnemar_exact([1] * 8 + [0] * 2, [0] * 8 + [1] * 2).p_value == pytest.approx(2 * 56 / 1024)


def test_mcnemar_rejects_unpaired_or_non_binary():
    with pytest.raises(ValueError, match="same items"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="binary"):
        mcnemar_exact([0.5, 1], [1, 1])


def test_sign_flip_exact_and_monte_carlo_agree():
    d = [1, 1, 1, 0, 0]  # 3 non-zero, all positive: 2 of 8 patterns reach |sum| = 3
    assert sign_flip_test(d) == 0.25
    assert sign_flip_test([0, 0]) == 1.0
    d = [1.0] * 12 + [-0.25] * 6 + [0.5] * 3  # 21 non-zero: Monte Carlo above exact_max
    exact = sign_flip_test(d, exact_max=2**21)
    mc = sign_flip_test(d, exact_max=2**10, n_mc=100_000)
    assert mc == pytest.approx(exact, abs=0.003) and exact < 0.01
