"""Quality evaluation of accelerated sampling: metrics, evaluators, the comparison harness."""
