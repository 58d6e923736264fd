"""The workflow's side of the package: config checking, job lists, rule settings, code digests.

Snakemake's rule files call into this package at parse time, so everything in
it is importable without torch and is unit-tested without running a workflow.
"""
