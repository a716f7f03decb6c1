"""Model-perceived domains: K-means on gradient sketches, and each domain's statistics.

METHOD.md steps 3 and 4. Everything here works on the small (B × k) sketch matrix,
never on gradients, so it costs microseconds to milliseconds per step.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class DomainStats:
    """Statistics of the m domains found in one micro-batch (all float64, on CPU).

    sizes:       n_j ≥ 1, the number of samples in domain j              (m,)
    centroids:   z̄_j, the mean sketch of domain j (sketch of ḡ_j)         (m, k)
    sigma2:      σ²_j = (1/n_j) Σ_{i∈C_j} ‖z_i − z̄_j‖²                    (m,)
    losses:      L_j, the mean per-sample loss of domain j                 (m,)
    mean_sketch: z̄, the plain mean sketch of all samples (Σ_j n_j z̄_j / n) (k,)
    """

    sizes: torch.Tensor
    centroids: torch.Tensor
    sigma2: torch.Tensor
    losses: torch.Tensor
    mean_sketch: torch.Tensor

    @property
    def num_domains(self) -> int:
        return int(self.sizes.numel())


def domain_statistics(sketches: torch.Tensor, losses: torch.Tensor, assignments: torch.Tensor) -> DomainStats:
    """Statistics of domains 0..m-1 given each sample's domain (`assignments`, every id in 0..m-1 used)."""
    z = sketches.detach().to("cpu", torch.float64)
    ell = losses.detach().to("cpu", torch.float64)
    a = assignments.to("cpu", torch.long)
    m = int(a.max().item()) + 1
    sizes = torch.bincount(a, minlength=m)
    if bool((sizes == 0).any()):
        raise ValueError("domain_statistics needs every domain id in 0..m-1 to have at least one sample")
    centroids = torch.zeros(m, z.shape[1], dtype=torch.float64).index_add_(0, a, z) / sizes[:, None]
    sq_dev = ((z - centroids[a]) ** 2).sum(dim=1)
    sigma2 = torch.zeros(m, dtype=torch.float64).index_add_(0, a, sq_dev) / sizes
    dom_losses = torch.zeros(m, dtype=torch.float64).index_add_(0, a, ell) / sizes
    return DomainStats(
        sizes=sizes, centroids=centroids, sigma2=sigma2, losses=dom_losses, mean_sketch=z.mean(dim=0)
    )


def _first_appearance_order(labels: np.ndarray) -> np.ndarray:
    """Relabel clusters 0..m'-1 in order of first appearance: the same partition then has the same ids
    whatever numbering K-means happened to use, and empty clusters disappear."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    remap = {int(old): new for new, old in enumerate(order)}
    return np.array([remap[int(x)] for x in labels], dtype=np.int64)


class DomainFinder:
    """Clusters sketches into at most `num_domains` model-perceived domains.

    With `refit_steps == 1` (default) each micro-batch is clustered afresh. With `refit_steps = N > 1`
    the centroids are kept ("online domains") and new batches are assigned to the nearest one; they are
    refitted on the first micro-batch of every N-th optimizer step.
    """

    def __init__(self, num_domains: int, seed: int = 0, n_init: int = 3, max_iter: int = 100, refit_steps: int = 1):
        if num_domains < 1:
            raise ValueError(f"num_domains={num_domains} must be >= 1")
        self.num_domains = int(num_domains)
        self.seed = int(seed)
        self.n_init = int(n_init)
        self.max_iter = int(max_iter)
        self.refit_steps = int(refit_steps)
        self.centroids: np.ndarray | None = None  # online domains only
        self.last_fit_step: int | None = None
        self._warned_small_batch = False

    def _kmeans(self, z: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.cluster import KMeans

        if m == 1:
            return np.zeros(len(z), dtype=np.int64), z.mean(axis=0, keepdims=True)
        km = KMeans(n_clusters=m, n_init=self.n_init, max_iter=self.max_iter, random_state=seed)
        with warnings.catch_warnings():
            # Near-duplicate sketches trigger sklearn's ConvergenceWarning; the result is still a partition.
            warnings.simplefilter("ignore")
            labels = km.fit_predict(z)
        return labels.astype(np.int64), km.cluster_centers_

    def assign(self, sketches: torch.Tensor, step: int = 0, micro: int = 0) -> torch.Tensor:
        """Domain id (0..m'-1, m' ≤ num_domains, each used) of each sketch row.

        `step` is the optimizer step (online domains refit every `refit_steps` of them) and `micro` the
        micro-batch within it; K-means' seed is derived from both, so clustering is reproducible, also
        after a resume.
        """
        z = sketches.detach().to("cpu", torch.float64).numpy()
        n = len(z)
        if n == 0:
            return torch.zeros(0, dtype=torch.long)
        distinct = len(np.unique(z, axis=0))
        m = min(self.num_domains, distinct)
        if m < self.num_domains and not self._warned_small_batch:
            logger.warning(
                "DoGraph: a batch holds %d distinct gradient sketches, fewer than num_domains=%d: using %d domains "
                "for such batches (raise the batch size or lower num_domains to avoid this). Warned once.",
                distinct, self.num_domains, m,
            )
            self._warned_small_batch = True
        online = self.refit_steps > 1
        refit = (
            not online
            or self.centroids is None
            or self.last_fit_step is None
            or step - self.last_fit_step >= self.refit_steps
        )
        # Cluster the rows in a canonical (lexicographic) order: the partition, its numbering and so the
        # weights then do not depend on how the batch was ordered or split across processes.
        order = np.lexsort(z.T[::-1])
        zs = z[order]
        if refit:
            labels_sorted, centers = self._kmeans(zs, m, self.seed + step * 1024 + micro)
            if online:
                self.centroids, self.last_fit_step = centers, step
        else:
            d2 = ((zs[:, None, :] - self.centroids[None, :, :]) ** 2).sum(-1)
            labels_sorted = d2.argmin(axis=1)
        labels = np.empty(n, dtype=np.int64)
        labels[order] = _first_appearance_order(labels_sorted)
        return torch.from_numpy(labels)

    def state_dict(self) -> dict:
        return {
            "num_domains": self.num_domains,
            "seed": self.seed,
            "refit_steps": self.refit_steps,
            "centroids": None if self.centroids is None else self.centroids.tolist(),
            "last_fit_step": self.last_fit_step,
        }

    def load_state_dict(self, state: dict) -> None:
        self.centroids = None if state.get("centroids") is None else np.asarray(state["centroids"], dtype=np.float64)
        self.last_fit_step = state.get("last_fit_step")


def normalized_mutual_information(model_domains: torch.Tensor, human_domains: torch.Tensor) -> float:
    """NMI (arithmetic normalization, as scikit-learn) between model domains and human labels."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(
        normalized_mutual_info_score(human_domains.cpu().numpy(), model_domains.cpu().numpy())
    )
