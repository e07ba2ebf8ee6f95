"""The rank-parallel EK-FAC scorer: 1 and 2 ranks agree with the one-process scores."""

from __future__ import annotations

import numpy as np
import pytest

from distnoisy.bench.influence import make_features, run_one
from distnoisy.posttrain import influence as infl


@pytest.mark.slow
def test_one_and_two_ranks_give_the_one_process_scores(tmp_path):
    theta = make_features(tmp_path, 3000, 16, 5, chunk=700)
    h, y = np.load(tmp_path / "h.npy"), np.load(tmp_path / "y.npy")
    want = infl.approx_scores(theta, h, y, 1e-3, corrected=True)["influence"]
    for workers in (1, 2):
        got = run_one(tmp_path, theta, workers)
        assert [r["rows"] for r in got["ranks"]] == [3000 // workers] * workers
        np.testing.assert_allclose(np.load(got["scores"]), want, rtol=1e-10)
        assert all(r["peak_rss_mb"] > 0 for r in got["ranks"])
