"""Named defects, made again and again: each a small edit to a scratch copy of HEAD, then the test
files that must catch it. Not in CI (minutes per defect on 2 cores); run it after changing a test
that one of them names, or a line one of them edits.

    python benchmarks/defects.py                       # every defect
    python benchmarks/defects.py --only noise          # the defects whose name contains 'noise'
    python benchmarks/defects.py --list                # names, files and tests, nothing run

mutmut (``benchmarks/mutation.sh``) makes small random edits; these are the defects a user would hit
that an audit of the suite once found it blind to, kept so that a later change of the tests cannot
quietly lose them again. Each is made in its own copy of HEAD (``git archive``), so the working tree
is never touched, and its tests run with ``-x``: the first failing test kills the defect (its id is
reported); a defect survives when every listed test passes. Writes
``benchmarks/results/mutation/defects.txt`` (or ``--out``). ``tests/test_benchmark_smoke.py``
checks that every edit still applies to the source and every listed test file exists.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation" / "defects.txt"
MODEL_TESTS = {
    "sd": "tests/test_core.py",
    "controlnet": "tests/test_models_controlnet.py",
    "if": "tests/test_models_if.py",
    "sdxl-img2img-inpaint": "tests/test_models_variants.py",
    "video": "tests/test_models_video.py",
    "dit-pixart": "tests/test_models_dit.py",
    "mmdit": "tests/test_models_mmdit.py",
}


@dataclass(frozen=True)
class Defect:
    """``old`` (found exactly once in ``path``) replaced by ``new``; ``tests`` (files or pytest node
    ids) must catch it."""

    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]

    def apply(self, root: Path) -> None:
        file = root / self.path
        text = file.read_text()
        if text.count(self.old) != 1:
            raise ValueError(
                f"{self.name}: the edit's text occurs {text.count(self.old)} times in {self.path} "
                "(must be once); update the defect to the source."
            )
        file.write_text(text.replace(self.old, self.new))


NOISE = [
    Defect(
        f"noise-injection-wrong-tensor[{family}]",
        "prior noise injection adds alpha * z_t instead of alpha * z_T",
        "distfd/engine.py",
        "sample = sample + self.config.noise_alpha * run.z_T",
        "sample = sample + self.config.noise_alpha * sample",
        (tests,),
    )
    for family, tests in MODEL_TESTS.items()
]

# Encoder modules that hand on the last block's output (DiT, PixArt, MMDiT) compute anyway at
# non-key steps and throw the result away: the image is unchanged, no work is saved.
ENCODER_EVERY_STEP = [
    Defect(
        f"encoder-runs-at-every-step[{family}]",
        "the patch embedding and encoder blocks re-run (and are discarded) at non-key steps",
        "distfd/engine.py",
        "            mod = self.modules[index]\n            cached = run.features[index] if mod.keep",
        "            mod = self.modules[index]\n            if not mod.keep:\n"
        "                original(*args, **kwargs)\n            cached = run.features[index] if mod.keep",
        (MODEL_TESTS[family],),
    )
    for family in ("dit-pixart", "mmdit")
]

DEFECTS: tuple[Defect, ...] = (
    *NOISE,
    *ENCODER_EVERY_STEP,
    Defect(
        "encoder-runs-at-every-step[unet]",
        "the UNet's encoder modules re-run (and are discarded) at non-key steps",
        "distfd/engine.py",
        "            mod = self.modules[index]\n            cached = run.features[index] if mod.keep",
        "            mod = self.modules[index]\n            original(*args, **kwargs)\n"
        "            cached = run.features[index] if mod.keep",
        ("tests/test_core.py",),
    ),
    Defect(
        "scheduler-ignored",
        "--scheduler is never swapped in: the model's own scheduler runs",
        "distfd/session.py",
        "        samplers.set_scheduler(pipe, self.scheduler)\n",
        "        pass\n",
        ("tests/test_cli_effects.py", "tests/test_cli.py"),
    ),
    Defect(
        "compare-times-distfd-against-itself",
        "--compare's vanilla side is the distfd request",
        "distfd/cli/generate.py",
        'vanilla = dataclasses.replace(fast, mode="off", key_steps=None)',
        "vanilla = fast",
        ("tests/test_cli_effects.py",),
    ),
    Defect(
        "lost-rank-found-in-3x-timeout[collectives]",
        "the process group's collective timeout is 3x --timeout",
        "distfd/runtime.py",
        "timeout=timedelta(seconds=timeout_s),",
        "timeout=timedelta(seconds=3 * timeout_s),",
        ("tests/test_distributed.py",),
    ),
    Defect(
        "lost-rank-found-in-3x-timeout[service heartbeat]",
        "the service counts a rank lost after 3x --timeout of silence",
        "distfd/pool/coordinator.py",
        "if now - self._heard[rank] > self.timeout_s:",
        "if now - self._heard[rank] > 3 * self.timeout_s:",
        ("tests/test_serve_mechanics.py", "tests/test_serve.py"),
    ),
    Defect(
        "batch-failed-image-exits-0",
        "a batch line that fails during generation no longer makes the job exit 1",
        "distfd/cli/batch.py",
        "return max(code, 1 if writer.failed or problems else 0)",
        "return max(code, 1 if problems else 0)",
        ("tests/test_cli_batch.py",),
    ),
    Defect(
        "batch-line-limits-removed",
        "a batch line's size, steps and prompt length are not bounded",
        "distfd/cli/generate.py",
        "    limits = limits_from_args(args, key_step_files=args.allow_key_step_files)\n",
        "    limits = limits_from_args(args, key_step_files=args.allow_key_step_files)\n"
        "    limits = type(limits)(10**12, 10**9, 10**9, limits.key_step_files)\n",
        ("tests/test_cli_batch.py",),
    ),
    Defect(
        "batch-key-step-files-always-allowed",
        "a batch line may name a key-step file without --allow-key-step-files",
        "distfd/cli/generate.py",
        "limits = limits_from_args(args, key_step_files=args.allow_key_step_files)",
        "limits = limits_from_args(args, key_step_files=True)",
        ("tests/test_cli_batch.py",),
    ),
    Defect(
        "batch-key-without-guidance",
        "requests differing only in guidance_scale share one call (--max-batch)",
        "distfd/session.py",
        "if f.name not in PER_IMAGE_FIELDS\n",
        'if f.name not in (*PER_IMAGE_FIELDS, "guidance_scale")\n',
        ("tests/test_serve_mechanics.py",),
    ),
    Defect(
        "cancel-one-stops-the-shared-call",
        "cancelling one request of a shared call stops the whole call",
        "distfd/pool/coordinator.py",
        "all(j.cancel_reason is not None for j in running.jobs)",
        "any(j.cancel_reason is not None for j in running.jobs)",
        ("tests/test_serve_mechanics.py",),
    ),
    Defect(
        "batched-images-take-the-first-seed",
        "every image of a shared call uses the first request's seed",
        "distfd/session.py",
        'torch.Generator("cpu").manual_seed(r.seed) for r in reqs]',
        'torch.Generator("cpu").manual_seed(reqs[0].seed) for r in reqs]',
        ("tests/test_groups.py::test_max_batch_makes_lines_in_one_call_and_each_image_as_made_alone",),
    ),
    Defect(
        "second-group-makes-another-image",
        "a group other than the first makes its images with another seed",
        "distfd/pool/worker.py",
        "results = self.session.run_many(list(run.requests), ctx=ctx, cancelled=check)",
        "results = self.session.run_many([r if run.ranks[0] == 0 else __import__('dataclasses')"
        ".replace(r, seed=r.seed + 1) for r in run.requests], ctx=ctx, cancelled=check)",
        ("tests/test_groups.py",),
    ),
    Defect(
        "key-steps-string-reads-no-sign",
        "'0,-3,5' is read as text, so it gets another message than the list [0, -3, 5]",
        "distfd/keysteps.py",
        'body = item[1:] if item[:1] in ("+", "-") else item',
        "body = item",
        ("tests/test_keysteps.py",),
    ),
    Defect(
        "clip-score-pairs-images-with-other-prompts",
        "the CLIP score compares each image with another image's prompt",
        "distfd/quality/evaluators.py",
        "cos = F.cosine_similarity(img, txt, dim=-1)",
        "cos = F.cosine_similarity(img, txt.flip(0), dim=-1)",
        ("tests/test_quality.py",),
    ),
)


def first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found.group(1) if found else "-"


def run(defect: Defect, timeout_s: float) -> tuple[str, str, float]:
    """(killed | survived | error | timeout, the first failing test or why, seconds)."""
    with tempfile.TemporaryDirectory(prefix="distfd-defect-") as work:
        root = Path(work)
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", work], input=archive.stdout, check=True)
        defect.apply(root)
        env = {**os.environ, "PYTHONPATH": work}
        where = subprocess.run(
            [sys.executable, "-c", "import distfd; print(distfd.__file__)"],
            cwd=work, env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        if not where.startswith(work):
            return "error", f"distfd imported from {where}, not the copy", 0.0
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *defect.tests]
        start = time.monotonic()
        try:
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout", f"tests ran past {timeout_s:.0f}s", time.monotonic() - start
        seconds = time.monotonic() - start
        if done.returncode == 0:
            return "survived", "every test passed", seconds
        if done.returncode == 1:
            return "killed", first_failure(done.stdout), seconds
        return "error", f"pytest exit {done.returncode}: {done.stdout[-300:]!r}", seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=[""], help="run the defects whose name contains one of these")
    p.add_argument("--list", action="store_true", help="list the defects and exit")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per defect's tests")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    chosen = [d for d in DEFECTS if any(text in d.name for text in args.only)]
    if not chosen:
        p.error(f"no defect's name contains any of {args.only}; see --list.")
    if args.list:
        for d in chosen:
            print(f"{d.name}: {d.what}\n  edits {d.path}; caught by {' '.join(d.tests)}")
        return 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    lines = [
        f"# benchmarks/defects.py on HEAD {head.stdout.strip()} ({time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs); "
        f"command: python benchmarks/defects.py{' --only ' + ' '.join(args.only) if any(args.only) else ''}",
    ]
    outcomes = []
    for n, d in enumerate(chosen, 1):
        print(f"[{n}/{len(chosen)}] {d.name} ...", flush=True)
        outcome, detail, seconds = run(d, args.timeout)
        outcomes.append(outcome)
        line = f"{outcome:8} {d.name} ({seconds:.0f}s): {detail}  | {d.what}; tests: {' '.join(d.tests)}"
        print(line, flush=True)
        lines.append(line)
    summary = ", ".join(f"{outcomes.count(o)} {o}" for o in ("killed", "survived", "timeout", "error"))
    lines.insert(1, f"# {len(chosen)} defects: {summary}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"{summary}; wrote {args.out}")
    return 0 if outcomes.count("killed") == len(chosen) else 1


if __name__ == "__main__":
    sys.exit(main())
