"""Pytest fixtures serving the stand-in; import them into a test module:

    from eucalyptus_standin.fixtures import euca3, euca4, euca_cloud  # noqa: F401
"""

from __future__ import annotations

import pytest

from . import eucalyptus_standin


@pytest.fixture(scope="session")
def euca3(tmp_path_factory):
    """A Eucalyptus 3.x stand-in for the whole session."""
    with eucalyptus_standin("3", tmp_path_factory.mktemp("euca3"), state_delay=1.5) as cloud:
        yield cloud


@pytest.fixture(scope="session")
def euca4(tmp_path_factory):
    """A Eucalyptus 4.x stand-in for the whole session."""
    with eucalyptus_standin("4", tmp_path_factory.mktemp("euca4"), state_delay=1.5) as cloud:
        yield cloud


@pytest.fixture(params=["3", "4"], ids=["euca3", "euca4"])
def euca_cloud(request):
    """Each of the 3.x and 4.x stand-ins in turn, request log and faults cleared; what a
    test leaves on it (faults, instances, volumes) is removed after it, however it ended,
    so that a failed test cannot fail the tests after it."""
    cloud = request.getfixturevalue(f"euca{request.param}")
    cloud.clear_log()
    cloud.remove_leftovers()
    try:
        yield cloud
    finally:
        cloud.remove_leftovers()
