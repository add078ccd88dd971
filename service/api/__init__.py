"""HTTP routes: thin functions that validate, make one call, and map the result to a schema.

`predict`, `tasks` and `ops` are the routes; `deps` gives them the app state and the auth guards; `schemas` are the
response bodies and `openapi` the published contract.
"""
