"""Locust load tests with latency gates: built by issue #6 against the server."""
