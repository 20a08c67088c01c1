#!/usr/bin/env bash
# Runs the whole unittest suite verbosely from the repository root; the parser reads the
# per-test lines.
python3 -m unittest discover -s tests -t . -v 2>&1
