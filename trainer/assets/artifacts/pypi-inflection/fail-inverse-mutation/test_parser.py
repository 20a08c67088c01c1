"""Reads `pytest -rA` output on stdin; prints {nodeid: status} as JSON."""
import json
import sys

WORDS = {"PASSED": "passed", "FAILED": "failed", "ERROR": "error", "SKIPPED": "skipped",
         "XFAIL": "skipped", "XPASS": "failed"}
results = {}
for line in sys.stdin.read().splitlines():
    word, _, rest = line.partition(" ")
    if word in WORDS and "::" in rest:
        nodeid = rest.split(" - ")[0].strip()
        # A test reported twice (passed, then errored in teardown) keeps the failure.
        if results.get(nodeid) not in ("failed", "error"):
            results[nodeid] = WORDS[word]
print(json.dumps(results, sort_keys=True))
