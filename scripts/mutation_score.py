"""The score of each module from ``mutmut results --all true`` on stdin (scripts/mutation-test).

Usage: ``mutmut results --all true | python scripts/mutation_score.py viowire/x.py ...``

A mutant is caught when a test fails on it (killed) or it makes a test hang (timeout); the score
is caught / (caught + survived). Mutants not run yet (a time limit) are counted apart.
"""

from __future__ import annotations

import collections
import re
import sys

MUTANT = re.compile(r"^\s*(?P<module>[\w.]+?)\.x[_\u01c1](?P<rest>\S*): (?P<status>.+)$")
CAUGHT = ("killed", "timeout", "suspicious")


def main(paths: list[str]) -> None:
    wanted = {path.removesuffix(".py").replace("/", ".") for path in paths}
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    survivors = []
    for line in sys.stdin:
        match = MUTANT.match(line)
        if not match or match["module"] not in wanted:
            continue
        status = match["status"].strip()
        counts[match["module"]][status] += 1
        if status == "survived":
            survivors.append(line.strip().rpartition(":")[0])
    print(f"{'module':30} {'mutants':>7} {'caught':>7} {'survived':>8} {'not run':>7} {'score':>6}")
    for module in sorted(counts):
        c = counts[module]
        caught = sum(c[s] for s in CAUGHT)
        survived = c["survived"]
        rest = sum(c.values()) - caught - survived
        score = f"{100 * caught / (caught + survived):.1f}%" if caught + survived else "-"
        print(f"{module:30} {sum(c.values()):7} {caught:7} {survived:8} {rest:7} {score:>6}")
    print(f"\n{len(survivors)} surviving mutants (`mutmut show NAME` in $MUTATION_DIR/src):")
    print("\n".join(survivors))


if __name__ == "__main__":
    main(sys.argv[1:])
