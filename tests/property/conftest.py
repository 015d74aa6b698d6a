"""Hypothesis profiles and the hostile-input probe on a real database.

Profiles (``TENANT_CELERY_HYPOTHESIS_PROFILE``, else ``ci`` when ``CI=true``,
else ``dev``):

``dev``
    200 examples per test, random: each local run tries new values.
``ci``
    200 examples per test, derandomized: the same values every run, so CI is
    never flaky.
``full``
    2,000 examples per test, random: over 10,000 hostile cases across the
    hostile-input tests.

No profile keeps an example database (nothing is written to the checkout),
has a deadline (the database cases take as long as PostgreSQL does) or fails
a test for slow generation.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings
from reliability.hostile import HostileProbe, prepare_table

from tests._rig.env import in_ci
from tests._rig.postgres import APP_ROLE, Database

PROFILE_ENV = "TENANT_CELERY_HYPOTHESIS_PROFILE"

# Generation speed is not what these tests check, and a loaded CI machine is slow.
_RELAXED = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile(
    "dev", max_examples=200, deadline=None, database=None, suppress_health_check=_RELAXED
)
settings.register_profile("ci", settings.get_profile("dev"), derandomize=True)
settings.register_profile("full", settings.get_profile("dev"), max_examples=2_000)
settings.load_profile(os.environ.get(PROFILE_ENV) or ("ci" if in_ci() else "dev"))


@pytest.fixture(scope="module")
def probe(module_database: Database) -> Iterator[HostileProbe]:
    """A :class:`~reliability.hostile.HostileProbe` on the module's database: the
    hostile-items table seeded with two tenants' rows, read and written as ``app_user``."""
    prepare_table(module_database.admin_engine(), APP_ROLE)
    probe = HostileProbe(module_database.admin_engine(), module_database.app_engine())
    try:
        yield probe
    finally:
        probe.close()
