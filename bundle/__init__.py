"""Shared conventions of bentoml-bundle: datasets, model-store layout, configuration."""
