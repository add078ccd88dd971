"""Deployment targets beyond docker-compose: deploy/ray/ (Ray Serve, KubeRay). Not part of the care-serve package."""
