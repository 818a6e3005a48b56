"""Offline batch scoring: files in, predictions out, with the online service's models and routing.

``python -m batch MODEL INPUT OUTPUT`` scores CSV, Parquet or JSON Lines on one machine (``batch/job.py``),
``python -m batch.spark`` the same on Apache Spark (``batch/spark.py``). Both score with ``batch/scoring.py``:
the stored models through ``runtimes``, the variant through ``experiments.router`` (the online router
itself, so a user gets offline what they get online). The service takes the same jobs as a BentoML task
(``POST /score_file/submit``, ``batch/task.py``). Usage: docs/batch.md.
"""
