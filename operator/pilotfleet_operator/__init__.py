"""pilotfleet_operator."""
