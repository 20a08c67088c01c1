#!/usr/bin/env python3
"""Does self-play help? Reproduces the demonstration in the README (see README.md here).

For each seed:
 1. warm start: `trainer sft` from a fresh tiny model on the scripted demonstrations
    (make_data.py), deliberately short so that the policy solves some bugs, not all;
 2. self-play: `trainer local` from the warm-started model on the minicalc repository, for
    --steps steps, a checkpoint every --eval-every steps;
 3. held-out evaluation: `trainer eval` of the warm start (step 0) and of every checkpoint on
    the held-out bugs (never demonstrated, never trained on), --attempts attempts per bug, the
    same attempt seeds for every checkpoint (so two points differ by the policy, not the draw).

Writes OUT/results.json (every number) and OUT/curve.svg (held-out solve rate per step, one
line per seed and their mean), and prints a table. Needs python3, git and the trainer binary
(--trainer, default: target/debug/trainer, built with `cargo build -p selfplay-trainer`).
"""
import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", "..", ".."))

RUN_TEMPLATE = """\
apiVersion: selfplay.dev/v1alpha1
kind: SelfPlayRun
metadata:
  name: {name}
spec:
  model:
    path: {model}
    dtype: f32
  pools:
    - name: minicalc
  selfPlay:
    alpha: 0.8
    solverGroupSize: {group}
    injectorEpisodesPerStep: {injectors}
    minPassingTests: 2
    maxTurns: 2
    maxTokens: 8192
    maxTokensPerTurn: 200
    temperature: 1.0
    topP: 1.0
    higherOrderBugs: false
    prompts: {prompts}
  training:
    learningRate: {lr}
    totalSteps: {steps}
    microBatchSize: 4
    seed: {seed}
    # A truncated episode is graded as it stands, success or failure alike. The default
    # (Mask) drops truncated successes but keeps truncated failures (so that stalling never
    # escapes a -1); with a policy that often fixes the module and then fails to write
    # <submit/>, that leaves only failures in the loss.
    truncation:
      mode: ForceSubmit
      discount: 1.0
  trainer:
    gpus: 0
    concurrency: 1
  checkpoint:
    everySteps: {every}
    keepLast: {keep}
---
apiVersion: selfplay.dev/v1alpha1
kind: SandboxPool
metadata:
  name: minicalc
spec:
  template:
    image: python:3.12-slim
    workdir: /workspace
  source:
    localPath: {repo}
  warm: 2
  max: 4
  commandTimeoutSeconds: 30
  testTimeoutSeconds: 60
"""


def run_prompts():
    """spec.selfPlay.prompts: the templates in prompts/ here, as one JSON (= YAML) object."""
    names = {"tools": "tools.md", "injector": "injector.md", "solver": "solver.md",
             "solverIssue": "solver_issue.md"}
    return json.dumps({k: open(os.path.join(HERE, "prompts", f)).read()
                       for k, f in names.items()}, sort_keys=True)


def run(cmd, log):
    """Runs `cmd`, its output appended to `log`; exits with the log's tail on failure."""
    started = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        tail = open(log).read()[-3000:]
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{tail}")
    return time.time() - started


def evaluate(args, spec, model, tasks, seed, out_json, log):
    if os.path.exists(out_json):
        report = json.load(open(out_json))
        return summarize_eval(report, 0.0)
    # The run's episode budgets and sampling settings, so evaluation plays as training does.
    cmd = [args.trainer, "eval", "--run", spec, "--model", model, "--tasks", tasks,
           "--repo", args.repo,
           "--attempts", str(args.attempts), "--k", "1", "--seed", str(seed), "--json"]
    started = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, cwd=ROOT, text=True)
    if p.returncode != 0:
        sys.exit(f"trainer eval failed ({p.returncode}); see {log}")
    with open(out_json, "w") as f:
        f.write(p.stdout)
    return summarize_eval(json.loads(p.stdout), time.time() - started)


def summarize_eval(report, seconds):
    return {"solve_rate": report["solve_rate"], "solved": report["solved"],
            "attempts": report["attempts"], "seconds": seconds,
            "per_task": {t["id"]: [t["solved"], t["attempts"]] for t in report["tasks"]}}


def changed_lines(diff):
    """A diff's removed and added lines: two diffs of the same bug agree on these whatever
    their index lines say."""
    return tuple(l for l in (diff or "").splitlines()
                 if l[:1] in "+-" and not l.startswith(("+++", "---")))


def selfplay_bugs(selfplay_dir, heldout_path):
    """The valid bugs self-play made: how many, how many distinct, and which of them are
    held-out bugs (then the held-out set would not be held out)."""
    heldout = {changed_lines(json.loads(l)["selfplay"]["bug_patch"]): json.loads(l)["instance_id"]
               for l in open(heldout_path)}
    valid, distinct, leaked = 0, set(), set()
    episodes = os.path.join(selfplay_dir, "episodes")
    for step in sorted(os.listdir(episodes)):
        for line in open(os.path.join(episodes, step, "episodes.jsonl")):
            rec = json.loads(line)
            inj = rec.get("injector")
            if rec.get("role") != "injector" or not inj or not inj.get("valid"):
                continue
            valid += 1
            key = changed_lines(inj["artifacts"].get("bug_inject_diff"))
            distinct.add(key)
            if key in heldout:
                leaked.add(heldout[key])
    return {"valid": valid, "distinct": len(distinct), "heldout_made": sorted(leaked)}


def svg_curve(results, path, title):
    """A line chart without plotting libraries: one thin line per seed, the mean thick."""
    w, h, left, right, top, bottom = 640, 360, 56, 16, 36, 44
    steps = sorted({s for r in results for s in r["heldout"]})
    xmax = max(steps) or 1

    def x(s):
        return left + (w - left - right) * s / xmax

    def y(v):
        return top + (h - top - bottom) * (1 - v)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>']
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{left}" x2="{w - right}" y1="{y(v)}" y2="{y(v)}" '
                   f'stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y(v) + 4}" text-anchor="end">{v:.2f}</text>')
    for s in steps:
        out.append(f'<text x="{x(s)}" y="{h - bottom + 16}" text-anchor="middle">{s}</text>')
    out.append(f'<text x="{(left + w - right) / 2}" y="{h - 8}" text-anchor="middle">'
               f'self-play step (0 = warm start)</text>')
    out.append(f'<text x="14" y="{(top + h - bottom) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 14 {(top + h - bottom) / 2})">held-out solve rate</text>')
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, r in enumerate(results):
        pts = " ".join(f"{x(int(s))},{y(v)}" for s, v in sorted(
            ((int(k), v) for k, v in r["heldout"].items())))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colours[i % 6]}" '
                   f'stroke-width="1.2" opacity="0.7"/>')
    mean = [(s, statistics.mean(r["heldout"][s] for r in results if s in r["heldout"]))
            for s in steps]
    pts = " ".join(f"{x(int(s))},{y(v)}" for s, v in mean)
    out.append(f'<polyline points="{pts}" fill="none" stroke="black" stroke-width="3"/>')
    out.append(f'<text x="{w - right - 4}" y="{top + 14}" text-anchor="end">black: mean of '
               f'{len(results)} seeds; colours: each seed</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "selfplay-demo"))
    ap.add_argument("--trainer", default=os.path.join(ROOT, "target", "debug", "trainer"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sft-steps", type=int, default=500,
                    help="updates of the warm start's schedule (warmup, cosine decay)")
    ap.add_argument("--sft-take", type=int, default=260,
                    help="the warm start is the checkpoint after this many updates: "
                    "deliberately partway, where the solver solves some bugs, not all")
    ap.add_argument("--sft-lr", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=30, help="self-play steps")
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--lr", type=float, default=2e-4, help="self-play learning rate")
    ap.add_argument("--group", type=int, default=4, help="solver attempts per bug")
    ap.add_argument("--injectors", type=int, default=4, help="injector episodes per step")
    ap.add_argument("--attempts", type=int, default=4, help="evaluation attempts per bug")
    ap.add_argument("--jobs", type=int, default=2, help="seeds run at once")
    ap.add_argument("--skip-train-bugs", action="store_true",
                    help="evaluate on the held-out bugs only")
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    args.trainer = os.path.abspath(args.trainer)
    os.makedirs(args.out, exist_ok=True)
    data = os.path.join(args.out, "data")
    run([sys.executable, os.path.join(HERE, "make_data.py"), "--out", data],
        os.path.join(args.out, "log.txt"))
    args.repo = os.path.join(data, "repo")
    heldout = os.path.join(data, "heldout.jsonl")
    train_bugs = os.path.join(data, "train-bugs.jsonl")

    def one_seed(seed):
        d = os.path.join(args.out, f"seed-{seed}")
        os.makedirs(d, exist_ok=True)
        log = os.path.join(d, "log.txt")
        r = {"seed": seed, "heldout": {}, "train_bugs": {}, "seconds": {}}
        sft = os.path.join(d, "sft")
        warm = os.path.join(sft, "checkpoints", f"step-{args.sft_take}")
        # Each stage is skipped when its output is there: an interrupted run goes on.
        if not os.path.isdir(warm):
            r["seconds"]["sft"] = run([
                args.trainer, "sft", "--tiny", f"{seed},{args.hidden},{args.layers}",
                "--data", os.path.join(data, "sft.jsonl"), "--out", sft,
                "--steps", str(args.sft_steps), "--lr", str(args.sft_lr), "--warmup", "10",
                "--batch-size", "8", "--micro-batch-size", "8", "--seed", str(seed),
                "--checkpoint-every", str(args.sft_take), "--keep-last", "0",
                *(["--resume"] if os.path.isdir(os.path.join(sft, "checkpoints")) else [])],
                log)
        spec = os.path.join(d, "run.yaml")
        with open(spec, "w") as f:
            f.write(RUN_TEMPLATE.format(
                name=f"selfplay-demo-{seed}", model=warm,
                group=args.group, injectors=args.injectors, lr=args.lr, steps=args.steps,
                seed=seed, every=args.eval_every, repo=args.repo,
                keep=args.steps // args.eval_every + 1, prompts=run_prompts()))
        selfplay = os.path.join(d, "selfplay")
        status = os.path.join(selfplay, "status.json")
        if not (os.path.exists(status) and json.load(open(status)).get("step") == args.steps):
            r["seconds"]["selfplay"] = run([
                args.trainer, "local", spec, "--out", selfplay, "--no-metrics",
                *(["--resume"] if os.path.isdir(os.path.join(selfplay, "checkpoints")) else [])],
                log)
        models = {0: warm}
        for s in range(args.eval_every, args.steps + 1, args.eval_every):
            models[s] = os.path.join(selfplay, "checkpoints", f"step-{s}")
        r["seconds"]["eval"] = 0.0
        for s, model in models.items():
            # The same evaluation seed at every step: the attempts differ only by the policy.
            e = evaluate(args, spec, model, heldout, 1000 + seed,
                         os.path.join(d, f"eval-heldout-{s}.json"), log)
            r["heldout"][s] = e["solve_rate"]
            r.setdefault("heldout_detail", {})[s] = e
            r["seconds"]["eval"] += e["seconds"]
            if not args.skip_train_bugs and s in (0, args.steps):
                t = evaluate(args, spec, model, train_bugs, 2000 + seed,
                             os.path.join(d, f"eval-train-{s}.json"), log)
                r["train_bugs"][s] = t["solve_rate"]
                r["seconds"]["eval"] += t["seconds"]
        r["final_status"] = json.load(open(os.path.join(selfplay, "status.json")))
        r["selfplay_bugs"] = selfplay_bugs(selfplay, heldout)
        print(f"seed {seed}: held-out " + ", ".join(
            f"step {s}: {v:.3f}" for s, v in sorted(r["heldout"].items())), flush=True)
        return r

    seeds = [int(s) for s in args.seeds.split(",")]
    # Seeds are independent runs; on two cores two at a time use both (each is mostly one
    # thread: a tiny model, sandboxes and test runs).
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one_seed, seeds))

    before = [r["heldout"][0] for r in results]
    after = [r["heldout"][args.steps] for r in results]
    summary = {
        "config": {k: v for k, v in vars(args).items()},
        "seeds": results,
        "heldout_before": before,
        "heldout_after": after,
        "heldout_gain": [a - b for a, b in zip(after, before)],
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    svg_curve(results, os.path.join(args.out, "curve.svg"),
              "Held-out solve rate during self-play (minicalc, tiny model, CPU)")

    def ms(xs):
        return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 \
            else f"{xs[0]:.3f}"

    print(f"\n{'seed':>6} {'before':>8} {'after':>8} {'gain':>8}")
    for r, b, a in zip(results, before, after):
        print(f"{r['seed']:>6} {b:>8.3f} {a:>8.3f} {a - b:>+8.3f}")
    print(f"{'mean':>6} {ms(before):>8} → {ms(after)} (gain {ms(summary['heldout_gain'])})")
    for r in results:
        b = r["selfplay_bugs"]
        print(f"seed {r['seed']}: self-play made {b['valid']} valid bugs ({b['distinct']} distinct); "
              f"held-out bugs among them: {', '.join(b['heldout_made']) or 'none'}; "
              f"demonstrated bugs before → after: {r['train_bugs'].get(0, float('nan')):.3f} → "
              f"{r['train_bugs'].get(args.steps, float('nan')):.3f}")
    print(f"results: {os.path.join(args.out, 'results.json')}, curve: "
          f"{os.path.join(args.out, 'curve.svg')}")


if __name__ == "__main__":
    main()
