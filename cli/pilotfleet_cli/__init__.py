"""pilotfleet_cli."""
