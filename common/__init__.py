"""What every part of bentoml-bundle shares, serving or not: the configuration, the model-store
contract, the one data split, input schemas, request errors, logs, Prometheus series and tables.

Training, conversion, the service and the benchmarks all import from here; nothing here imports
any other package of the project.
"""
