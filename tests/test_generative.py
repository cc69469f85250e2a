"""The generator of brain-inspired replay on a toy Gaussian mixture."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from fipjax import generative


def _mixture(n=600, dim=16, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  means = 3.0 * rng.normal(size=(classes, dim))
  y = rng.integers(0, classes, n)
  return (means[y] + rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32), means


def test_elbo_falls_and_samples_are_classified_as_their_class():
  x, y, means = _mixture()
  cfg = generative.GeneratorConfig(latent=8, hidden=64, steps=1500, lr=3e-3, batch_size=64)
  params, curve = generative.fit(x, y, 3, cfg, seed=0)
  # It falls to near the noise floor: the reconstruction of unit-variance noise costs at least ½·dim = 8.
  assert curve[-1] < 0.3 * curve[0] and curve[-1] < 1.25 * 8, curve
  # The "stage-1 head": the linear classifier of the data's class means.
  head = lambda h: h @ means.T - 0.5 * np.sum(means**2, 1)
  h, labels = generative.sample(params, jax.random.PRNGKey(1), 600)
  chex.assert_shape(h, (600, 16))
  agreement = float(np.mean(np.argmax(head(np.asarray(h)), -1) == np.asarray(labels)))
  assert agreement > 0.9, agreement                              # chance: 1/3
  assert set(np.asarray(labels).tolist()) == {0, 1, 2}
  # Untrained, the same generator's samples are no better than chance would allow for a random decoder.
  fresh = generative.init(jax.random.PRNGKey(0), 16, 3, cfg)
  hf, lf = generative.sample(fresh, jax.random.PRNGKey(1), 600)
  assert float(np.mean(np.argmax(head(np.asarray(hf)), -1) == np.asarray(lf))) < 0.6


def test_kl_term_is_the_closed_form_and_zero_at_the_prior():
  cfg = generative.GeneratorConfig(latent=4, hidden=8)
  params = generative.init(jax.random.PRNGKey(0), 5, 2, cfg)
  h, y = jnp.ones((3, 5)), jnp.array([0, 1, 1])
  mean, logvar = generative.encode(params, h)
  _, kl = generative.elbo_terms(params, h, y, jax.random.PRNGKey(2))
  pm, plv = params["prior"]["mean"][y], params["prior"]["logvar"][y]
  var, pvar = np.exp(logvar), np.exp(plv)
  expected = 0.5 * np.sum(np.log(pvar / var) + (var + (mean - pm) ** 2) / pvar - 1, -1)
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  # A posterior equal to the class's mode has KL 0.
  at_prior = jax.tree.map(jnp.zeros_like, params)
  at_prior["prior"]["mean"] = jnp.zeros((2, 4))
  _, kl0 = generative.elbo_terms(at_prior, h, y, jax.random.PRNGKey(2))
  np.testing.assert_allclose(kl0, 0.0, atol=1e-6)
