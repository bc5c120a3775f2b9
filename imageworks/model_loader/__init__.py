"""Runbook-compatible entry points (``imageworks.model_loader.registry``); the code lives in ``imageworks_core``."""
