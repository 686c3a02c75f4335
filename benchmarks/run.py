#!/usr/bin/env python3
"""Run viowire's benchmark suite with its own servers: ``python benchmarks/run.py [options]``.

The same as ``viowire bench`` without a URL (``--help`` lists the options). Typical uses::

    python benchmarks/run.py                                  # everything, both loops, both sockets
    python benchmarks/run.py --loop uvloop --socket unix      # one combination
    python benchmarks/run.py --only blk.read --runs 3 --json  # a subset, as JSON
    python benchmarks/run.py --quick                          # tiny counts: does it all run?
    python benchmarks/run.py --profile 10 --loop uvloop --socket unix   # py-spy, both sides

The suite's code is ``viowire/perf/`` (so that ``viowire bench`` works from an installed
package); this script only makes a checkout runnable without installing it.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from viowire.perf import suite

    args = suite.parse(sys.argv[1:])
    if args.url and not args.spawn:
        print(
            "benchmarks/run.py spawns its own servers; use `viowire bench URL` for a running one",
            file=sys.stderr,
        )
        sys.exit(2)
    sys.exit(suite.main(args))
