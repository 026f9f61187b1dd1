"""Shared fixtures. Distributed tests spawn gloo processes that rendezvous through a file
store in a temporary directory, so no port is ever picked or retried."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Keep each test process to one intra-op thread per rank: the machine has 2 cores and the
# multi-rank tests run several ranks at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU, Triton kernels (trainer/kernels.py) run through Triton's interpreter; it must
# be switched on before anything imports triton.
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Ray's own state for this test session, in a folder of its own, set before anything imports
# ray: `ray.cluster_utils.Cluster` and `ray.init` write their address file under
# $RAY_TMPDIR/ray, which on a new machine does not exist yet (and on a used one holds
# another cluster's address). Short: Ray's socket paths are limited to 107 bytes.
_RAY_TMP = tempfile.mkdtemp(prefix="moeyard-ray-")
os.environ["RAY_TMPDIR"] = _RAY_TMP
(Path(_RAY_TMP) / "ray").mkdir()
# A local `ray.init()` in Ray >= 2.5x turns token auth on and writes ~/.ray/auth_token,
# which then turns it on for every later `ray start` of the user's. Tests run their
# clusters on 127.0.0.1 without it; a test about token auth sets the mode itself.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
_AUTH_TOKEN = Path.home() / ".ray" / "auth_token"
_AUTH_TOKEN_BEFORE = _AUTH_TOKEN.exists()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fails the run if the suite left a Ray auth token in the user's home."""
    import shutil

    shutil.rmtree(_RAY_TMP, ignore_errors=True)
    if not _AUTH_TOKEN_BEFORE and _AUTH_TOKEN.exists():
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nthe test suite wrote {_AUTH_TOKEN}: tests must not change the user's home")


@pytest.fixture
def tmp_url(tmp_path):
    return str(tmp_path)


from tests.ray_cluster import RAY_TEST_ENV, ray_mini_cluster  # noqa: E402,F401  (fixture)
from tests.s3_server import s3_bucket, s3_server  # noqa: E402,F401  (fixtures)

# Ray as the tests run it (tests/ray_cluster.py): set before anything imports ray, and
# inherited by every Ray process the tests start.
for _key, _value in RAY_TEST_ENV.items():
    os.environ.setdefault(_key, _value)
