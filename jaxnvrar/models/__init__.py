"""Models that run on jaxnvrar: `llama` (a tensor-parallel Llama 3.x in Flax NNX) and `pipeline`
(its layers split into pipeline stages). Import them by name: `from jaxnvrar.models import llama`."""
