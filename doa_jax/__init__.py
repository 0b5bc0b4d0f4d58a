"""doa_jax: distill or annotate, in JAX."""

__version__ = '0.1.0'
