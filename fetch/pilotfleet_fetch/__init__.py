"""pilotfleet_fetch: `pilotfleet fetch`, weights into a volume, verified, resumable, published atomically."""
