#!/usr/bin/env python3
"""Prints why tests were skipped in the last ctest run of a build folder: one line per
reason with its count, from Testing/Temporary/LastTest.log (GoogleTest prints the reason
of GTEST_SKIP() right after '<file>:<line>: Skipped'). Usage: skip-reasons.py BUILD_DIR"""
import collections
import pathlib
import re
import sys


def main() -> int:
    log = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "build") / "Testing/Temporary/LastTest.log"
    if not log.is_file():
        print(f"mdopt: no {log}; nothing to summarise")
        return 0
    text = log.read_text(errors="replace")
    reasons = collections.Counter()
    # One block per test: from "Output:" to "<end of output>".
    for block in re.findall(r"\nOutput:\n-+\n(.*?)<end of output>", text, re.S):
        if "[  SKIPPED ]" not in block:
            continue
        m = re.search(r": Skipped\n(.*?)\n", block)
        reason = m.group(1).strip() if m and m.group(1).strip() else "(no reason given)"
        if reason.startswith("["):
            reason = "(no reason given)"
        reasons[reason] += 1
    total = sum(reasons.values())
    if total == 0:
        print("mdopt: no test skipped")
        return 0
    print(f"mdopt: {total} test{'s' if total != 1 else ''} skipped:")
    for reason, n in reasons.most_common():
        print(f"  {n:4d} x {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
