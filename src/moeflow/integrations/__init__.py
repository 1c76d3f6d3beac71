"""Adapters that put moeflow's expert parallelism into models from other libraries.

:mod:`moeflow.integrations.hf`: Hugging Face transformers MoE models
(:func:`~moeflow.integrations.hf.expert_parallelize`). Importing this package needs none of those
libraries; each adapter imports its library only when it needs it.
"""

__all__ = ["hf"]
