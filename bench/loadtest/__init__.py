"""Locust load tests: users and SLA gates (locustfile.py), a ramp-and-burst shape, and the runner (run.py)."""
