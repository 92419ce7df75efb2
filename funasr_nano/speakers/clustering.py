"""funasr's `ClusterBackend` (funasr/models/campplus/cluster_backend.py) in numpy, scipy and scikit-learn.

Which clustering runs depends on the number N of window embeddings (one per 0.75 s of speech):

- N < 20 (under about 15 s of speech): everyone is speaker 0, as in funasr, even when a number of
  speakers is given (funasr ignores it there too; too few windows to tell voices apart reliably);
- N < 2048 (under about 25 minutes of speech): spectral clustering on the cosine affinity matrix,
  each row pruned to its strongest 2.2 % (at least 6 entries), symmetrised, the unnormalised
  Laplacian's eigenvectors, the number of speakers from the largest eigengap (or as given), k-means;
- longer, with a number of speakers given: k-means on the L2-normalised embeddings;
- longer, without: UMAP (20 neighbours, 60 components, cosine) then HDBSCAN (min 10 samples and
  cluster size), with umap-learn and scikit-learn's HDBSCAN, the libraries funasr calls;
- then, when no number was given, clusters whose mean embeddings have a cosine of 0.78 or more are
  merged, the most similar pair first, until none is left.

Memory on long files. The only N x N matrices are those of the spectral branch, which runs below
2048 windows: a few 2048 x 2048 arrays (16 MB each in float32, 32 MB in float64, the eigenvectors
and the pruning's argsort included) whatever the file's length. Above it nothing quadratic is kept:
k-means holds N x k distances; umap-learn finds neighbours exactly below 4096 points (a 4096^2
float32 distance matrix, 64 MB) and by nearest-neighbour descent above (N x 20 neighbours); HDBSCAN
builds its minimum spanning tree with Prim's algorithm over a k-d tree (O(N) memory) for the
euclidean metric it gets here. A 2-hour file of continuous speech gives 9,600 windows: a few MB of
embeddings and a few hundred MB at most while UMAP runs (measured in docs/diarization.md).

Differences from funasr, on purpose:

- k-means runs with a fixed seed and 10 initialisations (funasr: unseeded): the same input always
  gets the same labels. On embeddings with speaker structure the partition is the same as funasr's
  up to the numbering (tested), which the later steps renumber by first appearance anyway;
- UMAP runs with a fixed seed too (umap-learn then uses one thread);
- windows HDBSCAN calls noise join the nearest cluster (`_assign_noise`); funasr makes them one more
  speaker;
- `min_speakers` / `max_speakers` (funasr: fixed 1 and 15 for the eigengap, none elsewhere) bound
  the eigengap search, stop the cosine merging at `min_speakers`, and on the UMAP branch merge the
  closest clusters down to `max_speakers` or split with k-means up to `min_speakers`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

MIN_WINDOWS = 20  # funasr: fewer embeddings than this are one speaker
SPECTRAL_MAX_WINDOWS = 2048  # funasr: spectral clustering below this, UMAP + HDBSCAN (or k-means) above
MERGE_THRESHOLD = 0.78  # funasr ClusterBackend's merge_thr
PVAL = 0.022  # funasr SpectralCluster's pval
DEFAULT_MAX_SPEAKERS = 15  # funasr SpectralCluster's max_num_spks
SEED = 0


@dataclass(frozen=True)
class SpeakerCount:
    """What the caller knows of the number of speakers: exactly `count`, or between `minimum` and `maximum`."""

    count: int | None = None
    minimum: int = 1
    maximum: int = DEFAULT_MAX_SPEAKERS

    def __post_init__(self) -> None:
        if self.count is not None and self.count < 1:
            raise ValueError(f"number of speakers must be at least 1, not {self.count}")
        if self.minimum < 1 or self.maximum < self.minimum:
            raise ValueError(f"speakers between {self.minimum} and {self.maximum}: need 1 <= min <= max")


def _kmeans(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.cluster import k_means

    _, labels, _ = k_means(x, k, random_state=SEED, n_init=10)
    return np.asarray(labels, dtype=np.int64)


def spectral_labels(x: np.ndarray, count: SpeakerCount) -> np.ndarray:
    """funasr's SpectralCluster: p-pruned cosine affinity, unnormalised Laplacian, eigengap, k-means."""
    import scipy.linalg
    from sklearn.metrics.pairwise import cosine_similarity

    n = x.shape[0]
    affinity = cosine_similarity(x, x)
    pval = 6.0 / n if n * PVAL < 6 else PVAL
    n_low = int((1 - pval) * n)
    # each row keeps its strongest entries; funasr sorts one row at a time, the same sort per row
    low = np.argsort(affinity, axis=1)[:, :n_low]
    np.put_along_axis(affinity, low, 0, axis=1)
    del low
    affinity = 0.5 * (affinity + affinity.T)
    np.fill_diagonal(affinity, 0)
    laplacian = np.diag(np.abs(affinity).sum(axis=1)) - affinity
    del affinity
    eigenvalues, eigenvectors = scipy.linalg.eigh(laplacian)
    del laplacian
    if count.count is not None:
        k = count.count
    else:
        window = eigenvalues[count.minimum - 1:count.maximum + 1].astype(np.float64)
        k = int(np.argmax(np.diff(window))) + count.minimum if len(window) > 1 else count.minimum
    return _kmeans(eigenvectors[:, :k], k)


def umap_hdbscan_labels(x: np.ndarray) -> np.ndarray:
    """funasr's UmapHdbscan: UMAP to at most 60 dimensions, then HDBSCAN (noise is label -1)."""
    import umap
    from sklearn.cluster import HDBSCAN

    reduced = umap.UMAP(n_neighbors=20, min_dist=0.0, n_components=min(60, x.shape[0] - 2), metric="cosine",
                        random_state=SEED).fit_transform(x)
    return np.asarray(HDBSCAN(min_samples=10, min_cluster_size=10, allow_single_cluster=True)
                      .fit_predict(reduced), dtype=np.int64)


def normalized_kmeans_labels(x: np.ndarray, k: int) -> np.ndarray:
    """funasr's KMeansCluster: k-means on L2-normalised embeddings."""
    from sklearn.preprocessing import normalize

    return _kmeans(normalize(x), k)


def _centers(labels: np.ndarray, x: np.ndarray, n: int) -> np.ndarray:
    centers = np.stack([x[labels == i].mean(axis=0) for i in range(n)])
    return centers / np.linalg.norm(centers, axis=1, keepdims=True)


def merge_by_cosine(labels: np.ndarray, x: np.ndarray, threshold: float, min_speakers: int = 1) -> np.ndarray:
    """funasr's merge_by_cos: merge the two clusters with the most similar mean embeddings while their cosine
    is at least `threshold` (and more than `min_speakers` are left); the higher label joins the lower one and
    the labels above it move down by one. Noise (-1) is left alone."""
    labels = labels.copy()
    while True:
        n = int(labels.max()) + 1
        if n <= max(1, min_speakers):
            return labels
        centers = _centers(labels, x, n)
        similarity = np.triu(centers @ centers.T, 1)
        keep, drop = np.unravel_index(np.argmax(similarity), similarity.shape)
        if similarity[keep, drop] < threshold:
            return labels
        labels = _merge(labels, int(keep), int(drop))


def _merge(labels: np.ndarray, keep: int, drop: int) -> np.ndarray:
    labels = labels.copy()
    labels[labels == drop] = keep
    labels[labels > drop] -= 1
    return labels


def _merge_down_to(labels: np.ndarray, x: np.ndarray, maximum: int) -> np.ndarray:
    """Merge the most similar clusters, whatever their cosine, until at most `maximum` are left."""
    while int(labels.max()) + 1 > maximum:
        n = int(labels.max()) + 1
        centers = _centers(labels, x, n)
        similarity = np.triu(centers @ centers.T, 1) - np.tril(np.full((n, n), 2.0))
        keep, drop = np.unravel_index(np.argmax(similarity), similarity.shape)
        labels = _merge(labels, int(keep), int(drop))
    return labels


def _assign_noise(labels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """HDBSCAN's noise windows (-1) to the cluster with the most similar mean embedding.

    funasr leaves them as -1, which its postprocessing then numbers as one more "speaker" (the first
    label seen gets 0, so a noise window early in the file can even take speaker 0). On one voice
    HDBSCAN calls about a fifth of the windows noise, and which ones changes from run to run (UMAP is
    unseeded there): that speaker is an artefact, not a voice."""
    noise = labels < 0
    n = int(labels.max()) + 1
    if not noise.any():
        return labels
    if n == 0:
        return np.zeros_like(labels)
    centers = _centers(labels, x, n)
    unit = x[noise] / np.maximum(np.linalg.norm(x[noise], axis=1, keepdims=True), 1e-12)
    labels = labels.copy()
    labels[noise] = np.argmax(unit @ centers.T, axis=1)
    return labels


def cluster_speakers(embeddings: np.ndarray, count: SpeakerCount = SpeakerCount(),
                     merge_threshold: float = MERGE_THRESHOLD) -> np.ndarray:
    """One label per embedding (N,), as funasr's ClusterBackend(embeddings, oracle_num=count.count) gives.

    Labels are cluster ids, not yet numbered by first appearance (`funasr_nano.speakers.diarize` does
    that, as funasr's postprocess does)."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be (N, dim), got shape {x.shape}")
    n = x.shape[0]
    if n < MIN_WINDOWS:
        if count.count is not None and count.count > 1 or count.minimum > 1:
            log.warning("only %d speaker windows (%.1f s of speech): too few to tell voices apart, one speaker", n,
                        0.75 * n)
        return np.zeros(n, dtype=np.int64)
    if n < SPECTRAL_MAX_WINDOWS:
        labels = spectral_labels(x, count)
    elif count.count is not None:
        labels = normalized_kmeans_labels(x, count.count)
    else:
        labels = _assign_noise(umap_hdbscan_labels(x), x)
        found = int(labels.max()) + 1
        if found < count.minimum:
            labels = normalized_kmeans_labels(x, count.minimum)
    if count.count is None:
        labels = merge_by_cosine(labels, x, merge_threshold, count.minimum)
        if int(labels.max()) + 1 > count.maximum:
            labels = _merge_down_to(labels, x, count.maximum)
    return labels
