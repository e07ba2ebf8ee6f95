"""The approximate (IVF) frequency score against the exact one: equal when every list is
probed, close in rank on real features, chosen automatically above a size."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from distnoisy.analyze import knn
from distnoisy.analyze.buckets import assign_buckets, bucket_edges
from distnoisy.analyze.config import load_analyze_config
from distnoisy.analyze.ivf import ivf_density, num_lists
from distnoisy.core.errors import ConfigError
from distnoisy.data import fashion_mnist


def _clusters(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((12, d))
    return (centers[rng.integers(0, 12, n)] + 0.7 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ivf_probing_every_list_is_the_exact_score(metric):
    """With probes >= lists every training row is a candidate: the exact score (self rows
    excluded in place), for training and test queries, with lists of very different sizes."""
    train = _clusters(3000, 16, 0)
    test = _clusters(500, 16, 1)
    for queries, ref in ((train, None), (test, train)):
        exact = knn.knn_density(queries, ref, k=7, metric=metric, search="exact")
        full = ivf_density(queries, ref, k=7, metric=metric, probes=10**6, lists=40)
        np.testing.assert_allclose(full, exact, rtol=0, atol=1e-6)
        # fewer probes can only miss neighbours, so never score above the exact value
        approx = ivf_density(queries, ref, k=7, metric=metric, probes=2, lists=40)
        assert (approx <= exact + 1e-6).all()
        assert (approx < exact - 1e-6).any()


@pytest.fixture(scope="module")
def fashion_pixels() -> np.ndarray:
    """20,000 real images (Fashion-MNIST, 14x14) as 196-d features."""
    try:
        files = fashion_mnist.find_files(fashion_mnist.DEFAULT_SOURCE)
    except Exception:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    images, _ = fashion_mnist.read_split(*files["train"])
    return images[:20000, ::2, ::2].reshape(20000, -1).astype(np.float32)


def test_ivf_agrees_with_exact_on_real_features(fashion_pixels):
    """Rank agreement and bucket table on 20,000 real images (training and test queries)."""
    train = fashion_pixels
    test = train[:2000] + np.random.default_rng(0).normal(0, 10, (2000, 196)).astype(np.float32)
    exact = knn.knn_density(train, None, k=10, search="exact")
    approx = knn.knn_density(train, None, k=10, search="ivf")
    assert spearmanr(exact, approx).statistic >= 0.99
    edges_e, edges_a = bucket_edges(exact, 5), bucket_edges(approx, 5)
    same = assign_buckets(exact, edges_e) == assign_buckets(approx, edges_a)
    assert same.mean() >= 0.95
    exact_t = knn.knn_density(test, train, k=10, search="exact")
    approx_t = knn.knn_density(test, train, k=10, search="ivf")
    assert spearmanr(exact_t, approx_t).statistic >= 0.99


def test_auto_search_is_exact_below_the_threshold_and_ivf_above(monkeypatch):
    train = _clusters(1500, 8, 2)
    exact = knn.knn_density(train, None, k=5, search="exact")
    ivf = knn.knn_density(train, None, k=5, search="ivf", probes=2)
    np.testing.assert_array_equal(knn.knn_density(train, None, k=5, probes=2), exact)
    monkeypatch.setattr(knn, "EXACT_MAX_ROWS", 1000)
    np.testing.assert_array_equal(knn.knn_density(train, None, k=5, probes=2), ivf)
    assert num_lists(1500) == 77 and num_lists(10**6) == 2000


def test_ivf_on_ray_tasks_reads_the_memory_mapped_features(ray_cluster, tmp_path):
    """Lists split over Ray tasks, each opening the feature file itself, give the scores of
    one process."""
    train = _clusters(4000, 12, 3)
    test = _clusters(700, 12, 4)
    np.save(tmp_path / "train.npy", train)
    np.save(tmp_path / "test.npy", test)
    mtrain = np.load(tmp_path / "train.npy", mmap_mode="r")
    mtest = np.load(tmp_path / "test.npy", mmap_mode="r")
    for queries, ref in ((mtrain, None), (mtest, mtrain)):
        local = ivf_density(queries, ref, k=5, metric="cosine", probes=3, lists=30)
        parallel = ivf_density(
            queries, ref, k=5, metric="cosine", probes=3, lists=30, num_workers=2
        )
        np.testing.assert_allclose(parallel, local, rtol=0, atol=1e-6)


def test_search_keys_are_checked():
    cfg = load_analyze_config(["run=[/a]", "analysis.search=ivf", "analysis.probes=4"])
    assert (cfg.analysis.search, cfg.analysis.probes) == ("ivf", 4)
    with pytest.raises(ConfigError, match=r"analysis\.search"):
        load_analyze_config(["run=[/a]", "analysis.search=annoy"])
    with pytest.raises(ConfigError, match=r"analysis\.probes"):
        load_analyze_config(["run=[/a]", "analysis.probes=0"])
    with pytest.raises(ConfigError, match=r"analysis\.search"):
        knn.knn_density(np.eye(5), None, k=2, search="annoy")


@pytest.mark.parametrize("search", ["ivf", "exact"])
def test_train_and_test_scores_share_one_index_and_equal_separate_searches(search):
    """The analysis scores the training rows and the test rows against them; one index built
    for both gives exactly the scores of two separate searches (each building its own)."""
    train, test = _clusters(3000, 16, seed=1), _clusters(400, 16, seed=2)
    common = dict(k=10, metric="cosine", search=search, probes=4)
    got_train, got_test = knn.train_test_density(train, test, **common)
    assert np.array_equal(got_train, knn.knn_density(train, None, **common))
    assert np.array_equal(got_test, knn.knn_density(test, train, **common))
    assert np.isfinite(got_train).all() and np.isfinite(got_test).all()
