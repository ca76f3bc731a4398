"""fastmae's benchmarks: pytest-benchmark files (``bench_*.py``) and the one-command GPU report (``report.py``)."""
