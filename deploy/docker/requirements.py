"""Print the pinned requirements of an image from pyproject.toml, so the pins stay one truth.

python requirements.py all          every dependency of fedprompt (the model roles' images)
python requirements.py aggregator   only what the aggregation server imports (no torch, no model stack)
"""

import re
import sys
import tomllib

AGGREGATOR = {"grpcio", "grpcio-health-checking", "protobuf", "cryptography", "psycopg", "numpy", "tqdm"}


def main(which: str, pyproject: str = "/src/pyproject.toml") -> None:
    with open(pyproject, "rb") as fh:
        deps = tomllib.load(fh)["project"]["dependencies"]
    if which == "aggregator":
        deps = [d for d in deps if re.split(r"[=<>~!\[; ]", d, maxsplit=1)[0] in AGGREGATOR]
        missing = AGGREGATOR - {re.split(r"[=<>~!\[; ]", d, maxsplit=1)[0] for d in deps}
        if missing:
            sys.exit(f"pyproject.toml lists no {sorted(missing)}: the aggregator's set is out of date")
    elif which != "all":
        sys.exit(f"usage: requirements.py all|aggregator (got {which!r})")
    print("\n".join(deps))


if __name__ == "__main__":
    main(*sys.argv[1:])
