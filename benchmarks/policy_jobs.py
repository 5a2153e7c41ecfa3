"""How long a policy job takes as the scheduler runs it: new PPO actors for every job, against
actors kept between jobs (``policy.keep_actors``).

    python benchmarks/policy_jobs.py [--base DIR] [--jobs 3] [--steps 40] [--no-preload] [--out FILE]

1. The base: ``--base`` (e.g. a demo workspace's ``ws/base``), else the ``looprl init`` base, built
   in a temporary directory.
2. One local Ray and the scheduler's ``RayRunner``, as ``looprl demo`` runs them. Each job is the
   command the scheduler submits, ``looprl policy train --new`` with the demo's policy settings
   (``ops.demo.tuning_env``), a new seed per job as the scheduler gives, and the programmatic
   cheerful-word reward (no reward model to train first).
3. ``--jobs`` jobs with ``policy.keep_actors`` off, then ``--jobs`` + 1 with it on (the first of those
   starts the actors it keeps).

Prints each job's wall time (submission to result) and the time its PPO steps took (from the job's
log); the figure is the ratio of the median wall times, new actors / kept actors (the first kept
job excluded). Each job's worker is started, and imports ``scheduler.preload_modules``, while the job
before it runs, as in the scheduler; ``--no-preload`` leaves the imports to each job, for the
comparison. Last line one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from offpolicy import build_base  # noqa: E402  (benchmarks/ is the script's directory)


def step_seconds(log_text: str) -> float:
    """The PPO steps' time in a job's log: the sum of its "ppo step" records' step_s."""
    total = 0.0
    for line in log_text.splitlines():
        if '"ppo step"' not in line:
            continue
        try:
            total += float(json.loads(line[line.index("{"):]).get("step_s", 0.0))
        except (ValueError, json.JSONDecodeError):
            continue
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, help="a base model directory (default: build the looprl init base)")
    ap.add_argument("--jobs", type=int, default=3, help="jobs per mode (the kept mode runs one more)")
    ap.add_argument("--steps", type=int, default=40, help="PPO steps per job (the demo's policy.steps)")
    ap.add_argument("--no-preload", action="store_true",
                    help="scheduler.preload_modules = []: each job imports torch, transformers and the trainer itself")
    ap.add_argument("--out", type=Path, help="also write the JSON figures here")
    args = ap.parse_args()

    from looprl.ops.core.config import load_config
    from looprl.ops.core.log import setup_logging
    from looprl.ops.demo import tuning_env
    from looprl.ops.runners import RayRunner

    setup_logging("WARNING")
    work = Path(tempfile.mkdtemp(prefix="looprl-bench-jobs-"))
    runner = None
    try:
        base = args.base.resolve() if args.base else build_base(work, quick=False)
        ws = work / "ws"
        cfg = load_config(environ={}, workspace=ws, model={"base_path": str(base)},
                          **({"scheduler": {"preload_modules": []}} if args.no_preload else {}))
        env = {k: v for k, v in tuning_env(cfg).items() if k.startswith("LOOPRL_POLICY__")}
        env |= {"LOOPRL_MODEL__BASE_PATH": str(base), "LOOPRL_POLICY__STEPS": str(args.steps),
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "looprl.ops.entry", "--workspace", str(ws), "policy", "train", "--new",
                   "--scorer", "cheerful", "--metrics-port", "0"]
        t0 = time.perf_counter()
        runner = RayRunner(cfg, ws / "logs")
        ray_start = time.perf_counter() - t0
        log_path = ws / "logs" / "job-policy.log"

        rows = []
        plan = [("new", i) for i in range(args.jobs)] + [("kept", i) for i in range(args.jobs + 1)]
        for seed, (mode, i) in enumerate(plan):
            job_env = env | {"LOOPRL_POLICY__KEEP_ACTORS": "true" if mode == "kept" else "false",
                             "LOOPRL_POLICY__SEED": str(1000 + seed)}
            start = log_path.stat().st_size if log_path.exists() else 0
            t = time.perf_counter()
            result = runner.submit("policy", command, job_env, timeout_s=900).result()
            wall = time.perf_counter() - t
            if result.returncode != 0:
                print(f"job {mode} {i} failed (exit {result.returncode}):\n{result.output_tail}", file=sys.stderr)
                return 1
            with open(log_path, "rb") as f:
                f.seek(start)
                steps_s = step_seconds(f.read().decode(errors="replace"))
            rows.append({"mode": mode, "job": i, "wall_s": round(wall, 2), "ppo_steps_s": round(steps_s, 2),
                         "version": result.details.get("version")})
            print(f"{mode:>4} job {i}: {wall:6.1f} s, of which PPO steps {steps_s:5.1f} s", flush=True)

        new = [r["wall_s"] for r in rows if r["mode"] == "new"]
        kept = [r["wall_s"] for r in rows if r["mode"] == "kept"][1:]
        figures = {
            "benchmark": "policy_jobs",
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "steps_per_job": args.steps, "jobs_per_mode": args.jobs, "ray_start_s": round(ray_start, 2),
            "preload_modules": cfg.scheduler.preload_modules,
            "new_actors_median_s": statistics.median(new),
            "kept_actors_median_s": statistics.median(kept),
            "first_kept_job_s": [r["wall_s"] for r in rows if r["mode"] == "kept"][0],
            "ppo_steps_median_s": statistics.median(r["ppo_steps_s"] for r in rows),
            "speedup_kept_over_new": round(statistics.median(new) / statistics.median(kept), 3),
            "jobs": rows,
        }
        print(f"median job: new actors {figures['new_actors_median_s']:.1f} s, kept actors "
              f"{figures['kept_actors_median_s']:.1f} s ({figures['speedup_kept_over_new']:.2f}x); "
              f"PPO steps {figures['ppo_steps_median_s']:.1f} s")
        if args.out:
            args.out.write_text(json.dumps(figures, indent=1) + "\n")
        print(json.dumps(figures))
        return 0
    finally:
        if runner is not None:
            runner.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
