#!/usr/bin/env bash
# Writes the five injector artifacts into .selfplay/ for a one-line bug:
#   bash ci/inject.sh FILE OLD NEW
# The bug: the first OLD on each line of FILE becomes NEW (sed, `|` as the delimiter). The
# weakening: FILE's test file (tests/test_<name>) is emptied. The test script and parser are
# the repository's own (ci/run_tests.sh, ci/parse.py).
set -euo pipefail
file=$1 old=$2 new=$3
test_file=tests/test_$(basename "$file")
mkdir -p .selfplay
cp ci/run_tests.sh .selfplay/test_script.sh
cp ci/parse.py .selfplay/test_parser.py
sed -i "s|$old|$new|" "$file"
git diff > .selfplay/bug_inject.diff
: > "$test_file"
git diff -- tests > .selfplay/test_weaken.diff
echo "$test_file" > .selfplay/test_files.txt
