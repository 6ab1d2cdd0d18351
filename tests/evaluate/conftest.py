"""Evaluation tests run with one thread per pool."""

import pytest
from threadpoolctl import threadpool_limits


@pytest.fixture(autouse=True)
def _one_openmp_thread():
    # scanpy's numba kernels (highly_variable_genes) raise the OpenMP thread count of the libgomp that torch
    # loaded first, and sklearn's OpenMP code can pick that count up: HistGradientBoosting then runs 2
    # threads and, on a busy 2-core machine, becomes ~10x slower. No result here depends on the count.
    with threadpool_limits(limits=1):
        yield
