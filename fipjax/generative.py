"""The generator of brain-inspired replay (van de Ven, Siegelmann & Tolias, 2020): a VAE over a network's hidden
representation with a class-conditional Gaussian-mixture prior (one learnable diagonal Gaussian per class).

Training maximises the ELBO with the label known, so the KL term is to the input's own class mode:
``loss = ½‖h − dec(z)‖² + KL(q(z|h) ‖ N(μ_y, diag σ_y²))``, z drawn by reparameterisation (the reconstruction term is
the paper's for hidden features: a unit-variance Gaussian log-likelihood, up to a constant). Sampling picks a class
uniformly, draws z from its mode and decodes it. The generator is a small MLP on its own; it is not folded into
the classifier (the paper's "replay through feedback"), and it has no context gates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fipjax import config as cf

PyTree = Any


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
  """The VAE of brain-inspired replay and how it is fit."""
  latent: int = cf.option(100, "latent dimensions (the paper's 100)", cf.positive)
  hidden: int = cf.option(256, "hidden units of the generator's encoder and decoder MLPs", cf.positive)
  steps: int = cf.option(2000, "Adam steps fitting the generator on an old task's features", cf.positive)
  lr: float = cf.option(1e-3, "the generator's Adam learning rate", cf.positive)
  batch_size: int = cf.option(128, "the generator's batch size", cf.positive)


def _dense(key, n_in: int, n_out: int) -> dict:
  return {"kernel": jax.random.normal(key, (n_in, n_out)) * np.sqrt(1.0 / n_in), "bias": jnp.zeros(n_out)}


def _apply(layer: dict, x: jax.Array) -> jax.Array:
  return x @ layer["kernel"] + layer["bias"]


def init(key: jax.Array, feature_dim: int, num_classes: int, cfg: GeneratorConfig) -> PyTree:
  """Generator parameters: encoder ``h → (μ, log σ²)``, decoder ``z → h``, and the prior's modes ``[C, Z]``."""
  k = jax.random.split(key, 6)
  z, hid = cfg.latent, cfg.hidden
  return {"enc": {"hidden": _dense(k[0], feature_dim, hid), "mean": _dense(k[1], hid, z),
                  "logvar": _dense(k[2], hid, z)},
          "dec": {"hidden": _dense(k[3], z, hid), "out": _dense(k[4], hid, feature_dim)},
          "prior": {"mean": jax.random.normal(k[5], (num_classes, z)), "logvar": jnp.zeros((num_classes, z))}}


def encode(params: PyTree, h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``q(z|h)``: (mean, log-variance), each ``[N, Z]``."""
  e = jax.nn.relu(_apply(params["enc"]["hidden"], h))
  return _apply(params["enc"]["mean"], e), _apply(params["enc"]["logvar"], e)


def decode(params: PyTree, z: jax.Array) -> jax.Array:
  """``[N, Z] → [N, H]``: the decoder's mean."""
  return _apply(params["dec"]["out"], jax.nn.relu(_apply(params["dec"]["hidden"], z)))


def _draw(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """``z ∼ N(mean, diag exp(logvar))`` by reparameterisation."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)


def elbo_terms(params: PyTree, h: jax.Array, labels: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(reconstruction ``½‖h − ĥ‖²``, KL to the label's mode), each ``[N]``; their sum is the negative ELBO + const."""
  mean, logvar = encode(params, h)
  z = _draw(key, mean, logvar)
  recon = 0.5 * jnp.sum((h - decode(params, z)) ** 2, -1)
  pm, plv = params["prior"]["mean"][labels], params["prior"]["logvar"][labels]
  kl = 0.5 * jnp.sum(plv - logvar + (jnp.exp(logvar) + (mean - pm) ** 2) / jnp.exp(plv) - 1.0, -1)
  return recon, kl


def loss(params: PyTree, h: jax.Array, labels: jax.Array, key: jax.Array) -> jax.Array:
  recon, kl = elbo_terms(params, h, labels, key)
  return jnp.mean(recon + kl)


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, cfg: GeneratorConfig, seed: int
        ) -> tuple[PyTree, list[float]]:
  """A generator fit to ``features [N, H]`` with ``labels [N]`` (in ``0..num_classes−1``) by Adam;
  returns (parameters, the loss every 100 steps)."""
  key_init, key_train = jax.random.split(jax.random.PRNGKey(seed))
  params = init(key_init, features.shape[1], num_classes, cfg)
  opt = optax.adam(cfg.lr)
  x, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels, jnp.int32)
  n, bs = x.shape[0], min(cfg.batch_size, x.shape[0])

  @jax.jit
  def run(p, x, y):
    def step(carry, i):
      p, s = carry
      k_idx, k_z = jax.random.split(jax.random.fold_in(key_train, i))
      idx = jax.random.randint(k_idx, (bs,), 0, n)          # mini-batches drawn with replacement
      value, grads = jax.value_and_grad(loss)(p, x[idx], y[idx], k_z)
      updates, s = opt.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), value

    (p, _), values = jax.lax.scan(step, (p, opt.init(p)), jnp.arange(cfg.steps))
    return p, values

  params, values = run(params, x, y)
  values = np.asarray(values)
  curve = [float(values[i:i + 100].mean()) for i in range(0, len(values), 100)]
  return params, curve


def sample(params: PyTree, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """``n`` features ``[n, H]`` and their classes ``[n]``: a class drawn uniformly, then ``z`` from its mode."""
  k_y, k_z = jax.random.split(key)
  num_classes = params["prior"]["mean"].shape[0]
  y = jax.random.randint(k_y, (n,), 0, num_classes)
  return decode(params, _draw(k_z, params["prior"]["mean"][y], params["prior"]["logvar"][y])), y
