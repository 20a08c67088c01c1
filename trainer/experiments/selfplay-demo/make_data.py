#!/usr/bin/env python3
"""Builds everything the self-play demonstration needs under OUT (default: out/selfplay-demo/data).

- `repo/`: the `minicalc/` repository next to this script, as a git repository with one
  commit (the pool's sandboxes copy it).
- `sft.jsonl`: scripted demonstrations in the chat format `trainer sft` reads: for every
  TRAIN mutation below, one injector episode (it injects that bug and writes the five
  artifacts) and one solver episode (it fixes the bug by rewriting the broken module; a
  second one when `trainer eval`'s prompt differs from self-play's).
- `heldout.jsonl`: the HELDOUT mutations as SWE-bench-style instances (`trainer eval`'s
  format, docs/evaluation.md). No demonstration shows them, and no demonstration injects them.
- `train-bugs.jsonl`: the TRAIN mutations in the same format (to evaluate on what was
  demonstrated, for comparison).

Every bug is measured on a real clone: the test suite passes on the clean code and the bug
makes at least one test fail; FAIL_TO_PASS and PASS_TO_PASS come from those runs.

The prompts are the run's templates (prompts/ here, given to the run as
`spec.selfPlay.prompts`; the bundled trainer/prompts/ for the rest), rendered as the engine
renders them, so the demonstrations are in the distribution the policy meets in self-play.
Python 3 and git only.
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BUNDLED_PROMPTS = os.path.normpath(os.path.join(HERE, "..", "..", "prompts"))
# The run's own templates (spec.selfPlay.prompts): short, so that a tiny model on two CPU
# cores reads a few hundred tokens per turn instead of thousands. Missing files: bundled.
PROMPTS = os.path.join(HERE, "prompts")
SOURCE = os.path.join(HERE, "minicalc")

# (id, module, old, new): `sed -i 's|old|new|' module` makes the bug (first match per line).
TRAIN = [
    ("arith-add-minus", "calc/arith.py", "a + b", "a - b"),
    ("arith-sub-swap", "calc/arith.py", "a - b", "b - a"),
    ("compare-larger-flip", "calc/compare.py", "a > b", "a < b"),
    ("compare-smaller-flip", "calc/compare.py", "a < b", "a > b"),
    ("seq-mean-times", "calc/seq.py", "sum(xs) / len(xs)", "sum(xs) * len(xs)"),
    ("seq-total-max", "calc/seq.py", "return sum(xs)$", "return max(xs)"),
    ("text-shout-lower", "calc/text.py", "upper()", "lower()"),
    ("text-whisper-dot", "calc/text.py", '"..."', '"."'),
]
HELDOUT = [
    ("arith-add-times", "calc/arith.py", "a + b", "a * b"),
    ("arith-sub-plus", "calc/arith.py", "a - b", "a + b"),
    ("compare-else-a", "calc/compare.py", "else b", "else a"),
    ("compare-smaller-b", "calc/compare.py", "a if a <", "b if a <"),
    ("seq-mean-half", "calc/seq.py", "/ len(xs)", "/ 2"),
    ("seq-len", "calc/seq.py", "sum(xs)", "len(xs)"),
    ("text-shout-question", "calc/text.py", '+ "!"', '+ "?"'),
    ("text-whisper-title", "calc/text.py", "s.lower()", "s.title()"),
]

ARTIFACTS = ".selfplay"
REVERSED_PREFIXES = ("--src-prefix=b/", "--dst-prefix=a/")
SCRIPT = "ci/run_tests.sh"
PARSER = "ci/parse.py"


def sh(cwd, *args, check=True):
    return subprocess.run(args, cwd=cwd, check=check, capture_output=True, text=True).stdout


def git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="selfplay", GIT_AUTHOR_EMAIL="demo@selfplay.dev",
               GIT_COMMITTER_NAME="selfplay", GIT_COMMITTER_EMAIL="demo@selfplay.dev",
               GIT_AUTHOR_DATE="2026-01-01T00:00:00Z", GIT_COMMITTER_DATE="2026-01-01T00:00:00Z")
    return subprocess.run(("git",) + args, cwd=cwd, check=True, capture_output=True,
                          text=True, env=env).stdout


def make_repo(dest):
    shutil.copytree(SOURCE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "minicalc")
    return git(dest, "rev-parse", "HEAD").strip()


def test_results(repo):
    out = subprocess.run(["bash", SCRIPT], cwd=repo, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1")).stdout
    parsed = subprocess.run([sys.executable, PARSER], cwd=repo, input=out, capture_output=True,
                            text=True, check=True).stdout
    return json.loads(parsed)


def test_file_of(module):
    return "tests/test_" + os.path.basename(module)


def injector_command(module, old, new):
    """The scripted injector's one bash call: the repository's helper (minicalc/ci/inject.sh)
    writes the harness, the bug, the weakening and the test file list."""
    return f"bash ci/inject.sh {module} {shlex.quote(old)} {shlex.quote(new)}"


def measure(repo, bug):
    """Runs the scripted injector's command in a clone; returns what an instance needs."""
    bug_id, module, old, new = bug
    with tempfile.TemporaryDirectory(prefix="selfplay-demo-") as tmp:
        clone = os.path.join(tmp, "repo")
        git(tmp, "clone", "-q", repo, clone)
        before = test_results(clone)
        passing = sorted(t for t, s in before.items() if s == "passed")
        subprocess.run(["bash", "-c", injector_command(module, old, new)], cwd=clone,
                       check=True, capture_output=True)
        art = os.path.join(clone, ARTIFACTS)
        bug_diff = open(os.path.join(art, "bug_inject.diff")).read()
        weaken = open(os.path.join(art, "test_weaken.diff")).read()
        if not bug_diff.strip():
            sys.exit(f"{bug_id}: sed changed nothing in {module}")
        # The restoring diff, as the engine reverses the weakening (`git diff -R`, with the
        # prefixes swapped back so that it reads a/ → b/ as the engine prints it).
        test_patch = git(clone, "diff", "-R", *REVERSED_PREFIXES, "--", "tests")
        git(clone, "checkout", "-q", "--", "tests")
        after = test_results(clone)
        fail_to_pass = sorted(t for t in passing if after.get(t) != "passed")
        if not fail_to_pass:
            sys.exit(f"{bug_id}: the bug breaks no test")
        gold = git(clone, "diff", "-R", *REVERSED_PREFIXES, "--", "calc")
    return {
        "bug_diff": bug_diff,
        "weaken": weaken,
        "test_patch": test_patch,
        "gold": gold,
        "fail_to_pass": fail_to_pass,
        "pass_to_pass": [t for t in passing if t not in fail_to_pass],
    }


def render(template, values):
    """The engine's `render`: `{{name}}` replaced in one pass."""
    out, rest = [], template
    while "{{" in rest:
        i = rest.index("{{")
        out.append(rest[:i])
        j = rest.index("}}", i)
        out.append(values[rest[i + 2:j].strip()])
        rest = rest[j + 2:]
    out.append(rest)
    return "".join(out)


def prompt(name):
    own = os.path.join(PROMPTS, name)
    return open(own if os.path.exists(own) else os.path.join(BUNDLED_PROMPTS, name)).read()


TOOLS = prompt("tools.md").rstrip()


def solver_task(task_diff):
    return render(prompt("solver.md"), {"tools": TOOLS, "task_diff": task_diff.rstrip()})


def problem_statement(task_diff):
    """What an evaluated solver is shown: the restored tests, as self-play's solver sees them
    (prompts/solver_issue.md around it then renders exactly prompts/solver.md's text)."""
    return "```diff\n" + task_diff.rstrip() + "\n```"


def issue_task(statement):
    return render(prompt("solver_issue.md"), {"tools": TOOLS, "problem_statement": statement.rstrip()})


def injector_task(min_passing, min_failing, min_files):
    return render(prompt("injector.md"), {
        "tools": TOOLS, "artifacts_dir": ARTIFACTS, "min_passing_tests": str(min_passing),
        "min_failing_tests": str(min_failing), "min_changed_files": str(min_files)})


def observation(output):
    # The budget notice's numbers differ from episode to episode; the demonstrations carry a
    # typical one (the policy's next turn does not depend on it here).
    return render(prompt("observation.md"),
                  {"output": output, "budget": "[budget: 2 turns left, 6000 tokens left]"})


def create_call(repo, module):
    content = open(os.path.join(repo, module)).read()
    return f'<create path="{module}">\n{content}</create>'


def solver_demo(task, repo, module):
    content = open(os.path.join(repo, module)).read()
    return {"messages": [
        {"role": "user", "content": task},
        {"role": "assistant", "content": create_call(repo, module)},
        {"role": "user", "content": observation(f"wrote {module} ({len(content)} bytes)")},
        {"role": "assistant", "content": "<submit/>"},
    ]}


def injector_demo(task, bug):
    _, module, old, new = bug
    return {"messages": [
        {"role": "user", "content": task},
        {"role": "assistant", "content": f"<bash>\n{injector_command(module, old, new)}\n</bash>"},
        {"role": "user", "content": observation("[exit code 0]")},
        {"role": "assistant", "content": "<submit/>"},
    ]}


def instance(bug, m, base_commit, repo):
    bug_id, module, _, _ = bug
    return {
        "instance_id": f"minicalc__{bug_id}",
        "repo": "selfplay/minicalc",
        "base_commit": base_commit,
        "problem_statement": problem_statement(m["test_patch"]),
        "test_patch": m["test_patch"],
        "patch": m["gold"],
        "FAIL_TO_PASS": m["fail_to_pass"],
        "PASS_TO_PASS": m["pass_to_pass"],
        "selfplay": {
            "bug_patch": m["bug_diff"],
            "test_script": open(os.path.join(repo, SCRIPT)).read(),
            "test_parser": open(os.path.join(repo, PARSER)).read(),
            "test_files": [test_file_of(module)],
        },
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/selfplay-demo/data")
    ap.add_argument("--min-passing-tests", type=int, default=2)
    ap.add_argument("--min-failing-tests", type=int, default=1)
    ap.add_argument("--min-changed-files", type=int, default=1)
    ap.add_argument("--injector-repeat", type=int, default=4,
                    help="copies of each injector demonstration: the injector's command is "
                    "longer than the solver's answer, so it gets more updates, and self-play "
                    "starts with bugs to solve while the solver still fails some")
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    repo = os.path.join(out, "repo")
    head = make_repo(repo)

    inj_task = injector_task(args.min_passing_tests, args.min_failing_tests,
                             args.min_changed_files)
    demos, heldout, train = [], [], []
    for bug in TRAIN:
        m = measure(repo, bug)
        task_diff = m["test_patch"]
        demos.extend([injector_demo(inj_task, bug)] * args.injector_repeat)
        demos.append(solver_demo(solver_task(task_diff), repo, bug[1]))
        if issue_task(problem_statement(task_diff)) != solver_task(task_diff):
            demos.append(solver_demo(issue_task(problem_statement(task_diff)), repo, bug[1]))
        train.append(instance(bug, m, head, repo))
    for bug in HELDOUT:
        heldout.append(instance(bug, measure(repo, bug), head, repo))

    def write(name, rows):
        with open(os.path.join(out, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")

    write("sft.jsonl", demos)
    write("heldout.jsonl", heldout)
    write("train-bugs.jsonl", train)
    print(f"{out}: {len(demos)} demonstrations, {len(heldout)} held-out and {len(train)} "
          f"demonstrated bugs; repository at {head[:12]}")


if __name__ == "__main__":
    main()
