"""Four tiny modules for the self-play demonstration."""
