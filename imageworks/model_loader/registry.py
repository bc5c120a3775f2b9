"""``python -m imageworks.model_loader.registry --validate`` and ``load_registry(force=True)``, as the runbook says."""

from imageworks_core.registry import Registry, load_registry, main, validate

__all__ = ["Registry", "load_registry", "main", "validate"]

if __name__ == "__main__":
    raise SystemExit(main())
