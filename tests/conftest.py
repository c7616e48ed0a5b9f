import os

from hypothesis import HealthCheck, settings

# CPU time is shared and slow in CI: no per-example deadline; example counts sized so the whole
# suite stays under 15 minutes on 2 cores. `HYPOTHESIS_PROFILE=thorough` for a deeper local run.
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=1000, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
