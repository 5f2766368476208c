"""The command line: run, check, print-command, status, doctor, report.

The subcommands and exit codes are a contract (docs/ARCHITECTURE.md, README "Exit codes").
`run` validates the whole file before anything starts and exits 78 itself, so the unit needs
no ExecStartPre= (RestartPreventExitStatus= only looks at the main process).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import shlex
import sys
from collections.abc import Sequence

from nika_supervisor import __version__
from nika_supervisor.config import DEFAULT_CONFIG_PATH, Config, load_config
from nika_supervisor.errors import ConfigError
from nika_supervisor.exitcodes import ExitCode
from nika_supervisor.statefile import default_runtime_dir, read_state, state_path


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as e:
        for issue in e.issues:
            print(issue, file=sys.stderr)
        return None


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return ExitCode.CONFIG
    # A watchdog kill (SIGABRT) or a crash then leaves every thread's stack in the journal.
    faulthandler.enable()
    from nika_supervisor.supervisor import run

    return run(cfg)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return ExitCode.CONFIG
    c = cfg.cluster
    if c is not None and not c.is_head:
        print(f"{args.config}: ok (model {cfg.vllm.model!r}, headless rank {c.node_rank} of "
              f"{c.nnodes}, head {c.master_addr}:{c.master_port}; not yet supervised as a group)")
        return ExitCode.OK
    group = (f", head of {c.nnodes} ranks; not yet supervised as a group"
             if c is not None else "")
    print(f"{args.config}: ok (model {cfg.vllm.model!r} as {cfg.vllm.alias!r} on "
          f"{cfg.vllm.host}:{cfg.vllm.port}{group})")
    return ExitCode.OK


def cmd_print_command(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg is None:
        return ExitCode.CONFIG
    from nika_supervisor.command import build_launch

    spec = build_launch(cfg, read_secret=False)
    if args.json:
        print(json.dumps({"argv": list(spec.argv), "env": spec.redacted_added()}, indent=2))
        return ExitCode.OK
    for key, value in sorted(spec.redacted_added().items()):
        print(f"{key}={shlex.quote(value)}")
    print(shlex.join(spec.argv))
    return ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    runtime_dir = args.runtime_dir
    if runtime_dir is None and args.config:
        cfg = _load(args.config)
        if cfg is None:
            return ExitCode.CONFIG
        runtime_dir = cfg.supervisor.runtime_dir
    runtime_dir = runtime_dir or default_runtime_dir()
    state = read_state(runtime_dir)
    if state is None:
        print(f"no state at {state_path(runtime_dir)}: the supervisor is not running",
              file=sys.stderr)
        return ExitCode.NO_STATE
    if args.json:
        print(json.dumps(state, indent=2, sort_keys=True))
    else:
        print(state.get("status") or state.get("phase"))
        for key in ("phase", "pid", "supervisor_pid", "alias", "host", "port", "restarts",
                    "config", "config_error"):
            print(f"  {key}: {state.get(key)}")
        gate = state.get("gate")
        if gate:
            print(f"  gate: {gate.get('in_flight')} in flight, {gate.get('held')} held, "
                  f"{gate.get('rejected')} rejected (503) since start")
        failure = state.get("last_failure")
        if failure:
            print(f"  last_failure: {failure.get('cause')}")
            if failure.get("hint"):
                print(f"  hint: {failure.get('hint')}")
    return ExitCode.OK if state.get("phase") == "ready" else ExitCode.NOT_READY


def cmd_doctor(args: argparse.Namespace) -> int:
    from nika_supervisor import doctor

    return doctor.main(args.config, args.json)


def _duration_arg(value: str) -> float:
    from nika_supervisor.durations import parse_duration

    try:
        seconds = parse_duration(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {value!r}")
    return seconds


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from nika_supervisor import plot, report
    from nika_supervisor.history import HISTORY_FILE, default_state_dir, read_history

    state_dir = args.state_dir
    if state_dir is None and args.config:
        cfg = _load(args.config)
        if cfg is None:
            return ExitCode.CONFIG
        state_dir = cfg.supervisor.state_dir
    state_dir = default_state_dir(state_dir)
    records = read_history(state_dir)
    if not records:
        print(f"no history at {state_dir}/{HISTORY_FILE}: the supervisor has not run here "
              "(or supervisor.state_dir points elsewhere)", file=sys.stderr)
        return ExitCode.NO_STATE
    rep = report.build(records, time.time(), args.since)
    if args.plot:
        if args.plot.endswith(".svg"):
            with open(args.plot, "w", encoding="utf-8") as f:
                f.write(plot.svg(rep))
        elif args.plot.endswith(".png"):
            try:
                plot.png(rep, args.plot)
            except ImportError:
                print(plot.INSTALL_HINT, file=sys.stderr)
                return ExitCode.USAGE
        else:
            print(f"--plot {args.plot}: the file name must end in .svg or .png",
                  file=sys.stderr)
            return ExitCode.USAGE
    if args.json:
        print(json.dumps(report.as_json(rep), indent=2))
    else:
        sys.stdout.write(report.text(rep))
        if args.plot:
            print(f"plot: {args.plot}")
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nika-supervisor",
                                description="Keep one vLLM model loaded and answering.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", "-c", default=DEFAULT_CONFIG_PATH,
                        help=f"configuration file (default {DEFAULT_CONFIG_PATH})")
        return sp

    with_config("run", "run the daemon in the foreground").set_defaults(func=cmd_run)
    with_config("check", "validate the configuration file").set_defaults(func=cmd_check)
    pc = with_config("print-command", "print vLLM's argv and added environment (redacted)")
    pc.add_argument("--json", action="store_true")
    pc.set_defaults(func=cmd_print_command)
    st = sub.add_parser("status", help="print the running daemon's state")
    st.add_argument("--config", "-c", default=None, help="read supervisor.runtime_dir from it")
    st.add_argument("--runtime-dir", default=None)
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)
    dr = with_config("doctor", "preflight checks; starts no server")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_doctor)
    rp = sub.add_parser("report", help="availability, outages, restarts, loads and GPU over "
                        "the last 48 hours, from the history")
    rp.add_argument("--config", "-c", default=None, help="read supervisor.state_dir from it")
    rp.add_argument("--state-dir", default=None,
                    help="where history.jsonl is (default: the unit's StateDirectory)")
    rp.add_argument("--since", type=_duration_arg, default=48 * 3600.0, metavar="DURATION",
                    help="the window, ending now: 48h (default), 7d, 90m ...")
    rp.add_argument("--json", action="store_true")
    rp.add_argument("--plot", metavar="FILE", default=None,
                    help="draw the timeline: FILE.svg (built in) or FILE.png (needs the "
                         "[report] extra, matplotlib)")
    rp.set_defaults(func=cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))
