import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parent.parent

# CPU time is shared and slow in CI: no per-example deadline; example counts sized to keep the
# suite within its budget (README). `HYPOTHESIS_PROFILE=thorough` for a deeper local run.
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def polopt_env(tmp_path_factory) -> dict:
    """An environment where only this checkout's `polopt` package is importable by path (what the
    `polopt` console script gives an installed package)."""
    link_dir = tmp_path_factory.mktemp("pythonpath")
    (link_dir / "polopt").symlink_to(REPO / "polopt")
    return {**os.environ, "PYTHONPATH": str(link_dir)}
