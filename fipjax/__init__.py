"""fipjax: continual learning along functionally invariant paths (Raghavan & Thomson, arXiv 2205.00334)."""

import importlib.metadata

from fipjax import (config, continual, data, dpo, gem, generative, geometry, linalg, lora, models, paths, report, runs,
                    sequences, si, streams, tree)
from fipjax.geometry import (DISTANCES, Metric, bhattacharyya, euclidean, fisher_rao, functional_distance,
                             kl_divergence, matrix_metric, path_length, pullback_metric, quadratic_distance,
                             squared_euclidean)
from fipjax.linalg import cg, lanczos_eigh
from fipjax.paths import PathRecord, fip_penalty, geodesic_step, reference_outputs

__version__ = importlib.metadata.version("fipjax")
