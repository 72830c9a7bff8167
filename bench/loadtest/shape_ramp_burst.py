"""A load shape for `locust -f bench/loadtest/locustfile.py,bench/loadtest/shape_ramp_burst.py`: a ramp of mixed users,
a plateau, then a burst (more users, and every embedding document at the longest length), then the plateau.

The peak is --users (default 16); the phases scale with --run-time (default 120 s).
"""

from __future__ import annotations

from locust import LoadTestShape


class RampAndBurst(LoadTestShape):
    use_common_options = True

    def tick(self):
        environment = self.runner.environment
        options = environment.parsed_options
        total = options.run_time or 120
        peak = options.num_users or 16
        now = self.get_run_time()
        environment.long_document_burst = 0.6 * total <= now < 0.75 * total
        if now >= total:
            return None
        if now < 0.4 * total:  # ramp
            return max(1, round(peak * now / (0.4 * total))), peak
        if environment.long_document_burst:
            return peak + max(1, peak // 2), peak
        return peak, peak
