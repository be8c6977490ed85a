"""The ``tierlm`` command: run | chat | plan | serve | doctor (see ``tierlm COMMAND --help``)."""

from __future__ import annotations

import argparse
import json
import sys

from tierlm.errors import TierlmError
from tierlm.runtime.planned import add_placement_arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="HF checkpoint folder or .gguf file (first shard of a split one); omitted: the demo model")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: bfloat16 on GPUs that have it, float16 on older ones, "
                        "float32 on the CPU)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy (default: the checkpoint's generation_config.json, else 0.6)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same tokens")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args, model):
    from tierlm.runtime.sampling import SamplingParams

    defaults = _generation_defaults(model)
    params = SamplingParams(
        temperature=args.temperature if args.temperature is not None else defaults.get("temperature", 0.6),
        top_p=args.top_p if args.top_p is not None else defaults.get("top_p", 1.0),
        top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        max_tokens=args.max_tokens, stop=tuple(args.stop))
    try:
        return params.validate()
    except ValueError as e:
        raise TierlmError(f"bad sampling option: {e}") from None


def _generation_defaults(model) -> dict:
    f = model.folder / "generation_config.json"
    try:
        return {k: v for k, v in json.loads(f.read_text()).items() if k in ("temperature", "top_p")}
    except (OSError, ValueError):
        return {}


def _load(args):
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    import tierlm

    from tierlm.runtime.planned import load_planned, make_run_plan, wants_plan

    planned = wants_plan(args)
    if planned:
        from tierlm.plan.report import format_plan

        print(format_plan(make_run_plan(args)), file=sys.stderr)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), transient=True, console=_err()) as bar:
        task = bar.add_task("loading", total=None)
        tick = lambda done, total: bar.update(task, completed=done, total=total)  # noqa: E731
        if planned:
            model, _ = load_planned(args, progress=tick)
        else:
            model = tierlm.load(args.model, device=args.device, dtype=args.dtype, progress=tick)
    c = model.config
    _err().print(f"[dim]{model.path.name}: {c.model_type}, {c.num_hidden_layers} layers, "
                 f"{c.n_routed_experts} experts (top-{c.num_experts_per_tok}) on {model.device}, "
                 f"{str(model.dtype).removeprefix('torch.')}[/dim]")
    return model


def _err():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def cmd_run(args) -> int:
    from tierlm.runtime.generate import Stats, generate_batch

    model = _load(args)
    params = _sampling(args, model)
    tok = model.tokenizer
    if args.raw:
        ids = tok.encode(args.prompt, add_bos=True)
    else:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                              template=args.chat_template)
    stats = Stats()
    recorder = _recorder(args, model)
    for events in generate_batch(model, [ids], params, stats):
        for ev in events:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    _save_profile(recorder, model)
    _err().print(f"[dim]prompt {stats.prompt_tokens} tokens, generated {stats.generated_tokens} tokens, "
                 f"prefill {stats.prefill_tok_s:.1f} tok/s, decode {stats.decode_tok_s:.1f} tok/s[/dim]")
    if args.stats:
        _print_expert_stats(model)
    return 0


def _recorder(args, model):
    if not getattr(args, "record_profile", False):
        return None
    from tierlm.runtime.profile import ProfileRecorder

    return ProfileRecorder(model.module)


def _save_profile(recorder, model) -> None:
    if recorder is None:
        return
    from tierlm.plan.planner import recorded_profile_path

    path = recorder.save(recorded_profile_path(model.path))
    _err().print(f"[dim]routing profile saved to {path}: later plans of this model rank experts by it[/dim]")


def _print_expert_stats(model) -> None:
    s = model.expert_stats
    if s is None:
        _err().print("[dim]expert stats: every expert is on the compute device (no tiers)[/dim]")
        return
    d = s.as_dict()
    parts = [f"{t} {d['hits'][t]} uses ({100 * d['hit_rate'][t]:.0f}%), {d['bytes_per_token'][t] / 1e6:.2f} MB/token"
             for t in ("device", "ram", "disk")]
    _err().print(f"[dim]experts: {'; '.join(parts)}; {d['promotions']} promoted to the device, "
                 f"{d['prefetched']} disk prefetches ({d['prefetch_used']} used), "
                 f"{d['oom_events']} out-of-memory recoveries[/dim]")


def cmd_chat(args) -> int:
    from tierlm.chat import ReasoningParser
    from tierlm.runtime.generate import Stats, generate_batch

    model = _load(args)
    params = _sampling(args, model)
    tok = model.tokenizer
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    recorder = _recorder(args, model)
    err = _err()
    err.print("[dim]type a message; /reset clears the history, /exit (or Ctrl-D) quits[/dim]")
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            _save_profile(recorder, model)
            return 0
        if line.strip() in ("/exit", "/quit"):
            _save_profile(recorder, model)
            return 0
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        prompt_text = tok.render_chat(history, add_generation_prompt=True, template=args.chat_template)
        ids = tok.encode_chat(history, add_generation_prompt=True, template=args.chat_template)
        parser = ReasoningParser.for_prompt(prompt_text)
        answer: list[str] = []
        stats = Stats()

        def show(reasoning: str, content: str) -> None:
            if reasoning:
                err.print(reasoning, style="dim", end="")
            if content:
                answer.append(content)
                sys.stdout.write(content)
                sys.stdout.flush()

        try:
            for events in generate_batch(model, [ids], params, stats):
                show(*parser.feed(events[0].text))
        except KeyboardInterrupt:
            err.print("\n[dim](interrupted)[/dim]")
        show(*parser.finish())
        sys.stdout.write("\n")
        err.print(f"[dim]{stats.generated_tokens} tokens, {stats.decode_tok_s:.1f} tok/s[/dim]")
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_convert(args) -> int:
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    from tierlm.weights.convert import convert

    from tierlm.plan.hardware import parse_size

    split = parse_size(args.split_max_size, "--split-max-size") if args.split_max_size else 0
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TimeRemainingColumn(), console=_err(), transient=True) as bar:
        task = bar.add_task("converting", total=None)
        files = convert(args.src, args.dst, args.quant, split_max_size=split,
                        progress=lambda name, done, total: bar.update(task, completed=done, total=total,
                                                                      description=name))
    for f in files:
        print(f)
    return 0


def cmd_serve(args) -> int:
    from tierlm.runtime.planned import load_planned, make_run_plan, wants_plan
    from tierlm.serve.server import ServeOptions, serve

    loader = None
    if wants_plan(args):  # tiered experts: show the plan first, load it once the server listens
        from tierlm.plan.report import format_plan

        print(format_plan(make_run_plan(args, args.ctx)), file=sys.stderr)
        loader = lambda: load_planned(args, ctx=args.ctx)[0]  # noqa: E731
    return serve(ServeOptions(
        model=args.model, device=args.device, dtype=args.dtype, host=args.host, port=args.port,
        api_key=args.api_key, max_batch=args.max_batch, ctx=args.ctx, max_waiting=args.max_waiting,
        chat_template=args.chat_template, served_model_name=args.served_model_name,
        allow_origins=tuple(args.allow_origin), shutdown_timeout_s=args.shutdown_timeout, loader=loader))


def cmd_doctor(args) -> int:
    from tierlm.doctor import format_report, run_doctor

    report = run_doctor()
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from tierlm import __version__

    parser = argparse.ArgumentParser(prog="tierlm", description="Run giant MoE models across GPU, RAM and disk.")
    parser.add_argument("--version", action="version", version=f"tierlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate a completion for one prompt and stream it")
    _add_model_args(p)
    p.add_argument("-p", "--prompt", required=True)
    add_placement_arguments(p)
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--chat-template", default=None, help="v3, r1, or the checkpoint's own (default)")
    _add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with history and streaming")
    _add_model_args(p)
    p.add_argument("--system", default=None, help="system prompt")
    add_placement_arguments(p)
    p.add_argument("--chat-template", default=None, help="v3, r1, or the checkpoint's own (default)")
    _add_sampling_args(p, max_tokens=1024)
    p.set_defaults(func=cmd_chat)

    try:
        from tierlm.plan.command import add_plan_arguments, plan_command
    except ImportError:
        pass
    else:
        p = sub.add_parser("plan", help="say where every tensor goes and how fast it will run, before loading")
        add_plan_arguments(p)
        p.set_defaults(func=plan_command)

    p = sub.add_parser("convert", help="convert an HF checkpoint (bf16 or FP8) to a deepseek2 GGUF")
    p.add_argument("src", help="HF checkpoint folder")
    p.add_argument("dst", help="output .gguf path")
    p.add_argument("--quant", default="Q4_K_M", help="F16, Q8_0 or Q4_K_M (llama.cpp's mix; default)")
    p.add_argument("--split-max-size", default=None, help="split into shards of at most this size, e.g. 50GB")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with streaming and continuous batching")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together per step")
    p.add_argument("--ctx", type=int, default=None, help="tokens per sequence, prompt and output (default: the "
                                                         "model's context)")
    p.add_argument("--max-waiting", type=int, default=None,
                   help="requests queued beyond the batch before new ones get 429 (default: 4 x --max-batch)")
    p.add_argument("--chat-template", default=None, help="v3, r1, or the checkpoint's own (default)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the folder's "
                                                             "name, or 'demo')")
    p.add_argument("--allow-origin", action="append", default=[], help="allow this CORS origin (repeatable; "
                                                                       "default: CORS off)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    add_placement_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("doctor", help="report Python, torch, GPUs, RAM and disk, and what will not work")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except TierlmError as e:
        _err().print(f"[bold red]error:[/bold red] {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
