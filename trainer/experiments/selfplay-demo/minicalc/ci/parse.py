"""Reads `python -m unittest -v` output on stdin; prints {test_id: status} as JSON."""
import json
import re
import sys

WORDS = {"ok": "passed", "FAIL": "failed", "ERROR": "error", "skipped": "skipped",
         "expected failure": "skipped", "unexpected success": "failed"}

results = {}
pending = None
for line in sys.stdin.read().splitlines():
    m = re.match(r"^(test\w*) \(([\w.]+)\)(?: \.\.\. (.*))?$", line)
    if m:
        name, where, rest = m.groups()
        # Python 3.11+ prints module.Class.test; older prints module.Class.
        test_id = where if where.endswith("." + name) else where + "." + name
        pending = test_id
        if rest is None:
            continue
        line = rest
    if pending is None:
        continue
    for word, status in WORDS.items():
        if line.strip().startswith(word):
            results[pending] = status
            pending = None
            break
print(json.dumps(results, sort_keys=True))
