"""Benchmarks and load tests for Banyan.

Scripts run as modules (e.g. ``.venv/bin/python -m loadtests.adapter_churn --quick``), start what they
need on loopback only (``loadtests._stack`` starts ``banyan dev --empty`` with a fresh temporary data
dir), print their figures and stop everything they started. Their results are recorded in ``BENCHMARKS.md``.
"""
