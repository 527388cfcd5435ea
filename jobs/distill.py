"""Distil a teacher into a one-step LoRaD student on Ray (Ray Data + Ray Train + DeepSpeed + MLflow).

    python jobs/distill.py                                   # embedded default, local Ray, ./runs/
    python jobs/distill.py --config sd15 --dry-run           # the plan, no weights
    python jobs/distill.py --config sd15 train.num_workers=16 train.global_batch=256
    python jobs/distill.py --config sd15 --print-config      # the resolved config, nothing run
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/distill.py

Rerunning with the same run name (``--run-name`` or ``train.run_name=``) resumes from its latest
checkpoint. Every config error is raised here, before any cluster resources are requested:
values (``pipelines.config.job``), then the teacher, the tracking server and the CPUs
(``pipelines.runtime.preflight``, inside ``run_distillation`` before Ray starts). With neither
``--address`` nor ``RAY_ADDRESS`` a private local Ray is started. URI user info
(``s3://KEY:SECRET@...``) is redacted in everything printed, logged or tracked.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

from wadi_core.config import ConfigError
from wadi_core.redact import redact

from pipelines.config.cli import add_config_arguments, config_from_args
from pipelines.config.job import DistillConfig, absolute_paths, check_distill_config, results_root
from pipelines.config.plan import build_plan
from pipelines.data.prompts import lake_prompt_count
from pipelines.run import RunFailed, run_distillation
from pipelines.runtime.console import quiet_console, say
from pipelines.runtime.stop import RunInterrupted, exit_code
from pipelines.tracking.client import install_log_redaction

#: Exit codes (README, docs/RELIABILITY.md): 0 trained (or already complete), 1 the run failed or
#: trained nothing, 2 refused before Ray started (config, lake, another job holds the run),
#: 128 + signal when stopped by SIGINT (130) / SIGTERM (143) after a checkpoint.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def main(argv: list[str] | None = None, console: bool = False) -> int:
    """The job; ``console`` (as a script): the quiet console of ``pipelines.runtime.console`` with the full
    log in ``runs/logs/`` (``--verbose``: everything on the terminal too)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(ap, default_recipe="embedded")
    ap.add_argument("--dry-run", action="store_true", help="print the plan (denoiser on meta, no weights) and exit")
    ap.add_argument("--run-name", help="Ray/MLflow run name (same name = resume)")
    ap.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--verbose", action="store_true", help="print Ray's and the libraries' output too (it is always "
                    "in the job's log file)")
    args = ap.parse_intermixed_args(argv)  # KEY=VALUE before or after the flags
    install_log_redaction()

    try:
        cfg = config_from_args(DistillConfig, args, fixed={"train.run_name": args.run_name} if args.run_name else None,
                               check=check_distill_config, whole_recipe=True)
    except SystemExit as e:
        return int(e.code or 0)

    if args.dry_run:
        cfg = absolute_paths(cfg, results_root())
        plan = build_plan(cfg, None if cfg.data.num_prompts else lake_prompt_count(cfg.data.prompts))
        print(json.dumps(plan.as_dict(), indent=2) if args.json else plan.format())
        return 0

    # An unreachable MLflow server should cost seconds, not MLflow's default minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    if not console:
        return _run(cfg, args)

    log_path = results_root() / "runs" / "logs" / f"{cfg.train.run_name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    with quiet_console(log_path, verbose=args.verbose):
        say(f"[wadi] full log: {log_path}" + ("" if args.verbose else " (--verbose prints it here too)"))
        try:
            code = _run(cfg, args)
        except BaseException:  # noqa: BLE001 - a person sees what ended the job, then where the rest is
            say(traceback.format_exc().rstrip(), err=True)
            code = EXIT_FAILED
        finally:
            import ray  # noqa: PLC0415 -- Ray only on the cluster path

            if ray.is_initialized():
                ray.shutdown()  # its processes write into the console pipe: end them inside it
        if code:
            say(f"[wadi] full log: {log_path}")
        return code


def _run(cfg: DistillConfig, args: argparse.Namespace) -> int:
    """The run and what is printed of it; ``say`` reaches the terminal under the quiet console."""
    try:
        result = run_distillation(cfg, ray_address=args.address)
    except ConfigError as e:  # preflight, the lake, the run's lease: before Ray starts
        say(redact(f"config error: {e}"), err=True)
        return EXIT_CONFIG
    except RunFailed as e:
        say(redact(f"failed: {e}"), err=True)
        return EXIT_FAILED
    except RunInterrupted as e:  # SIGINT / SIGTERM: MLflow says KILLED, the checkpoint resumes
        say(redact(f"interrupted: {e}"), err=True)
        return exit_code(e.signum)
    except KeyboardInterrupt:  # Ctrl-C before Ray started
        say("interrupted before training started", err=True)
        return exit_code(signal.SIGINT)
    if args.json:
        say(json.dumps(redact({"run_name": result.run_name, "mlflow_run_id": result.mlflow_run_id,
                               "tracking_uri": result.tracking_uri, "export_uri": result.export_uri,
                               "checkpoint": result.checkpoint, "model": result.model,
                               "evaluation": {k: v for k, v in (result.evaluation or {}).items() if k != "table"}}),
                       default=str))
    else:
        say(redact("\n" + result.summary()))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(console=True))
