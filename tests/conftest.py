"""Shared fixtures. Distributed tests spawn gloo processes that rendezvous through a file
store in a temporary directory, so no port is ever picked or retried."""

from __future__ import annotations

import os

import pytest

# Keep each test process to one intra-op thread per rank: the machine has 2 cores and the
# multi-rank tests run several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def tmp_url(tmp_path):
    return str(tmp_path)


from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401  (fixtures)
