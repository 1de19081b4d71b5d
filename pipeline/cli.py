"""The `qstar` command: run, resume, inspect, report, eval.

`@hydra.main` lives here and only here (for `qstar run`: Hydra's run directory and sweeps).
Every user-facing error is one line on stderr and exit code 2.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError, QstarError

if TYPE_CHECKING:
    from hydra.core.override_parser.types import Override

# The commands import their modules (torch, transformers, Hydra, Ray behind them) inside the
# function that needs them, so `qstar --help` and a refused argument answer at once.

USAGE = """usage:
  qstar run [KEY=VALUE ...] [-m]        a new self-play run (Hydra overrides; -m sweeps)
  qstar resume RUN_DIR [iterations=N]   continue a stopped or finished run
  qstar inspect RUN [--iter N --problem ID] [--credit]   (several RUNs: side by side)
                                        the iteration table, one tree, or a credit map
  qstar report RUN [--iter N] [--problem ID] [--credit [best|all]]
                                        one self-contained HTML page: table, plots, config,
                                        trees, credit maps, training rows (a sweep: every run)
  qstar eval [KEY=VALUE ...]            one model, one decoding strategy, the dev split
                                        (eval.split=test only for reported numbers)
                                        e.g. qstar eval decode=best_of_n decode.n=8
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    _quiet_libraries()
    try:
        if command == "run":
            return cmd_run(rest)
        if command == "resume":
            return cmd_resume(rest)
        if command == "inspect":
            return cmd_inspect(rest)
        if command == "report":
            return cmd_report(rest)
        if command == "eval":
            return cmd_eval(rest)
        raise QstarError(f"unknown command {command!r}; commands: run, resume, inspect, report, eval")
    except QstarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_eval(overrides: list[str]) -> int:
    from pipeline.compose import compose_config
    from pipeline.stages.eval import run_eval

    run_eval(compose_config(overrides))
    return 0


def cmd_run(args: list[str]) -> int:
    from pipeline.compose import compose_config, expand_model_shorthand

    multirun = "-m" in args or "--multirun" in args
    overrides = expand_model_shorthand([a for a in args if a not in ("-m", "--multirun")])
    # Refuse bad config, data or model with one line before Hydra makes a run directory
    # (later, a refused run would leave a manifest.json behind: a run that never ran).
    from pipeline.lm.models import resolve_model_path
    from pipeline.tasks import make_task

    for variant in sweep_variants(overrides) if multirun else [overrides]:
        cfg = compose_config(variant)
        make_task(cfg.task)
        resolve_model_path(cfg.model)
    sys.argv = ["qstar"] + (["--multirun"] if multirun else []) + overrides
    _hydra_run()
    return 0


def sweep_variants(overrides: list[str]) -> list[list[str]]:
    """Every value of every swept key once, the other keys at their first value: enough to refuse
    any bad value before the sweep starts, without the full product. Hydra's own parser reads
    the sweeps (`a=1,2`, `choice(...)`, `range(...)`, `tag(...)`); an `interval(lo,hi)` (the
    optuna sweeper's) is checked at both ends, and a `glob(...)` over a group's options is left
    to Hydra (it needs the config loader)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from pipeline.compose import one_line

    parser, parsed = OverridesParser.create(), []
    for item in overrides:
        try:
            parsed += parser.parse_overrides([item])
        except HydraException as exc:
            raise ConfigError(one_line(exc)) from None
    options = [vals for item, override in zip(overrides, parsed)
               if (vals := _sweep_values(item, override))]
    first = [vals[0] for vals in options]
    variants = [first]
    for i, vals in enumerate(options):
        variants += [first[:i] + [v] + first[i + 1:] for v in vals[1:]]
    return variants


def _sweep_values(item: str, override: Override) -> list[str]:
    """The single-run overrides that stand for one command-line override ([]: none checkable)."""
    from hydra.core.override_parser.types import Glob

    if not override.is_sweep_override():
        return [item]
    key, sweep = override.get_key_element(), override.value()
    if isinstance(sweep, Glob):
        return []
    if override.is_interval_sweep():
        return [f"{key}={sweep.start}", f"{key}={sweep.end}"]
    return [f"{key}={v}" for v in override.sweep_string_iterator()]


def _hydra_run() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from pipeline.compose import CONF_DIR, to_config

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def entry(dcfg) -> float | None:
        from pipeline.loop import final_accuracy, run_loop

        try:
            cfg = to_config(dcfg)
            return final_accuracy(run_loop(cfg, HydraConfig.get().runtime.output_dir), cfg)
        except QstarError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    entry()


def cmd_resume(args: list[str]) -> int:
    from pipeline.loop import resume_run

    if not args:
        raise QstarError("qstar resume needs a run directory: qstar resume RUN_DIR [iterations=N]")
    resume_run(args[0], args[1:])
    return 0


def cmd_inspect(args: list[str]) -> int:
    from pipeline.report.inspect import inspect_main

    return inspect_main(args)


def cmd_report(args: list[str]) -> int:
    from pipeline.report.page import report_main

    return report_main(args)


if __name__ == "__main__":
    sys.exit(main())
