"""What every stage shares: atomic files, provenance, fault points, seeding, registries."""
