#!/usr/bin/env bash
# Regenerates the artifact sets for inflection 0.5.1 (the sdist from PyPI, which ships its
# pytest suite): `valid` and three sets that each fail one check. Needs python3 (pip), git.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: inflection==0.5.1 -d "$work"
tar --no-same-owner -xzf "$work/inflection-0.5.1.tar.gz" -C "$work"
cd "$work/inflection-0.5.1"
git init -q && git add -A && git -c user.name=maker -c user.email=maker@selfplay.dev commit -qm sdist

mkdir -p "$here/valid"
cat > "$here/valid/test_script.sh" <<'EOF'
#!/usr/bin/env bash
# pytest with the short summary of every test (-rA); no cache directory in the repository.
python3 -m pytest -rA -q -p no:cacheprovider test_inflection.py 2>&1
EOF
cat > "$here/valid/test_parser.py" <<'EOF'
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
EOF
printf 'test_inflection.py\n' > "$here/valid/test_files.txt"

# The bug: the rule for 11th, 12th and 13th is removed from ordinal().
python3 - <<'EOF'
p = 'inflection/__init__.py'
s = open(p).read()
old = '''    number = abs(int(number))
    if number % 100 in (11, 12, 13):
        return "th"
    else:
        return {
            1: "st",
            2: "nd",
            3: "rd",
        }.get(number % 10, "th")
'''
new = '''    number = abs(int(number))
    return {
        1: "st",
        2: "nd",
        3: "rd",
    }.get(number % 10, "th")
'''
assert old in s
open(p, 'w').write(s.replace(old, new))
EOF
git diff > "$here/valid/bug_inject.diff"
git reset -q --hard
# The weakening: the two ordinal tests are removed.
python3 - <<'EOF'
p = 'test_inflection.py'
s = open(p).read()
for name in ('test_ordinal', 'test_ordinalize'):
    start = s.index('@pytest.mark.parametrize(("number", "ordinalized"), ORDINAL_NUMBERS)\ndef %s(' % name)
    end = s.index('\n\n\n', start) + 3
    s = s[:start] + s[end:]
open(p, 'w').write(s)
EOF
git diff > "$here/valid/test_weaken.diff"
git reset -q --hard

for s in fail-bug-scope fail-weakening-hides fail-inverse-mutation; do
  mkdir -p "$here/$s"
  cp "$here/valid/"* "$here/$s/"
done
# bug_scope: the bug also edits the test file.
git apply "$here/valid/bug_inject.diff"
sed -i 's/^import inflection$/import inflection  # noqa/' test_inflection.py
git diff > "$here/fail-bug-scope/bug_inject.diff"
git reset -q --hard
# weakening_hides: the weakening removes the titleize tests, which the bug does not break.
python3 - <<'EOF'
p = 'test_inflection.py'
s = open(p).read()
start = s.index('@pytest.mark.parametrize(("before", "titleized"), CAMEL_TO_UNDERSCORE)') if '("before", "titleized"), CAMEL_TO_UNDERSCORE' in s else s.index('def test_titleize(')
start = s.rfind('\n\n\n', 0, start) + 3
end = s.index('\n\n\n', s.index('def test_titleize(')) + 3
open(p, 'w').write(s[:start] + s[end:])
EOF
git diff > "$here/fail-weakening-hides/test_weaken.diff"
git reset -q --hard
# inverse_mutation: the bug plus a change to setup.py that breaks no test.
git apply "$here/valid/bug_inject.diff"
sed -i 's/^    description=.*/    description="A port of the Ruby on Rails inflector",/' setup.py
git diff > "$here/fail-inverse-mutation/bug_inject.diff"
git reset -q --hard
echo "inflection artifact sets written to $here"
