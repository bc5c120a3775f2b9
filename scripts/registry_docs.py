"""Write the registry's JSON Schema and field table under docs/ from the pydantic models (the one source).

uv run python scripts/registry_docs.py           # rewrite docs/registry.schema.json and docs/registry-fields.md
uv run python scripts/registry_docs.py --check   # exit 1 naming the stale file (what tests/test_schema_docs.py checks)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imageworks_core.schema import fields_markdown, json_schema

DOCS = Path(__file__).resolve().parent.parent / "docs"


def generated() -> dict[Path, str]:
    """Each docs file and the text the models give it."""
    return {
        DOCS / "registry.schema.json": json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n",
        DOCS / "registry-fields.md": fields_markdown(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are current")
    args = parser.parse_args(argv)
    stale = []
    for path, text in generated().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(path)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for path in stale:
        print(f"{path} is stale: run `uv run python scripts/registry_docs.py`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
