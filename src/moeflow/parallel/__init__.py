"""Parallelism beyond expert parallelism: pipelines (:mod:`.pipeline`) and the overlap of one
micro-batch's expert traffic with another's compute (:mod:`.overlap`)."""
