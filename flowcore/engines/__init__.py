"""The engines behind :mod:`flowcore.engine`, one module each (``FLOW_ENGINE`` names one).

Import an engine through :func:`flowcore.engine.server_engine` and
:func:`flowcore.engine.publisher_engine`, so that a process loads only the one it runs.
"""
