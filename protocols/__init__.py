"""Wire formats over the one data plane: each module decodes its protocol into data-plane requests,
encodes the answers and declares its routes (``native.py``, ``oip.py``, ``tfserving.py``, the control
plane in ``control.py``); ``rest.py`` maps errors to HTTP responses once and ``guard.py`` is the front
door every HTTP request passes."""
