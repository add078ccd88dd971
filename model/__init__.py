"""care-serve model package."""
