"""care-serve registry package."""
