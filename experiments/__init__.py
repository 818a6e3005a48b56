"""A/B experiments: which variant answers (``router.py``), the weights in force and their live change
(``live.py``), shadow traffic (``shadow.py``) and the health report (``report.py``)."""
