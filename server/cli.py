"""The `mace` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from server.flags import add_engine_flags, add_threads_flag


def _demo_model(args: argparse.Namespace) -> None:
    from engine.demo_model import build_demo_model

    out = build_demo_model(args.dir, args.size, seed=args.seed)
    if args.train_steps:
        from engine.demo_training import train_demo_model

        losses = train_demo_model(out, args.train_steps, seed=args.seed)
        print(f"trained it for {args.train_steps} steps: loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    print(f"built the {args.size} demo model in {out}")


def _serve(args: argparse.Namespace) -> None:
    if args.model is None:
        args.model = str(_default_model())
    if args.replicas:
        from server.ray_serve import serve_replicas

        args.model = os.path.abspath(args.model)  # the replicas' working directory may differ
        args.state_dir = os.path.abspath(args.state_dir)
        serve_replicas(args)
        return
    from server.app import serve
    from server.flags import apply_threads

    apply_threads(args)
    serve(args)


def _default_model():
    """The tiny demo model, built once into the user's cache and reused."""
    from pathlib import Path

    from engine.demo_model import build_demo_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mace-serve" / "demo-tiny"
    if not (cache / "config.json").exists():
        logging.getLogger(__name__).info("building the tiny demo model in %s", cache)
        build_demo_model(cache, "tiny")
    return cache


def _profile(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from scheduler.builder import build_engine
    from scheduler.profiler import profile
    from server.flags import apply_threads, engine_config, training_config
    from trainer.feedback import FeedbackStore

    if args.model is None:
        args.model = str(_default_model())
    apply_threads(args)  # the threads mace serve uses, so that the profile prices what it runs
    training = training_config(args, state_dir=None)  # the fine-tune measurements need an executor
    core, runner = build_engine(engine_config(args, enable_prefix_caching=False), training,
                                FeedbackStore(tempfile.mkdtemp() + "/unused.sqlite3") if training else None)
    model, rows = profile(runner, core.config.model.max_model_len, quick=args.quick)
    model.save(args.out, {"model": args.model, "device": args.device, "measurements": rows})
    print(json.dumps(model.to_dict()))
    print(f"wrote {args.out}")


def _load(args: argparse.Namespace) -> None:
    from clients.load import main as load_main

    load_main(args)


# `mace bench NAME`: the module (with add_arguments(parser) and main(args)) and its help.
BENCHES = {
    "engine": ("bench.engine", "engine throughput/latency vs transformers (no HTTP)"),
    "http": ("bench.http_layer", "tokens/s streamed over HTTP vs the engine alone, same workload, same run"),
    "cache": ("bench.cache", "KV cache: prefix sharing on vs off, pruning memory and quality"),
    "train": ("bench.train", "DPO pairs/s alone and while serving, and the serving TPOT with and without"),
    "plan": ("bench.plan", "the scheduler's planning time per iteration at 16, 256 and 1024 queued requests"),
    "policies": ("bench.policies", "the fine-tune policies under a chat load with 10/30/50%% feedback"),
    "adapters": ("bench.adapters", "decode throughput with a batch spread over 1, 4 and 8 LoRA adapters"),
    "replicas": ("bench.replicas", "1 vs 2 Ray Serve replicas training one adapter: throughput, latency, "
                                   "pairs trained/s, broadcast delay, prefix hits"),
    "cpu": ("bench.cpu", "mace serve vs llama.cpp's llama-server on the CPU: throughput, batch-1 decode, prefill"),
    "paper": ("bench.paper", "MACE's evaluation over HTTP: recovery after drift, latency vs retrain rate, ablation"),
}


def _run_bench(args: argparse.Namespace) -> None:
    importlib.import_module(args.bench_module).main(args)


def build_parser(bench_name: str | None = None) -> argparse.ArgumentParser:
    """The ``mace`` parser, with the flags of benchmark ``bench_name`` (None: no benchmark's).
    Only that benchmark's module is imported: ``mace serve`` never imports one."""
    parser = argparse.ArgumentParser(prog="mace", description="MACE-serve: an LLM server that keeps aligning while it serves")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-model", help="build the built-in demo model (random weights, offline tokenizer)")
    p.add_argument("dir")
    p.add_argument("--size", choices=["tiny", "small", "base", "1b"], default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=0,
                   help="pre-train on the shipped corpus for this many steps (0: random weights)")
    p.set_defaults(func=_demo_model)

    p = sub.add_parser("serve", help="serve a local checkpoint over HTTP")
    add_engine_flags(p, device_default="cuda" if _cuda() else "cpu")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's name)")
    g.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on every route but /health")
    g.add_argument("--api-key-file", default=None, help="read the API key from this file")
    g.add_argument("--tenants", default=None, metavar="FILE",
                   help="one `API_KEY TENANT` pair a line: each tenant's feedback trains its own adapter, which "
                        "serves its requests; every route but /health then needs one of these keys (or --api-key)")
    g.add_argument("--max-waiting-requests", type=int, default=256, help="queued sequences before answering 429")
    g.add_argument("--refuse-late-requests", action="store_true",
                   help="answer 429 (with Retry-After) to a request whose first token is predicted past its TTFT SLO "
                        "(policies that plan by time); without it such a request queues and is counted late")
    g.add_argument("--max-request-bytes", type=int, default=4 << 20, help="larger bodies get 413")
    g.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get after SIGTERM")
    g.add_argument("--state-dir", default="./mace-state",
                   help="where durable state lives: the feedback store (feedback.sqlite3) and adapter checkpoints")
    g.add_argument("--trace-iterations", default=None, metavar="FILE",
                   help="write one JSON line per iteration: the plan, its predicted and measured time (diagnosis)")
    g = p.add_argument_group("scale-out on Ray Serve")
    g.add_argument("--replicas", type=int, default=0, metavar="N",
                   help="serve N replicas as a Ray Serve application (a local Ray instance, or --ray-address); "
                        "they train one adapter through a coordinator actor")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. auto after `ray start --head`) instead of starting one")
    g.add_argument("--replica-threads", type=int, default=1, help="CPU threads (and Ray CPUs) per replica")
    g.add_argument("--replica-router", choices=["prefix", "pow2"], default="prefix",
                   help="prefix: requests sharing a prompt prefix go to the replica that holds it (balanced against "
                        "queue length); pow2: Ray Serve's default power-of-two choices")
    g.add_argument("--ray-dashboard", action=argparse.BooleanOptionalAction, default=None,
                   help="start Ray's dashboard with a local Ray (default: Ray's choice)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("profile", help="measure iteration costs on this machine and write a cost profile")
    p.add_argument("--model", default=None, help="local checkpoint directory (default: the tiny demo model)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=512 << 20)
    add_threads_flag(p)
    p.add_argument("--no-training", action="store_true", help="skip the fine-tune measurements")
    p.add_argument("--quick", action="store_true", help="a smaller grid (what mace serve runs on its own)")
    p.add_argument("--out", default="mace-profile.json")
    p.set_defaults(func=_profile)

    p = sub.add_parser("load", help="open-loop load on a running server: latency, SLO attainment, feedback pairs")
    p.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="the model name to send (default: none, the server's own)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--arrival", choices=["poisson", "bursty", "trace"], default="poisson")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (poisson, bursty)")
    p.add_argument("--burstiness", type=float, default=2.0,
                   help="bursty: coefficient of variation of the gaps (gamma shape 1/B^2); 1 is poisson")
    p.add_argument("--trace", default=None, help='JSONL, a line {"arrival_s", "prompt" or "messages", "max_tokens"}')
    p.add_argument("--num-requests", type=int, default=None, help="send at most this many requests")
    p.add_argument("--duration", type=float, default=None, help="send nothing at or after this many seconds")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get after --duration before they are cancelled")
    p.add_argument("--concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    p.add_argument("--max-tokens", default="32", help="output tokens: N, or MIN:MAX drawn uniformly (not for traces)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all; not sent)")
    p.add_argument("--retrain-rate", type=float, default=0.0,
                   help="share of requests that sample two answers and post the oracle's pick to /v1/feedback")
    p.add_argument("--drift-at", type=float, default=None,
                   help="seconds into the run when the oracle's taste switches from vowels to consonants")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--slo-tbt-ms", type=float, default=100.0, help="the TPOT bound of the SLO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_load)

    p = sub.add_parser("bench", help="benchmarks")
    bench = p.add_subparsers(dest="bench", required=True)
    for name, (module, help_) in BENCHES.items():
        b = bench.add_parser(name, help=help_)
        if name == bench_name:  # a benchmark's own flags and its docstring: its module is imported only here
            mod = importlib.import_module(module)
            mod.add_arguments(b)
            b.description, b.formatter_class = mod.__doc__, argparse.RawDescriptionHelpFormatter
        b.set_defaults(func=_run_bench, bench_module=module)
    return parser


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    # Never reach for a hub: every model and tokenizer is local.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(bench_name=argv[1] if argv[:1] == ["bench"] and len(argv) > 1 else None).parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
