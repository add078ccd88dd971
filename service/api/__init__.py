"""HTTP routes: thin functions that validate, make one call, and map the result to a schema."""
