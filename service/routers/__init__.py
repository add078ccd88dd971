"""Routers, the one part of a version that is read on demand: the generic byte-capped two-tier cache (`cache`)
and the adapter that fills it from the registry and hands the model its `RouterSource` (`source`)."""
