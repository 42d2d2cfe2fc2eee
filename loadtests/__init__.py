"""Benchmarks and load tests for Banyan.

Each benchmark is a self-contained script that starts its own stack (``banyan dev --empty`` on free
loopback ports, with a fresh temporary data dir), drives it, prints its figures (a table, then a line
``RESULT {json}``) and stops everything it started. Run them as modules, e.g.
``.venv/bin/python -m loadtests.adapter_churn --quick``.
"""
