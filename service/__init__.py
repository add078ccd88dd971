"""care-serve service package."""
