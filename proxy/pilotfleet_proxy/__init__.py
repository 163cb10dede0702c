"""pilotfleet_proxy."""
