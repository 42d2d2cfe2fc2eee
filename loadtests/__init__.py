"""Benchmarks and load tests for Banyan.

Scripts run as modules (e.g. ``.venv/bin/python -m loadtests.adapter_churn --quick``), start what they
need on loopback only (``gateway.dev.launcher`` starts ``banyan dev --empty`` with the tiny demo model and a
data dir of their own, as the integration tests do), print their figures and stop everything they started.
Their percentiles all come from ``loadtests._stats``. Their results are recorded in ``BENCHMARKS.md``.
"""
