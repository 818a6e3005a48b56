"""A/B experiments: which variant answers (``router.py``), the weights in force and their live change
(``live.py``), shadow traffic (``shadow.py``) and the health report (``report.py``).

SciPy is imported inside the functions that use it: the server's main process imports this package
with the service and never computes a statistic, and SciPy costs a process tens of MiB (a worker
imports it with scikit-learn anyway)."""
