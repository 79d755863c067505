"""Sampling: greedy, Meta's top-p rule, top-k, temperature, seeded reproducibility, checked by many draws
from a known distribution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama.sampling import GREEDY, SamplingConfig, argmax, candidates, sample

# A known distribution over 8 ids, deliberately not in id order.
PROBS = np.array([0.06, 0.40, 0.02, 0.15, 0.25, 0.04, 0.05, 0.03])
LOGITS = np.log(PROBS).astype(np.float32)
DRAWS = 20000


def draw(cfg: SamplingConfig, seed: int = 0, n: int = DRAWS) -> np.ndarray:
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
    return np.asarray(jax.jit(sample, static_argnames="cfg")(logits, jax.random.key(seed), cfg=cfg))


def meta_top_p_keep(probs: np.ndarray, p: float) -> set[int]:
    """Meta `sample_top_p` in numpy: sort descending, drop tokens whose exclusive prefix mass exceeds p."""
    order = np.argsort(-probs, kind="stable")
    s = probs[order]
    return {int(i) for i, excl in zip(order, np.cumsum(s) - s) if excl <= p}


def check_frequencies(ids: np.ndarray, allowed: set[int], probs: np.ndarray):
    """Only allowed ids, each at its renormalised probability within 5 binomial standard deviations."""
    assert set(np.unique(ids).tolist()) <= allowed, (sorted(set(ids.tolist()) - allowed), allowed)
    mass = sum(probs[i] for i in allowed)
    for i in allowed:
        expect = probs[i] / mass
        sd = np.sqrt(expect * (1 - expect) / ids.size)
        assert abs(np.mean(ids == i) - expect) <= 5 * sd + 1e-12, (i, np.mean(ids == i), expect)


def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (16, 300))
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), GREEDY), np.argmax(logits, -1))


def test_argmax_is_jnp_argmax_ties_nans_and_infinities_included():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((6, 32000)).astype(np.float32)
    rows[1, [7, 9000, 31999]] = 50.0  # ties: the first maximum wins
    rows[2, [5, 17]] = np.nan  # NaN: the first NaN, as jnp.argmax
    rows[3] = -np.inf
    rows[4, 123] = np.inf
    rows[5] = 1.0  # all equal: index 0
    for x in (rows, rows.astype(jnp.bfloat16), rows[:, :5]):
        np.testing.assert_array_equal(jax.jit(argmax)(x), jnp.argmax(x, axis=-1))
    assert argmax(rows).dtype == jnp.int32


def test_defaults_are_metas():
    assert SamplingConfig() == SamplingConfig(temperature=0.6, top_p=0.9, top_k=0)


@pytest.mark.parametrize("p", [0.3, 0.6, 0.75, 0.9])
def test_top_p_keeps_metas_set_and_samples_it_faithfully(p):
    allowed = meta_top_p_keep(PROBS, p)
    cfg = SamplingConfig(temperature=1.0, top_p=p)
    ids, filtered = candidates(jnp.asarray(LOGITS)[None], cfg)
    kept = {int(i) for i, f in zip(ids[0], filtered[0]) if np.isfinite(f)}
    assert kept == allowed
    check_frequencies(draw(cfg), allowed, PROBS)


def test_top_p_always_keeps_the_top_token():
    ids = draw(SamplingConfig(temperature=1.0, top_p=1e-6), n=2000)
    assert set(ids.tolist()) == {1}


@pytest.mark.parametrize("k", [1, 3, 5])
def test_top_k_never_leaves_the_k_most_likely(k):
    allowed = {int(i) for i in np.argsort(-PROBS)[:k]}
    check_frequencies(draw(SamplingConfig(temperature=1.0, top_p=1.0, top_k=k)), allowed, PROBS)


def test_top_k_then_top_p():
    # top-3 = {1: .40, 4: .25, 3: .15}; renormalised .5, .3125, .1875; top-p 0.6 keeps {1, 4}.
    check_frequencies(draw(SamplingConfig(temperature=1.0, top_p=0.6, top_k=3)), {1, 4}, PROBS)


def test_temperature_reshapes_the_distribution():
    t = 0.6
    tempered = np.exp(LOGITS / t) / np.exp(LOGITS / t).sum()
    check_frequencies(draw(SamplingConfig(temperature=t, top_p=1.0)), set(range(8)), tempered)


def test_seeded_draws_are_reproducible():
    cfg = SamplingConfig()
    a, b, c = draw(cfg, seed=7, n=500), draw(cfg, seed=7, n=500), draw(cfg, seed=8, n=500)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_bad_settings_are_rejected():
    for bad in (dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
