"""Models that run on jaxnvrar (installed as jaxnvrar.models)."""
