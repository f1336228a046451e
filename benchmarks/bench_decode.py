"""Whole-decode benchmark: dense eager vs dense Inductor vs dyllm (paper, exact), side by side in one run.

    python benchmarks/bench_decode.py --preset cpu          # the committed CPU set
    python benchmarks/bench_decode.py --preset gpu          # LLaDA-8B / Dream-7B shapes, bf16 (random weights)
    python benchmarks/bench_decode.py --model default --batch 1 --modes eager,inductor,dyllm-paper

Every configuration decodes 1 + --repeats times per mode: the first decode compiles and warms up (every mode's, one
after the other), then the timed decodes go round-robin over the modes, so a slow phase of a shared machine slows
all modes alike (tokens/s of each mode's median decode; per-step latency from a synchronising wrapper around the
model, over all).
Before the first configuration, every mode runs once untimed on a tiny model, so the process's one-time start-up
costs are not charged to one mode's compile. Rows go to a CSV with the device, torch and Triton versions; plots
(speedup bars, salient fraction per step and layer) go next to it. The roofline bound (benchmarks/roofline.py)
uses the salient fractions measured in the same run and the machine's measured bandwidth and matmul peak.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch._functorch.config
import torch._inductor.config
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from roofline import Machine, Shape, measure_machine, step_cost  # noqa: E402

import dyllm_compile  # noqa: E402
from dyllm_compile.explain import Report  # noqa: E402
from dyllm_compile.generate import generate  # noqa: E402
from dyllm_compile.models import dream_like, llada_like, load_checkpoint, load_default_model  # noqa: E402
from dyllm_compile.models.presets import DREAM_7B, LLADA_8B  # noqa: E402
from dyllm_compile.passes.graph_utils import tensor_value  # noqa: E402
from dyllm_compile.runtime.graph_runtime import RuntimeStats, last_serial, runtimes  # noqa: E402

# dyllm-<mode>[-qp][-so][-if][-wg][-ps]: that attention mode; -qp with query pruning (prompt rows queried every
# --query-pruning-period calls), -so with the output projection on S_out (output_projection="salient"), -if with
# the gathered rows' linear layers in the model's operand order (linear_order="input_first", the order before
# linear_order existed; the default measures), -wg lowered as one whole graph (piecewise=False, as before
# piecewise lowering existed), -ps a capacity bucket per row selection (row_capacity="per_selection"; capacity
# buckets only, the GPU's route), -st a variant compiled per capacity bucket (symbolic_capacities=False, as
# before symbolic capacities; buckets only), -bk rows sized by capacity buckets on any device (row_counts="buckets":
# the GPU's route, timed on the CPU), -pl1 one layer to a compiled piece (piece_layers=1, as before layers were
# grouped), -cw Inductor's C++ wrapper around the variants' generated kernels (wrapper="cpp"). exact is the library
# default (docs/rewrite.md). inductor-cpp: dense Inductor with its C++ wrapper (cpp_wrapper), what the wrapper alone
# gives a dense step (the targets' baseline is inductor, Inductor's defaults).
MODES = ("eager", "inductor", "dyllm-exact", "dyllm-paper", "dyllm-exact-qp", "dyllm-paper-qp", "dyllm-exact-so",
         "dyllm-exact-qp-so", "dyllm-exact-if", "dyllm-exact-so-if", "dyllm-exact-wg", "dyllm-exact-qp-wg",
         "dyllm-exact-ps", "dyllm-exact-qp-ps", "dyllm-exact-st", "dyllm-exact-qp-st", "dyllm-exact-ps-st",
         "dyllm-exact-qp-ps-st", "dyllm-exact-bk", "dyllm-exact-pl1", "dyllm-paper-pl1", "dyllm-exact-bk-pl1",
         "dyllm-exact-cw", "dyllm-paper-cw", "dyllm-exact-bk-cw", "dyllm-exact-qp-cw", "inductor-cpp")
DEFAULT_MODES = ("eager", "inductor", "dyllm-exact", "dyllm-paper", "dyllm-exact-qp", "dyllm-paper-qp",
                 "dyllm-exact-so")  # what runs unless --modes says otherwise
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Workload:
    """A model and the prompts it decodes; ``label`` names the weights (trained or random) in every row."""

    name: str
    model: torch.nn.Module
    prompts: torch.Tensor
    gen_length: int
    block_length: int
    steps: int
    weights: str


def default_workload(batch: int, **_) -> Workload:
    from dyllm_compile.evaluate import held_out_mix
    from dyllm_compile.tasks import ANSWER_LENGTH, encode_prompts

    return Workload("default (trained, in-repo)", load_default_model(), encode_prompts(held_out_mix(batch)),
                    ANSWER_LENGTH, ANSWER_LENGTH, ANSWER_LENGTH, "trained")


# --ffn of the reference model: its FFN, or an MoE of 8 SwiGLU experts of half its width, top 2 (the FFN's FLOPs
# per row, 4x its weights), every expert on every row, each on the rows routed to it, or on the rows sorted by
# expert in grouped products (transformers 5's default experts)
FFNS = {"swiglu": {}, "moe": dict(ffn="moe", n_experts=8, moe_top_k=2, d_ffn=768),
        "moe-dispatch": dict(ffn="moe", n_experts=8, moe_top_k=2, d_ffn=768, moe_routing="dispatch"),
        "moe-grouped": dict(ffn="moe", n_experts=8, moe_top_k=2, d_ffn=768, moe_routing="grouped")}


#: --attention: the reference model's attention (its config) and how results name it. "sinks": hand-written with a
#: learned sink logit per head (GPT-OSS's form); "softcap": hand-written with Gemma-2's soft-capped scores.
ATTENTION_FORMS = {"sdpa": ({}, ""), "manual": (dict(attention="manual"), ", hand-written attention"),
                   "sinks": (dict(attention="manual", sinks="head"), ", hand-written attention with a sink per head"),
                   "softcap": (dict(attention="manual", softcap=50.0),
                               ", hand-written attention with soft-capped scores (50)"),
                   "flex": (dict(attention="flex"), ", flex_attention")}


def reference_workload(batch: int, prompt_length: int = 64, gen_length: int = 192, block_length: int = 32,
                       attention: str = "sdpa", ffn: str = "swiglu", hyper_connections: int = 0, **_) -> Workload:
    shape = dict(d_model=512, n_layers=4, n_heads=8, d_ffn=1536, vocab_size=512, mask_token_id=511)
    form, label = ATTENTION_FORMS[attention]
    model = llada_like("tiny", hyper_connections=hyper_connections, **{**shape, **form, **FFNS[ffn]})
    prompts = torch.randint(1, 511, (batch, prompt_length), generator=torch.Generator().manual_seed(0))
    name = ("llada-like 4L d512" + label
            + ("" if ffn == "swiglu" else f", {ffn} (8 experts, top 2)")
            + (f", {hyper_connections} residual streams" if hyper_connections else ""))
    return Workload(name, model, prompts, gen_length, block_length, gen_length, "random")


# Sequence length of the full-size workloads: the paper's (a long few-shot prompt and 256 generated tokens), the one
# the cache memory target is stated at. It matters for the targets: a sparse step still reads every weight, so
# the dense step's FLOPs must outweigh that for the bound to allow a large speedup. At LLaDA-8B's shapes, 4 layers,
# batch 1, 5% salient, the bound ratio dense/sparse is 3.7x at 1150 tokens but 1.6x at 384.
FULL_SIZE_TOKENS = 1150


def host_workload(batch: int, layers: Optional[int] = None, prompt_length: Optional[int] = None, **_) -> Workload:
    """Launch-bound steps on the CPU: LLaDA-8B's 32 layers (or ``layers``) at width 32, a 32-token prompt (or
    ``prompt_length``) and 32 generated tokens, so that a step's time is the host's (Python, dispatch, kernel
    calls) rather than arithmetic, as at batch 1 on a GPU, where the arithmetic shrinks by two orders of magnitude
    and the host's work per layer does not. At 64 tokens both attention modes trace their attention into the
    compiled code (``RECOMPUTE_WORK``); from about 730 tokens on they call ``dyllm::cached_attention``, as at
    LLaDA-8B's sizes (on a GPU the arithmetic of 1024 tokens at this width is still negligible)."""
    layers = LLADA_8B["n_layers"] if layers is None else layers
    name = f"host-bound: llada-like {layers}L d32" + ("" if prompt_length is None else f", {prompt_length + 32} tokens")
    prompt_length = 32 if prompt_length is None else prompt_length
    model = llada_like("tiny", n_layers=layers, d_model=32, n_heads=2, d_ffn=64, vocab_size=64, mask_token_id=63,
                       max_seq_len=max(512, prompt_length + 32))
    prompts = torch.randint(1, 63, (batch, prompt_length), generator=torch.Generator().manual_seed(0))
    return Workload(name, model, prompts, 32, 32, 32, "random")


def full_size_workload(arch: str, batch: int, device: str, dtype: torch.dtype, checkpoint: Optional[str],
                       layers: Optional[int] = None, prompt_length: Optional[int] = None, gen_length: int = 256,
                       block_length: int = 32, **_) -> Workload:
    """LLaDA-8B or Dream-7B: a local checkpoint, or random weights of its shapes; ``layers`` keeps only the first
    that many decoder layers (each layer's shapes unchanged), named in the row, to fit a short device lease. The
    prompt defaults to FULL_SIZE_TOKENS - gen_length tokens."""
    prompt_length = FULL_SIZE_TOKENS - gen_length if prompt_length is None else prompt_length
    size, full = ("8b", LLADA_8B) if arch == "llada" else ("7b", DREAM_7B)
    name = f"{arch}-{size}" if layers is None else f"{arch}-{size} shapes, {layers} of {full['n_layers']} layers"
    if checkpoint:
        model, weights = load_checkpoint(checkpoint, dtype), f"checkpoint {checkpoint}"
    else:
        make = llada_like if arch == "llada" else dream_like
        # Built on the CPU in the benchmark dtype (16 GB at 8B in bf16, not 32 in fp32): the model seeds its
        # random init with a CPU generator. Moved to the device by the caller.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = make(size) if layers is None else make(size, n_layers=layers)
        finally:
            torch.set_default_dtype(previous)
        weights = "random"
    cfg = model.cfg
    prompts = torch.randint(1, cfg.mask_token_id, (batch, prompt_length), generator=torch.Generator().manual_seed(0))
    return Workload(name, model, prompts.to(device), gen_length, block_length, gen_length, weights)


class TimedModel:
    """Wraps a callable model; records each call's wall time (synchronising on CUDA)."""

    def __init__(self, fn: Callable, device: torch.device) -> None:
        self.fn, self.device, self.times = fn, device, []

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        return out


def build(mode: str, model: torch.nn.Module, args) -> Callable:
    if mode == "eager":
        return model
    if mode == "inductor":
        return torch.compile(model)
    if mode == "inductor-cpp":
        return torch.compile(model, options={"cpp_wrapper": True})
    options = {"threshold": args.threshold, "attention_mode": mode.split("-")[1], "lowering": args.lowering}
    if args.force_fraction is not None:
        options["force_salient"] = args.force_fraction
    flags = mode.split("-")[2:]
    if "qp" in flags:
        options.update(query_pruning_period=args.query_pruning_period, mask_token_id=model.cfg.mask_token_id)
    if "so" in flags:
        options["output_projection"] = "salient"
    if "if" in flags:
        options["linear_order"] = "input_first"
    if "wg" in flags:
        options["piecewise"] = False
    if "ps" in flags:
        options["row_capacity"] = "per_selection"
    if "st" in flags:
        options["symbolic_capacities"] = False
    if "bk" in flags:
        options["row_counts"] = "buckets"
    if "pl1" in flags:
        options["piece_layers"] = 1
    if "cw" in flags:
        options["wrapper"] = "cpp"
    return torch.compile(model, backend="dyllm", options=options)


def decode(model: Callable, work: Workload, confidence_threshold: Optional[float]):
    return generate(model, work.prompts, mask_token_id=work.model.cfg.mask_token_id, gen_length=work.gen_length,
                    steps=work.steps, block_length=work.block_length, confidence_threshold=confidence_threshold)


_START = time.perf_counter()


def _stamped(message: str) -> str:
    return f"[{time.perf_counter() - _START:7.1f} s] {message}"


def progress(message: str) -> None:
    """A line on stdout with the seconds since the benchmark started: a run stopped by a time limit (a device
    lease) still shows how far it got and what took the time."""
    print(_stamped(message), flush=True)


class ElapsedFormatter(logging.Formatter):
    """Log records on the progress lines' clock."""

    def format(self, record: logging.LogRecord) -> str:
        return _stamped(record.getMessage())


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass
class ModeRun:
    """One mode of a configuration: its compiled model, the runtimes it created (serials ``since`` < s <=
    ``until``), its first (compiling) decode and its timed ones."""

    mode: str
    timed: TimedModel
    since: int
    until: int
    warmup: float
    graphs: int
    peak_mem_mb: object
    decodes: list
    recompiles: int = 0
    cache_bytes: int = 0  # held after the last timed decode (the next mode's decode frees it)

    def runtimes(self) -> list:
        return [r for r in runtimes(self.since) if r.serial <= self.until]


def prepare_mode(mode: str, work: Workload, args, device: torch.device) -> ModeRun:
    """Builds ``mode`` and runs its first decode, which compiles (from whatever caches the caller provides)."""
    dyllm_compile.reset()
    since, graphs = last_serial(), counters["stats"]["unique_graphs"]
    compiled = build(mode, work.model, args)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    first = decode(compiled, work, args.confidence_threshold)
    warmup = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else ""
    progress(f"{work.name}, batch {len(work.prompts)}, {mode}: compiled and decoded once in {warmup:.1f} s "
             f"({first.stats.forward_calls} calls)")
    return ModeRun(mode, TimedModel(compiled, device), since, last_serial(), warmup,
                   counters["stats"]["unique_graphs"] - graphs, peak, [])


def timed_decode(run: ModeRun, work: Workload, args) -> None:
    for r in run.runtimes():  # the counters describe the last timed decode
        r.stats = RuntimeStats()
    # Each timed decode is a new request: without this, a decode of a single call (parallel decoding on a
    # confident model) would see its own previous input again and continue that sequence sparsely.
    dyllm_compile.reset()
    graphs = counters["stats"]["unique_graphs"]
    run.decodes.append(decode(run.timed, work, args.confidence_threshold))
    progress(f"{run.mode}: timed decode {len(run.decodes)} in {run.decodes[-1].stats.seconds:.2f} s")
    run.recompiles += counters["stats"]["unique_graphs"] - graphs
    run.cache_bytes = sum(r.cache_bytes() for r in run.runtimes())


def summarize(run: ModeRun, work: Workload, dtype: torch.dtype) -> dict:
    """The mode's row: throughput of its median timed decode, latencies over all of them, its counters."""
    mode, timed = run.mode, run.timed
    result = sorted(run.decodes, key=lambda d: d.stats.seconds)[len(run.decodes) // 2]  # the median decode
    live = run.runtimes()
    cfg = work.model.cfg
    batch, n = result.tokens.shape
    row = dict(
        mode=mode, tokens=result.tokens.cpu(), tokens_per_s=result.stats.tokens_per_second,
        forward_calls=result.stats.forward_calls,
        step_ms_median=1e3 * statistics.median(timed.times), step_ms_p90=1e3 * percentile(timed.times, 0.9),
        compile_s=max(0.0, run.warmup - result.stats.seconds),
        dynamo_graphs=run.graphs, recompiles_timed=run.recompiles, peak_mem_mb=run.peak_mem_mb,
    )
    shape = Shape.of(cfg)
    fractions = None
    queried = 1.0
    if mode.startswith("dyllm") and live:
        stats = [r.stats for r in live if r.stats.history]
        per_call = stats[0].per_call_fractions(len(live[0].plan.sites)) if stats else torch.ones(0, 0)
        row["per_call"] = per_call
        fractions = per_call.mean(0).tolist() if per_call.numel() else [1.0] * cfg.n_layers
        queried = sum(s.queried_fraction for s in stats) / len(stats) if stats else 1.0
        gated, total = Report([r.plan.analysis for r in live], live[0].config).gated_flops()
        row.update(
            salient_fraction_mean=sum(fractions) / len(fractions),
            salient_fraction_per_layer=";".join(f"{f:.3f}" for f in fractions),
            queried_fraction=queried,
            rows_computed_fraction=sum(s.rows_computed for s in stats) / max(1, sum(s.rows_dense for s in stats)),
            gated_flops_share=gated / max(1, total),  # what the mode's rewrite plan gates (explain's share)
            cache_mb=run.cache_bytes / 2 ** 20,
            sparse_variants=sum(r.stats.sparse_compiles for r in live),  # compiled over the whole run
            # the weights whose products on gathered rows this process emitted weight first (linear_order="auto"
            # times both orders once per process: a run's speed may depend on what it chose)
            weight_first=";".join(sorted({"x".join(str(int(size)) for size in tensor_value(n.args[1]).shape)
                                          for r in live for n in r.plan.weight_first})) or "none",
        )
    elem = torch.finfo(dtype).bits // 8
    options = live[0].config if mode.startswith("dyllm") and live else None
    row["cost"] = step_cost(shape, batch, n, fractions if fractions and len(fractions) == cfg.n_layers else None,
                            elem, queried=queried,
                            mode=options.attention_mode if options else "exact",
                            output_projection=options.output_projection if options else "dense")
    return row


def set_bounds(rows: list[dict], machine: Machine) -> None:
    """Each row's roofline bound and the share of it achieved, on ``machine``'s numbers."""
    for row in rows:
        row["bound_ms"] = 1e3 * row["cost"].bound_seconds(machine)
        row["bound_share"] = row["bound_ms"] / row["step_ms_median"]


def machine_facts(device: torch.device) -> dict:
    import triton  # noqa: F401  (a test dependency everywhere the benchmark runs)

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
                    platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
        name = f"{name} ({torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=sys.modules["triton"].__version__)


FIELDS = [
    "device", "torch", "triton", "model", "weights", "params_m", "layers", "d_model", "seq_len", "gen_length",
    "block_length", "batch", "dtype", "decoding", "mode", "threshold", "saliency", "tokens_per_s",
    "speedup_vs_inductor", "speedup_vs_eager", "step_ms_median", "step_ms_p90", "forward_calls", "compile_s",
    "compile_vs_inductor", "compile_cache", "timed_decodes", "dynamo_graphs", "recompiles_timed", "sparse_variants",
    "weight_first", "peak_mem_mb", "cache_mb",
    "salient_fraction_mean", "salient_fraction_per_layer", "queried_fraction", "rows_computed_fraction",
    "gated_flops_share",
    "bound_ms", "bound_share", "same_tokens_as_eager",
]


def warm_up(args, device: torch.device, dtype: torch.dtype) -> None:
    """One untimed run of every mode on the tiny model, each from empty caches: the process's one-time costs
    (imports, the C++ compiler probe, thread pools, Triton's start-up) then fall outside every timed compile,
    instead of all landing on the first configuration's first compiling mode."""
    work = make_workload("tiny", 1, args, args.device, dtype)
    work.model.to(device=device, dtype=dtype)
    work.prompts = work.prompts.to(device)
    run_config(work, args, device, dtype, {})


def run_config(work: Workload, args, device: torch.device, dtype: torch.dtype, facts: dict,
               publish: Callable[[list[dict]], None] = lambda rows: None) -> tuple[list[dict], list[ModeRun]]:
    """Every mode compiles (each cold, one after the other), then the timed decodes go round-robin over the
    modes: a slow phase of a shared machine slows every mode alike instead of the one that ran in it. After each
    round the rows so far (each mode's median over the rounds done) go to ``publish``, so a run stopped by a time
    limit keeps them. The rows, and the modes' runs."""
    torch._dynamo.reset()
    counters.clear()
    runs = []
    for mode in args.modes.split(","):
        # Cold compiles: each mode gets an empty Inductor cache directory and empty in-memory code caches, so no
        # mode reuses kernels another one compiled (dyllm's dense variant shares most of Inductor's kernels).
        with contextlib.nullcontext() if args.warm_compile_cache else fresh_cache():
            runs.append(prepare_mode(mode, work, args, device))
    rows = []
    for _ in range(args.repeats):
        for run in runs:
            timed_decode(run, work, args)
        rows = config_rows(runs, work, args, dtype, facts)
        publish(rows)
    return rows, runs


def config_rows(runs: list[ModeRun], work: Workload, args, dtype: torch.dtype, facts: dict) -> list[dict]:
    """The configuration's rows from its modes' timed decodes so far, with the ratios between the modes."""
    cfg = work.model.cfg
    rows = [summarize(run, work, dtype) for run in runs]
    by_mode = {r["mode"]: r for r in rows}
    decoding = "low-confidence" if args.confidence_threshold is None else f"threshold {args.confidence_threshold}"
    saliency = "measured" if args.force_fraction is None else f"fixed {args.force_fraction}"
    for r in rows:
        r.update(facts)
        r.update(
            model=work.name, weights=work.weights, params_m=sum(p.numel() for p in work.model.parameters()) / 1e6,
            layers=cfg.n_layers, d_model=cfg.d_model, seq_len=r["tokens"].shape[1], gen_length=work.gen_length,
            block_length=work.block_length, batch=r["tokens"].shape[0], dtype=str(dtype).replace("torch.", ""),
            decoding=decoding, threshold=args.threshold if r["mode"].startswith("dyllm") else "",
            saliency=saliency if r["mode"].startswith("dyllm") else "", timed_decodes=len(runs[0].decodes),
            compile_cache="warm" if args.warm_compile_cache else "cold",
        )
        for ref in ("inductor", "eager"):
            if ref in by_mode:
                r[f"speedup_vs_{ref}"] = r["tokens_per_s"] / by_mode[ref]["tokens_per_s"]
        if "inductor" in by_mode and by_mode["inductor"]["compile_s"] > 0 and r["mode"] != "eager":
            r["compile_vs_inductor"] = r["compile_s"] / by_mode["inductor"]["compile_s"]
        if "eager" in by_mode:
            r["same_tokens_as_eager"] = bool(torch.equal(r["tokens"], by_mode["eager"]["tokens"]))
    return rows


@contextlib.contextmanager
def profiled(label: str, **kwargs):
    """torch.profiler over the block (host, and device on CUDA; ``kwargs`` to it, e.g. a schedule); then prints
    its table per operator and kernel, the largest device (else host) time first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else []), **kwargs) as prof:
        yield prof
        if cuda:
            torch.cuda.synchronize()
    print(f"-- profile: {label}")
    print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=14, max_name_column_width=48), flush=True)


class _Stepped:
    """A model whose every call advances the profiler's schedule."""

    def __init__(self, fn: Callable, prof) -> None:
        self.fn, self.prof = fn, prof

    def __call__(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        self.prof.step()
        return out


def profile_decode(run: ModeRun, work: Workload, args, steps: int = 8) -> None:
    """Where a mode's step time goes: one more decode, profiled over ``steps`` calls after the first two (a
    block's first call runs the dense variant)."""
    from torch.profiler import schedule

    dyllm_compile.reset()
    with profiled(f"{run.mode}, {steps} steps", schedule=schedule(skip_first=2, wait=0, warmup=1, active=steps,
                                                                   repeat=1)) as prof:
        decode(_Stepped(run.timed.fn, prof), work, args.confidence_threshold)


def write_csv(rows: list[dict], path: str, fields: Sequence[str] = FIELDS, digits: int = 4) -> None:
    """Rows as CSV (the benchmarks' common format): ``fields`` in order, floats to ``digits`` significant digits."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.{digits}g}" if isinstance(v, float) else v) for k, v in r.items()
                             if k in fields})


def plot(rows: list[dict], prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    configs = list(dict.fromkeys((r["model"], r["batch"], r["decoding"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(configs) + 2), 4))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        values = [next((r.get("speedup_vs_inductor", float("nan")) for r in rows
                        if (r["model"], r["batch"], r["decoding"]) == c and r["mode"] == mode), float("nan"))
                  for c in configs]
        ax.bar([i + j * width for i in range(len(configs))], values, width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))])
    ax.set_xticklabels([f"{m}\nbatch {b}, {d}" for m, b, d in configs], fontsize=7)
    ax.set_ylabel("tokens/s vs dense Inductor")
    ax.set_title(f"whole decode, {rows[0]['device']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(f"{prefix}_speedup.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    heat = [r for r in rows if r["mode"] == "dyllm-paper" and r.get("per_call") is not None
            and r["per_call"].numel()]
    if heat:
        fig, axes = plt.subplots(1, len(heat), figsize=(4 * len(heat), 3.2), squeeze=False)
        for ax, r in zip(axes[0], heat):
            image = ax.imshow(r["per_call"].T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                              interpolation="nearest")
            ax.set(xlabel="decoding step", ylabel="layer", title=f"{r['model']}, batch {r['batch']}, {r['decoding']}")
            ax.set_yticks(range(r["per_call"].shape[1]))
            ax.title.set_fontsize(8)
            fig.colorbar(image, ax=ax, label="salient fraction")
        fig.tight_layout()
        paths.append(f"{prefix}_salient_heatmap.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


PRESETS = {
    # (workload, batch, confidence threshold)
    "cpu": [("default", 1, None), ("default", 8, None), ("default", 1, 0.9), ("reference", 1, None)],
    "gpu": [("llada", 1, None), ("llada", 8, None), ("dream", 1, None), ("llada", 8, 0.9)],
    "smoke": [("tiny", 1, None)],
}


def make_workload(name: str, batch: int, args, device: str, dtype: torch.dtype) -> Workload:
    if name == "default":
        return default_workload(batch)
    if name == "reference":
        return reference_workload(batch, attention=args.attention, ffn=args.ffn,
                                  hyper_connections=args.hyper_connections)
    if name == "host":
        return host_workload(batch, args.layers, args.prompt_length)
    if name == "tiny":
        model = llada_like("tiny")
        prompts = torch.randint(1, 127, (batch, 8), generator=torch.Generator().manual_seed(0))
        return Workload("llada-like tiny", model, prompts, 4, 4, 2, "random")
    return full_size_workload(name, batch, device, dtype, args.checkpoint, args.layers, args.prompt_length)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a named set of configurations")
    parser.add_argument("--model", choices=("default", "reference", "llada", "dream", "host", "tiny"),
                        default="default",
                        help="host: many layers at a tiny width, a step's time the host's (the proxy on a CPU for a "
                             "GPU's batch-1 step)")
    parser.add_argument("--checkpoint", help="local checkpoint directory for --model llada/dream")
    parser.add_argument("--layers", type=int, default=None,
                        help="--model llada/dream with random weights: only the first this many decoder layers "
                             "(each layer's shapes unchanged; named in the results), to fit a short device lease; "
                             "--model host: its layer count (default LLaDA-8B's 32)")
    parser.add_argument("--prompt-length", type=int, default=None,
                        help=f"--model llada/dream: prompt tokens (default {FULL_SIZE_TOKENS} in all with the 256 "
                             "generated); --model host: default 32, with 32 generated")
    parser.add_argument("--attention", choices=tuple(ATTENTION_FORMS), default="sdpa",
                        help="--model reference: attention as one SDPA call, written by hand (softmax(q k^T) v), "
                             "written by hand with a learned sink logit per head (GPT-OSS's form) or with Gemma-2's "
                             "soft-capped scores (cap 50), or through flex_attention (its full mask)")
    parser.add_argument("--hyper-connections", type=int, default=0,
                        help="--model reference: this many residual streams per row, each branch reading a learned "
                             "mix of them and writing its output back into each (DeepSeek-V4's hyper-connections)")
    parser.add_argument("--ffn", choices=sorted(FFNS), default="swiglu",
                        help="--model reference: its FFN, or an MoE (8 experts, top 2) computing every expert on "
                             "every row, dispatching each expert's rows (torch.where, index_add_: OLMoE's and "
                             "LLaDA-MoE's form; traced with torch._dynamo.config.capture_dynamic_output_shape_ops) "
                             "or sorting the rows by expert for grouped products (transformers 5's grouped_mm)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--threshold", type=float, default=0.99, help="dyllm saliency threshold")
    parser.add_argument("--confidence-threshold", type=float, default=None,
                        help="threshold parallel decoding (default: one token per step)")
    parser.add_argument("--query-pruning-period", type=int, default=32,
                        help="dyllm-*-qp: prompt rows are queried on every this many calls")
    parser.add_argument("--force-fraction", type=float, default=None,
                        help="fixed-salient-fraction mode: this share of rows forced salient per layer")
    parser.add_argument("--lowering", choices=("inductor", "aot_eager"), default="inductor",
                        help="dyllm's lowering (aot_eager only for smoke runs: it times nothing useful)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out", default=None, help="CSV path (default: benchmarks/results/decode_<device>.csv)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed decodes per mode: tokens/s is the median decode's, step latencies pool them all")
    parser.add_argument("--profile", action="store_true",
                        help="after each configuration's rows are written, profile 8 steps of one more decode per "
                             "mode (torch.profiler's table per operator and kernel)")
    parser.add_argument("--log-compiles", action="store_true",
                        help="log each variant dyllm compiles (the dyllm_compile logger at INFO) between the "
                             "progress lines, on their clock")
    parser.add_argument("--warm-compile-cache", action="store_true",
                        help="keep Inductor's on-disk and in-memory caches (default: each mode starts from empty "
                             "ones, so compile times are cold compiles, comparable between modes)")
    args = parser.parse_args(argv)
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    full_size = args.preset == "gpu" or (args.preset is None and args.model in ("llada", "dream"))
    sized = full_size or args.model == "host"  # the workloads whose layers and prompt length are options
    if args.layers is not None:
        if args.layers < 1 or args.checkpoint or not sized:
            parser.error("--layers takes a positive count and applies to random weights of the full-size shapes "
                         "(--model llada/dream or --preset gpu, without --checkpoint) and to --model host")
    if args.attention != "sdpa" and (args.preset is not None or args.model != "reference"):
        parser.error("--attention applies to --model reference")
    if args.ffn != "swiglu" and (args.preset is not None or args.model != "reference"):
        parser.error("--ffn applies to --model reference")
    if args.hyper_connections and (args.hyper_connections < 0 or args.preset is not None
                                   or args.model != "reference"):
        parser.error("--hyper-connections takes a positive count and applies to --model reference")
    if args.prompt_length is not None and (args.prompt_length < 1 or not sized):
        parser.error("--prompt-length takes a positive count and applies to --model llada/dream/host or --preset gpu")
    return args


def cold_compiles() -> None:
    """Inductor's caches off: a cache hit would make one mode's compile look free."""
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.log_compiles:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(ElapsedFormatter())
        logging.getLogger("dyllm_compile").addHandler(handler)
        logging.getLogger("dyllm_compile").setLevel(logging.INFO)
    if args.ffn == "moe-dispatch":  # else Dynamo breaks the graph at each expert's torch.where
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
    if not args.warm_compile_cache:
        cold_compiles()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    configs = PRESETS[args.preset] if args.preset else [(args.model, args.batch, args.confidence_threshold)]
    facts = machine_facts(device)
    machine = measure_machine(device, dtype)
    print(f"{facts['device']}: measured {machine.bandwidth / 1e9:.1f} GB/s, {machine.peak_flops / 1e12:.2f} "
          f"TFLOP/s ({dtype}); torch {facts['torch']}, triton {facts['triton']}")
    progress("warming up every mode on the tiny model")
    warm_up(args, device, dtype)
    out = args.out or os.path.join(RESULTS, f"decode_{device.type}.csv")
    done = []  # the finished configurations' rows

    def publish(rows: list[dict]) -> None:  # after every round of timed decodes
        set_bounds(done + rows, machine)
        write_csv(done + rows, out)

    for name, batch, confidence in configs:
        args.confidence_threshold = confidence
        progress(f"building {name}, batch {batch}")
        work = make_workload(name, batch, args, args.device, dtype)
        work.model.to(device=device, dtype=dtype)
        work.prompts = work.prompts.to(device)
        config_rows, runs = run_config(work, args, device, dtype, facts, publish)
        # The machine is measured again after every configuration and its best numbers kept: a shared machine's
        # slow phase at one measurement would otherwise lower the bound below what the modes then achieve.
        machine = machine.best(measure_machine(device, dtype))
        done += config_rows
        publish([])
        for r in config_rows:
            print(f"{r['model']:<28} b{r['batch']:<3} {r['decoding']:<16} {r['mode']:<12} "
                  f"{r['tokens_per_s']:>9.1f} tok/s  x{r.get('speedup_vs_inductor', float('nan')):.2f} vs "
                  f"inductor  step {r['step_ms_median']:.2f} ms (bound {r['bound_ms']:.2f})  "
                  f"salient {r.get('salient_fraction_mean', 1.0):.3f}", flush=True)
        if args.profile:
            for run in runs:
                profile_decode(run, work, args)
    rows = done
    print(f"bounds from the best measurements of the run: {machine.bandwidth / 1e9:.1f} GB/s, "
          f"{machine.peak_flops / 1e12:.2f} TFLOP/s")
    paths = plot(rows, os.path.splitext(out)[0])
    print("wrote", out, *paths)
    return rows


if __name__ == "__main__":
    main()
