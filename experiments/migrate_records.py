"""Rewrite record files in the form the code writes now (surgeon.records.upgrade): portable model paths
(`shared:models/...`), the element-update solver. Idempotent; each file is replaced atomically.

    python -m experiments.migrate_records results/*.jsonl [--shared-was /old/checkout/shared]

`--shared-was` names the shared folder the records were written with when it is not this checkout's.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from surgeon.records import upgrade


def migrate(path: Path, shared_was: str | None = None) -> int:
    """Upgrade every record of `path` in place; returns how many changed."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    out, changed = [], 0
    for line in lines:
        record = json.loads(line)
        model = record.get("protocol", {}).get("model")
        if shared_was and isinstance(model, str) and model.startswith(shared_was.rstrip("/") + "/"):
            record["protocol"]["model"] = "shared:" + model[len(shared_was.rstrip("/")) + 1:]
        new = json.dumps(upgrade(record))
        changed += new != line
        out.append(new)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in out))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--shared-was", default=None, help="the shared folder's absolute path when the records were written")
    args = p.parse_args(argv)
    for path in args.files:
        print(f"{path}: {migrate(path, args.shared_was)} records upgraded")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
