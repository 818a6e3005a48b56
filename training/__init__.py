"""Train the demo models into the BentoML model store (``python -m training``)."""
