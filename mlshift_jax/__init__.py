"""mlshift_jax: a JAX benchmarking harness for detecting and categorizing changes in the
behaviour of ML models (the study "Detection of ML Behavior Changes", at full speed)."""

__version__ = "0.1.0"
