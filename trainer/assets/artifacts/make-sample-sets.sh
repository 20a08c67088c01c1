#!/usr/bin/env bash
# Regenerates the artifact sets of the bundled sample repository (trainer/assets/artifacts/):
# `valid` passes every consistency check; each `fail-<check>` passes the checks before
# <check> and fails exactly <check>. Needs git and python3. Run from anywhere.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bundle="$here/../sample-repo.bundle"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$bundle" "$work/repo"
cd "$work/repo"
git config user.name "artifact maker"
git config user.email "maker@selfplay.dev"

common() { # copy the shared script and parser into set $1
  cp "$here/valid/test_script.sh" "$here/valid/test_parser.py" "$here/$1/" 2>/dev/null || true
}

# --- valid: revert the code of the commit that added slugify(max_length) and the package
# exports; hide it by removing the max_length tests and tests/test_package.py.
mkdir -p "$here/valid"
commit="$(git log --format=%h --grep='max_length cut at a word boundary')"
git show "$commit" -- tinytext/ | git apply -R
git diff > "$here/valid/bug_inject.diff"
git reset -q --hard
python3 - <<'EOF'
p = 'tests/test_slug.py'
s = open(p).read()
start = s.index('\n    def test_max_length_keeps_whole_words')
end = s.index('\n\nif __name__')
open(p, 'w').write(s[:start] + s[end:])
EOF
git rm -q tests/test_package.py
git diff HEAD > "$here/valid/test_weaken.diff"
git reset -q --hard
printf 'tests/test_slug.py\ntests/test_package.py\n' > "$here/valid/test_files.txt"

for s in fail-test-files-exist fail-parser-valid fail-original-passes fail-bug-scope \
         fail-bug-breaks-tests fail-weakening-hides fail-inverse-mutation; do
  mkdir -p "$here/$s"
  cp "$here/valid/"* "$here/$s/"
done

# 1. test_files_exist: a listed test file that does not exist.
printf 'tests/test_slug.py\ntests/test_package.py\ntests/test_unicode.py\n' > "$here/fail-test-files-exist/test_files.txt"

# 2. parser_valid: a parser that prints something other than a JSON object.
cat > "$here/fail-parser-valid/test_parser.py" <<'EOF'
import sys

lines = sys.stdin.read().splitlines()
print(f"parsed {len(lines)} lines")
EOF

# 3. original_passes: a script that runs a single test (min_passing_tests is 2).
cat > "$here/fail-original-passes/test_script.sh" <<'EOF'
#!/usr/bin/env bash
python3 -m unittest -v tests.test_package.PackageTest.test_exports 2>&1
EOF

# 4. bug_scope: the bug also edits a test file.
git show "$commit" -- tinytext/ | git apply -R
python3 - <<'EOF'
p = 'tests/test_wrap.py'
s = open(p).read()
open(p, 'w').write(s.replace('class WrapTest(unittest.TestCase):', 'class WrapTest(unittest.TestCase):\n    maxDiff = None\n'))
EOF
git diff > "$here/fail-bug-scope/bug_inject.diff"
git reset -q --hard

# 5. bug_breaks_tests: a bug that changes only a docstring.
python3 - <<'EOF'
p = 'tinytext/wrap.py'
s = open(p).read()
open(p, 'w').write(s.replace('"""Greedy word wrapping."""', '"""Greedy word wrapping (first fit)."""'))
EOF
git diff > "$here/fail-bug-breaks-tests/bug_inject.diff"
git reset -q --hard

# 6. weakening_hides: the weakening removes tests that the bug does not break.
python3 - <<'EOF'
p = 'tests/test_case.py'
s = open(p).read()
start = s.index('\n    def test_title_case')
end = s.index('\n\nif __name__')
open(p, 'w').write(s[:start] + s[end:])
EOF
git diff > "$here/fail-weakening-hides/test_weaken.diff"
git reset -q --hard
printf 'tests/test_case.py\n' > "$here/fail-weakening-hides/test_files.txt"

# 7. inverse_mutation: the valid bug plus a change to a third file that fixes nothing when
# reverted alone.
git show "$commit" -- tinytext/ | git apply -R
python3 - <<'EOF'
p = 'tinytext/stats.py'
s = open(p).read()
open(p, 'w').write(s.replace('"""Word statistics."""', '"""Word statistics over lower-cased words."""'))
EOF
git diff > "$here/fail-inverse-mutation/bug_inject.diff"
git reset -q --hard
echo "artifact sets written to $here"
