"""Fixtures for the whole suite come from the testbed's pytest plugins (one per testbed part)."""

pytest_plugins: list[str] = [
    # each testbed part appends its plugin module here, e.g. "pilotfleet_testbed.pytest_triton"
]
