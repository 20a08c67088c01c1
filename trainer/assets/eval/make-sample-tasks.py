#!/usr/bin/env python3
"""Regenerates trainer/assets/eval/sample-tasks.jsonl: a task set of the bundled sample
repository in SWE-bench's instance format (see docs/evaluation.md).

Each instance is one of the mutations below, applied to a clone of the sample repository's
bundle and measured there: the script runs the test suite on the clean code and with the
bug, and takes FAIL_TO_PASS (tests the bug breaks) and PASS_TO_PASS (the rest of the tests
that pass on the clean code) from those runs. The failing tests are then hidden from the
solver by deleting their test methods; `test_patch` restores them. The gold `patch` is the
bug reversed. Only the mutations and their issue texts are written by hand.

Needs git and python3. Run from anywhere: python3 trainer/assets/eval/make-sample-tasks.py
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.dirname(HERE)
BUNDLE = os.path.join(ASSETS, "sample-repo.bundle")
SCRIPT = open(os.path.join(ASSETS, "artifacts", "valid", "test_script.sh")).read()
PARSER = open(os.path.join(ASSETS, "artifacts", "valid", "test_parser.py")).read()
OUT = os.path.join(HERE, "sample-tasks.jsonl")

# (id, file, old text, new text, issue). `old` must occur exactly once in `file`.
MUTATIONS = [
    ("wrap-exact-width", "tinytext/wrap.py",
     "len(current) + 1 + len(word) <= width", "len(current) + 1 + len(word) < width",
     "wrap() breaks a line that fits exactly: wrap(\"abc def\", 7) gives two lines, but "
     "\"abc def\" is 7 characters and should stay on one line."),
    ("wrap-zero-width", "tinytext/wrap.py",
     "if width < 1:", "if width < 0:",
     "wrap(text, 0) does not complain. A width below 1 makes no sense and should raise "
     "ValueError."),
    ("wrap-last-line", "tinytext/wrap.py",
     "    if current:\n        lines.append(current)\n    return lines",
     "    return lines",
     "wrap() loses the last line of the text: wrap(\"hello world\", 20) returns []."),
    ("fill-paragraphs", "tinytext/wrap.py",
     'return "\\n\\n".join("\\n".join(wrap(p, width)) for p in paragraphs)',
     'return "\\n".join("\\n".join(wrap(p, width)) for p in paragraphs)',
     "fill() runs paragraphs together: the blank line between two paragraphs disappears."),
    ("fill-empty-paragraphs", "tinytext/wrap.py",
     "if p.strip()]", "]",
     "fill(\"a\\n\\n\\n\\nb\", 5) keeps an empty paragraph: the result has extra blank lines "
     "where the input had several in a row."),
    ("slug-accents", "tinytext/slug.py",
     'unicodedata.normalize("NFKD", text)', 'unicodedata.normalize("NFC", text)',
     "slugify drops accented letters instead of folding them: slugify(\"Crème brûlée\") "
     "gives \"crme-brle\" instead of \"creme-brulee\"."),
    ("slug-separator", "tinytext/slug.py",
     "slug = separator.join(words)", 'slug = "-".join(words)',
     "slugify ignores its separator argument: slugify(\"a b c\", separator=\"_\") returns "
     "\"a-b-c\"."),
    ("slug-long-first-word", "tinytext/slug.py",
     "return words[0][:max_length]", "return words[0]",
     "slugify(\"Supercalifragilistic\", max_length=5) returns the whole word; a first word "
     "longer than max_length should be cut to max_length."),
    ("slug-max-length-boundary", "tinytext/slug.py",
     "if len(candidate) > max_length:", "if len(candidate) >= max_length:",
     "slugify with max_length drops a word that fits exactly: slugify(\"The quick brown "
     "fox\", max_length=15) should be \"the-quick-brown\" (15 characters)."),
    ("slug-lowercase", "tinytext/slug.py",
     "ascii_text.lower())", "ascii_text)",
     "slugify drops capitalised words: slugify(\"Hello World\") does not give "
     "\"hello-world\"."),
    ("stats-lowercase", "tinytext/stats.py",
     "return [w.lower() for w in _WORD.findall(text)]",
     "return [w for w in _WORD.findall(text)]",
     "stats.words() keeps capital letters; the words are documented as lower-cased."),
    ("stats-ties", "tinytext/stats.py",
     "key=lambda item: (-item[1], item[0])", "key=lambda item: (-item[1], item[0]), reverse=True",
     "top_words returns the least frequent words first, and ties come out in reverse "
     "alphabetical order."),
    ("stats-top-n", "tinytext/stats.py",
     "return ranked[:n]", "return ranked[:n + 1]",
     "top_words(text, n) returns one word too many."),
    ("stats-average-empty", "tinytext/stats.py",
     "    if not ws:\n        return 0.0\n", "",
     "average_word_length(\"\") raises ZeroDivisionError; a text without words should give "
     "0.0."),
    ("stats-average", "tinytext/stats.py",
     "return sum(len(w) for w in ws) / len(ws)", "return sum(len(w) for w in ws) / len(text)",
     "average_word_length(\"ab abcd\") is not 3.0: the mean seems to count the spaces."),
    ("stats-words", "tinytext/stats.py",
     "_WORD = re.compile(r\"[A-Za-z0-9']+\")", "_WORD = re.compile(r\"[A-Za-z0-9']\")",
     "word_count(\"one, two; three!\") is 11, not 3: it seems to count letters, not words."),
    ("case-camel-empty", "tinytext/case.py",
     "    if not words:\n        return \"\"\n", "",
     "camel_case(\"\") raises IndexError instead of returning \"\"."),
    ("case-camel-capitalize", "tinytext/case.py",
     'return words[0] + "".join(w.capitalize() for w in words[1:])',
     'return words[0] + "".join(w for w in words[1:])',
     "camel_case(\"hello_world_again\") returns \"helloworldagain\": the words after the "
     "first should be capitalised."),
    ("case-snake-separator", "tinytext/case.py",
     'return "_".join(split_words(name))', 'return "-".join(split_words(name))',
     "snake_case(\"HelloWorld\") returns \"hello-world\" with a dash instead of an "
     "underscore."),
    ("case-title", "tinytext/case.py",
     'return " ".join(w.capitalize() for w in split_words(name))',
     'return " ".join(split_words(name))',
     "title_case(\"some-kebab_name\") returns \"some kebab name\": each word should start "
     "with a capital letter."),
]


# `git diff -R` swaps the prefixes it prints; these give the usual a/ (old) and b/ (new).
REVERSED = ("-R", "--src-prefix=b/", "--dst-prefix=a/")


def git(*args, cwd, input=None):
    r = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"git {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def run_tests(repo):
    out = subprocess.run(["bash", "-c", SCRIPT], cwd=repo, capture_output=True, text=True)
    parsed = subprocess.run([sys.executable, "-c", PARSER], input=out.stdout + out.stderr,
                            capture_output=True, text=True, check=True)
    return json.loads(parsed.stdout)


def remove_tests(repo, failing):
    """Deletes the test methods named in `failing` (ids module.Class.method)."""
    by_file = {}
    for t in failing:
        module, cls, method = t.rsplit(".", 2)
        by_file.setdefault(module.replace(".", "/") + ".py", []).append((cls, method))
    for path, names in by_file.items():
        full = os.path.join(repo, path)
        src = open(full).read()
        lines = src.split("\n")
        spans = []
        for node in ast.parse(src).body:
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and (node.name, item.name) in names:
                        start = min([item.lineno] + [d.lineno for d in item.decorator_list]) - 1
                        end = item.end_lineno
                        # Take the blank line before the method with it.
                        if start > 0 and not lines[start - 1].strip():
                            start -= 1
                        spans.append((start, end))
        if len(spans) != len(names):
            sys.exit(f"{path}: could not find every test of {names}")
        for start, end in sorted(spans, reverse=True):
            del lines[start:end]
        open(full, "w").write("\n".join(lines))


def main():
    work = tempfile.mkdtemp(prefix="selfplay-sample-tasks-")
    try:
        generate(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def generate(work):
    repo = os.path.join(work, "repo")
    git("clone", "-q", BUNDLE, repo, cwd=work)
    base = git("rev-parse", "HEAD", cwd=repo).strip()
    clean = run_tests(repo)
    passing = {t for t, s in clean.items() if s == "passed"}
    if len(passing) < 10:
        sys.exit(f"only {len(passing)} tests pass on the clean repository")
    out = []
    for ident, path, old, new, issue in MUTATIONS:
        full = os.path.join(repo, path)
        src = open(full).read()
        if src.count(old) != 1:
            sys.exit(f"{ident}: {old!r} occurs {src.count(old)} times in {path}")
        open(full, "w").write(src.replace(old, new))
        bug = git("diff", cwd=repo)
        gold = git("diff", *REVERSED, cwd=repo)
        buggy = run_tests(repo)
        failing = sorted(t for t in passing if buggy.get(t) != "passed")
        if not failing:
            sys.exit(f"{ident}: the bug breaks no test")
        remove_tests(repo, failing)
        weakened = run_tests(repo)
        still = sorted(t for t in passing - set(failing) if weakened.get(t) != "passed")
        if still or any(t in weakened for t in failing):
            sys.exit(f"{ident}: the weakened suite does not hide the bug ({still})")
        test_files = sorted({t.rsplit(".", 2)[0].replace(".", "/") + ".py" for t in failing})
        test_patch = git("diff", *REVERSED, "--", *test_files, cwd=repo)
        git("reset", "-q", "--hard", cwd=repo)
        out.append({
            "instance_id": f"tinytext__{ident}",
            "repo": "selfplay/tinytext",
            "base_commit": base,
            "problem_statement": issue,
            "test_patch": test_patch,
            "patch": gold,
            "FAIL_TO_PASS": failing,
            "PASS_TO_PASS": sorted(passing - set(failing)),
            "selfplay": {
                "bug_patch": bug,
                "test_script": SCRIPT,
                "test_parser": PARSER,
            },
        })
    with open(OUT, "w") as f:
        for inst in out:
            f.write(json.dumps(inst, sort_keys=True) + "\n")
    print(f"{len(out)} instances → {OUT}")


if __name__ == "__main__":
    main()
