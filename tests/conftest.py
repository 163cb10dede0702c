"""Fixtures for the whole suite come from the testbed's pytest plugins (one per testbed part)."""

pytest_plugins: list[str] = [
    # each testbed part appends its plugin module here, e.g. "pilotfleet_testbed.pytest_triton"
    "pilotfleet_testbed.pytest_kube",
    "pilotfleet_testbed.pytest_triton",
    "pilotfleet_testbed.pytest_proxy",
    "pilotfleet_testbed.pytest_clients",
    "pilotfleet_testbed.pytest_chart",
    "pilotfleet_testbed.pytest_jobs",
]
