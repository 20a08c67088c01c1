#!/usr/bin/env bash
# pytest with the short summary of every test (-rA); no cache directory in the repository.
python3 -m pytest -rA -q -p no:cacheprovider test_inflection.py 2>&1
