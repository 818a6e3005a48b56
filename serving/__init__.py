"""The protocol-free serving core: the data plane every protocol calls (``dataplane.py``), the models
served (``catalog.py``), batch queues (``batching.py``) and the request and answer types (``types.py``)."""
