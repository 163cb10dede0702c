"""pilotfleet_testbed."""
