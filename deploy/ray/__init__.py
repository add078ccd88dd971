"""care-serve on Ray Serve (app.py, config.yaml) and KubeRay (rayservice.yaml): docs/deploy.md, "Ray Serve"."""
