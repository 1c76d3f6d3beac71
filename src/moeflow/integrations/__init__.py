"""Adapters that put moeflow's expert parallelism into models from other libraries.

:mod:`moeflow.integrations.hf`: Hugging Face transformers MoE models
(:func:`~moeflow.integrations.hf.expert_parallelize`). Importing this package needs none of those
libraries: the adapters recognise the libraries' modules without importing them.
"""

from . import hf

__all__ = ["hf"]
