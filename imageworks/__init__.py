"""Compatibility namespace: the runbook's ``imageworks.model_loader`` paths, backed by ``imageworks_core``."""
