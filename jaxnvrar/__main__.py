"""`python -m jaxnvrar`: what this installation and host offer jaxnvrar (see jaxnvrar/info.py)."""

from jaxnvrar.info import print_environment_info

print_environment_info()
