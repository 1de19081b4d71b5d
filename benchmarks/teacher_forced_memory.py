"""Peak memory of teacher-forced scoring, before and after logits were limited to the
completions' positions (pipeline/lm/teacher_forced.py), side by side in one run.

    python benchmarks/teacher_forced_memory.py [--old-commit 0593a18] [--rows 32]

Each side runs in its own subprocess (peak RSS is per process): the embedded SmolLM2-135M scores
`--rows` completions of about 100 tokens after prompts of about 250 tokens in one batch of 32,
as the refit stage's implicit-reward metrics do with critics.score_batch_size=32. The old side
is `completion_logprobs` from `--old-commit`'s pipeline/lm/generation.py, loaded from git.
Prints peak RSS and seconds per side, the largest absolute difference of their log-probs, and
writes benchmarks/results/teacher_forced_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.run.atomic import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def texts(rows: int) -> tuple[list[str], list[str]]:
    prompts = [f"Problem {k}: " + " ".join(f"add {k + j} and {j};" for j in range(40)) for k in range(rows)]
    completions = [" ".join(f"{j} + {k} = {j + k}." for j in range(12)) for k in range(rows)]
    return prompts, completions


def side(which: str, rows: int, old_file: str | None) -> dict:
    """One side, in this process: load the model, score, report peak RSS."""
    from pipeline.config import ModelConfig
    from pipeline.lm.models import load_model

    model, tokenizer = load_model(ModelConfig())
    if which == "old":
        import importlib.util

        spec = importlib.util.spec_from_file_location("old_generation", old_file)
        module = importlib.util.module_from_spec(spec)
        sys.modules["old_generation"] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        score = module.completion_logprobs
    else:
        from pipeline.lm.teacher_forced import completion_logprobs as score
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    found = score(model, tokenizer, *texts(rows), batch_size=32)
    return {"seconds": round(time.perf_counter() - start, 2),
            "peak_rss_mb_before_scoring": round(before / 1024),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "tokens": sum(len(x) for x in found), "logprobs": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-commit", default="0593a18")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--side", choices=["old", "new"], help=argparse.SUPPRESS)
    parser.add_argument("--old-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        Path(args.out).write_text(json.dumps(side(args.side, args.rows, args.old_file)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        old_file = Path(tmp) / "old_generation.py"
        old_file.write_text(subprocess.run(
            ["git", "show", f"{args.old_commit}:pipeline/lm/generation.py"], cwd=ROOT, check=True,
            capture_output=True, text=True).stdout)
        found = {}
        for which in ("old", "new"):
            out = Path(tmp) / f"{which}.json"
            subprocess.run([sys.executable, __file__, "--side", which, "--rows", str(args.rows),
                            "--old-file", str(old_file), "--out", str(out)], check=True)
            found[which] = json.loads(out.read_text())
    diff = max(abs(a - b) for x, y in zip(found["old"]["logprobs"], found["new"]["logprobs"])
               for a, b in zip(x, y))
    result = {"benchmark": "teacher_forced_memory", "old_commit": args.old_commit, "rows": args.rows,
              **{which: {k: v for k, v in found[which].items() if k != "logprobs"}
                 for which in found},
              "max_abs_logprob_difference": diff}
    write_json(RESULTS / "teacher_forced_memory.json", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
