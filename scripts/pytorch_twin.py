#!/usr/bin/env python3
"""PyTorch twin of the ladder's LLaMA rung (t0808's `llama`, trained in t0810; same config, same
parameter names, same initial weights, same batches), for honest side-by-side comparisons on the
same card, in the configurations a practitioner would choose.

Usage (on the GPU host, whose python3 has torch + safetensors):

  # 1. loss parity: train from the initial weights and batches that the Rust side dumped with
  #    `t0810_kv_cache`'s `parity` example (--dump DIR), and compare with its loss curve
  python3 scripts/pytorch_twin.py parity DIR [--device cuda] [--dtype f32]

  # 2. training throughput (forward + backward + AdamW): eager or torch.compile; the model cast to
  #    the dtype ("pure" bf16) or kept in f32 under autocast (--amp); AdamW foreach or fused
  python3 scripts/pytorch_twin.py train-bench --config DIR/config.json --batch 64 --steps 30 --dtype bf16 [--compile] [--amp] [--fused-adamw]

  # 3. decode throughput with a static KV cache (prompt 128, 512 new tokens), batch 1 and 32:
  #    eager, or the decode step compiled with mode="reduce-overhead" (CUDA graphs, as gpt-fast)
  python3 scripts/pytorch_twin.py decode-bench --config DIR/config.json --batch 1 --prompt 128 --new 512 --dtype bf16 [--graphs]

Each command prints a table and writes JSON (--json PATH) so scripts/compare_with_twin.py can print ratios.
Nothing here is needed to build or test the Rust workspace.
"""
import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F


def load_config(path):
    """An `LmConfig` (t0804) of the LLaMA rung, or the older recipe-style config."""
    with open(path) as f:
        cfg = json.load(f)
    llama = {"norm": "RmsNorm", "ffn": "SwiGlu", "positions": "Rope", "bias": False, "placement": "Pre"}
    wrong = {k: cfg[k] for k, v in llama.items() if k in cfg and cfg[k] != v}
    if cfg.get("recipe", "Llama") != "Llama" or wrong:
        raise SystemExit(f"the twin implements the LLaMA rung only (RMSNorm, SwiGLU, RoPE, no biases, pre-norm); the config has {wrong or cfg.get('recipe')}")
    return cfg


class Twin(torch.nn.Module):
    """Pre-norm RMSNorm, grouped-query attention with interleaved RoPE, SwiGLU, untied head.
    Weights are stored (d_out, d_in) under the Rust checkpoint's names."""

    def __init__(self, cfg, naive_attention=False):
        super().__init__()
        self.cfg = cfg
        self.naive_attention = naive_attention  # training forward: written-out softmax instead of SDPA
        d, h, kv = cfg["d_model"], cfg["n_heads"], cfg["n_kv_heads"]
        self.d_head = d // h
        P = lambda *s: torch.nn.Parameter(torch.empty(*s))
        self.params = torch.nn.ParameterDict()
        self.params["token_embedding"] = P(cfg["vocab_size"], d)
        for i in range(cfg["n_layers"]):
            b = f"blocks.{i}."
            self.params[(b + "attn_norm.weight").replace(".", "__")] = P(d)
            self.params[(b + "attn.q_proj").replace(".", "__")] = P(h * self.d_head, d)
            self.params[(b + "attn.k_proj").replace(".", "__")] = P(kv * self.d_head, d)
            self.params[(b + "attn.v_proj").replace(".", "__")] = P(kv * self.d_head, d)
            self.params[(b + "attn.output_proj").replace(".", "__")] = P(d, h * self.d_head)
            self.params[(b + "ffn_norm.weight").replace(".", "__")] = P(d)
            self.params[(b + "ffn.w1").replace(".", "__")] = P(cfg["d_ff"], d)
            self.params[(b + "ffn.w2").replace(".", "__")] = P(d, cfg["d_ff"])
            self.params[(b + "ffn.w3").replace(".", "__")] = P(cfg["d_ff"], d)
        self.params["final_norm__weight"] = P(d)
        self.params["lm_head"] = P(cfg["vocab_size"], d)
        # RoPE tables, interleaved pairs (x[2k], x[2k+1]) rotated by m·θ_k, θ_k = base^(-2k/d_head).
        k = torch.arange(0, self.d_head, 2, dtype=torch.float64)
        theta = cfg["rope_theta"] ** (-k / self.d_head)
        angles = torch.arange(cfg["max_seq_len"], dtype=torch.float64)[:, None] * theta[None, :]
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def p(self, name):
        return self.params[name.replace(".", "__")]

    def load_rust(self, tensors):
        with torch.no_grad():
            for name, t in tensors.items():
                self.p(name).copy_(t)

    def init_like_rust(self):
        """CS336 init, as shared::params: truncated normal σ²=2/(d_in+d_out) at ±3σ for matrices,
        N(0,1) embeddings, ones for norm gains."""
        with torch.no_grad():
            for name, p in self.params.items():
                if name == "token_embedding":
                    p.normal_(0.0, 1.0)
                elif p.dim() == 1:
                    p.fill_(1.0)
                else:
                    std = math.sqrt(2.0 / (p.shape[0] + p.shape[1]))
                    torch.nn.init.trunc_normal_(p, 0.0, std, -3 * std, 3 * std)

    def rms(self, x, g):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.cfg["norm_eps"]) * g.float()).to(x.dtype)

    def rope(self, x, start):
        n = x.shape[-2]
        cos = self.cos[start:start + n].to(x.dtype)
        sin = self.sin[start:start + n].to(x.dtype)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2)

    def attention(self, i, x, start=0, cache=None):
        b, n, _ = x.shape
        h, kv, dh = self.cfg["n_heads"], self.cfg["n_kv_heads"], self.d_head
        pre = f"blocks.{i}.attn."
        q = (x @ self.p(pre + "q_proj").t()).view(b, n, h, dh).transpose(1, 2)
        k = (x @ self.p(pre + "k_proj").t()).view(b, n, kv, dh).transpose(1, 2)
        v = (x @ self.p(pre + "v_proj").t()).view(b, n, kv, dh).transpose(1, 2)
        q, k = self.rope(q, start), self.rope(k, start)
        if cache is not None:
            k, v = cache.update(i, k, v, start)
        causal = cache is None or n > 1
        if self.naive_attention and cache is None:
            out = self._naive(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and k.shape[-2] == n, enable_gqa=(kv != h)) \
                if (k.shape[-2] == n or n == 1) else self._masked(q, k, v, start)
        out = out.transpose(1, 2).reshape(b, n, h * dh)
        return out @ self.p(pre + "output_proj").t()

    def _naive(self, q, k, v):
        """Causal attention written out, as nanoGPT's non-flash path: the (n, n) scores are
        materialised, scaled, masked (`masked_fill`) and softmaxed (`torch.softmax`, one fused
        kernel), then multiplied by V. Training only: queries and keys are the same n positions."""
        n, g = q.shape[-2], q.shape[1] // k.shape[1]
        assert k.shape[-2] == n, "the written-out attention serves the training forward (no cache)"
        if g > 1:
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
        mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v

    def _masked(self, q, k, v, start):
        n, m = q.shape[-2], k.shape[-2]
        mask = torch.arange(m, device=q.device)[None, :] <= (torch.arange(n, device=q.device)[:, None] + m - n)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def forward(self, tokens, start=0, cache=None):
        x = F.embedding(tokens, self.params["token_embedding"])
        for i in range(self.cfg["n_layers"]):
            b = f"blocks.{i}."
            x = x + self.attention(i, self.rms(x, self.p(b + "attn_norm.weight")), start, cache)
            hdn = self.rms(x, self.p(b + "ffn_norm.weight"))
            gate = F.silu(hdn @ self.p(b + "ffn.w1").t()) * (hdn @ self.p(b + "ffn.w3").t())
            x = x + gate @ self.p(b + "ffn.w2").t()
        x = self.rms(x, self.params["final_norm__weight"])
        return x @ self.params["lm_head"].t()


class KvCache(torch.nn.Module):
    """The preallocated cache as module buffers: torch.compile treats buffers as static inputs, so
    the CUDA graph of the decode step may write into them (a plain tensor attribute is an input
    whose mutation makes `reduce-overhead` skip the graph)."""

    def __init__(self, cfg, batch, max_len, dtype, device):
        super().__init__()
        dh = cfg["d_model"] // cfg["n_heads"]
        shape = (cfg["n_layers"], batch, cfg["n_kv_heads"], max_len, dh)
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    def update(self, layer, k, v, start):
        n = k.shape[-2]
        self.k[layer, :, :, start:start + n] = k
        self.v[layer, :, :, start:start + n] = v
        return self.k[layer, :, :, :start + n], self.v[layer, :, :, :start + n]


class StaticDecode(torch.nn.Module):
    """One decode step over the whole preallocated cache, with the position as a device tensor:
    fixed shapes, no host decisions, so torch.compile(mode="reduce-overhead") can capture it in
    a CUDA graph (as gpt-fast does: the model and the cache are submodules, their tensors static).
    Greedy: the next token is chosen on the device."""

    def __init__(self, model, cache):
        super().__init__()
        self.m, self.cache = model, cache
        self.max_len = cache.k.shape[3]

    def forward(self, tok, pos):
        return self.step(tok, pos)

    def step(self, tok, pos):
        m, cfg = self.m, self.m.cfg
        b = tok.shape[0]
        h, kv, dh = cfg["n_heads"], cfg["n_kv_heads"], m.d_head
        cos, sin = m.cos[pos].to(self.cache.k.dtype), m.sin[pos].to(self.cache.k.dtype)  # (1, dh/2)
        mask = (torch.arange(self.max_len, device=tok.device) <= pos)[None, None, None, :]
        x = F.embedding(tok, m.params["token_embedding"])  # (b, 1, d)
        for i in range(cfg["n_layers"]):
            pre = f"blocks.{i}."
            y = m.rms(x, m.p(pre + "attn_norm.weight"))
            q = (y @ m.p(pre + "attn.q_proj").t()).view(b, 1, h, dh).transpose(1, 2)
            k = (y @ m.p(pre + "attn.k_proj").t()).view(b, 1, kv, dh).transpose(1, 2)
            v = (y @ m.p(pre + "attn.v_proj").t()).view(b, 1, kv, dh).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.cache.k[i].index_copy_(2, pos, k)
            self.cache.v[i].index_copy_(2, pos, v)
            out = F.scaled_dot_product_attention(q, self.cache.k[i], self.cache.v[i], attn_mask=mask, enable_gqa=(kv != h))
            x = x + out.transpose(1, 2).reshape(b, 1, h * dh) @ m.p(pre + "attn.output_proj").t()
            hdn = m.rms(x, m.p(pre + "ffn_norm.weight"))
            gate = F.silu(hdn @ m.p(pre + "ffn.w1").t()) * (hdn @ m.p(pre + "ffn.w3").t())
            x = x + gate @ m.p(pre + "ffn.w2").t()
        x = m.rms(x, m.params["final_norm__weight"])
        return (x @ m.params["lm_head"].t())[:, -1].argmax(-1, keepdim=True)


def rotate(x, cos, sin):
    """Interleaved RoPE of x (…, n, dh) with cos, sin (n, dh/2)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def adamw(model, cfg_opt, fused=False):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg_opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg_opt["lr"], betas=(cfg_opt["beta1"], cfg_opt["beta2"]), eps=cfg_opt["eps"], fused=fused)


def cosine_lr(step, max_lr, min_lr, warmup, total):
    if step < warmup:
        return max_lr * step / warmup
    if step >= total:
        return min_lr
    progress = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(args):
    from safetensors.torch import load_file
    with open(f"{args.dir}/parity.json") as f:
        spec = json.load(f)
    cfg = load_config(f"{args.dir}/config.json")
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.dtype == "f32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    model = Twin(cfg).to(args.device)
    model.load_rust({k: v for k, v in load_file(f"{args.dir}/init.safetensors").items()})
    model = model.to(dtype)
    batches = load_file(f"{args.dir}/batches.safetensors")
    opt = adamw(model, spec["adamw"] | {"lr": spec["schedule"]["max_lr"]})
    s = spec["schedule"]
    losses = []
    for step in range(spec["steps"]):
        x = batches[f"x.{step}"].long().to(args.device)
        y = batches[f"y.{step}"].long().to(args.device)
        lr = cosine_lr(step, s["max_lr"], s["min_lr"], s["warmup_steps"], s["total_steps"])
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if s.get("clip_norm"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), s["clip_norm"])
        opt.step()
        losses.append(loss.item())
    ours = spec["losses"]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ours)]
    print(f"steps {len(losses)}: twin first/last {losses[0]:.4f}/{losses[-1]:.4f}, rust {ours[0]:.4f}/{ours[-1]:.4f}")
    print(f"max relative difference {max(rel):.4%}, mean {sum(rel) / len(rel):.4%}")
    out = {"twin_losses": losses, "rust_losses": ours, "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel),
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "dtype": args.dtype}
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)
    return out


def join_ddp(args):
    """--ddp under torchrun: this process's (rank, world), its GPU (cuda:LOCAL_RANK) and the
    process group (NCCL on GPUs, gloo on the CPU); (0, 1) without --ddp."""
    if not args.ddp:
        return 0, 1
    import torch.distributed as dist
    if "RANK" not in os.environ:
        raise SystemExit("--ddp: start with torchrun --nproc_per_node N scripts/pytorch_twin.py train-bench --ddp ...")
    if args.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train_bench(args):
    cfg = load_config(args.config)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.dtype == "f32":  # full-precision GEMMs, as ours (no TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rank, world = join_ddp(args)
    torch.manual_seed(0)
    model = Twin(cfg, naive_attention=args.attention == "naive").to(args.device)
    model.init_like_rust()
    # --amp: f32 master weights and moments, bf16 compute under autocast (what practitioners run);
    # else the whole model, moments included, in the dtype.
    amp = args.amp and args.dtype == "bf16"
    model = model.to(torch.float32 if amp else dtype)
    module = model
    if args.ddp:  # gradients averaged over the ranks in buckets during the backward
        from torch.nn.parallel import DistributedDataParallel
        on_gpu = args.device.startswith("cuda")
        module = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if on_gpu else None)
        torch.manual_seed(1 + rank)  # every rank its own batches
    step_fn = torch.compile(module) if args.compile else module
    opt = adamw(model, {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1}, fused=args.fused_adamw)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext
    ctx = cfg["max_seq_len"]
    torch.cuda.reset_peak_memory_stats() if args.device.startswith("cuda") else None
    times = []
    for step in range(args.warmup + args.steps):
        x = torch.randint(0, cfg["vocab_size"], (args.batch, ctx), device=args.device)
        y = torch.randint(0, cfg["vocab_size"], (args.batch, ctx), device=args.device)
        sync(args.device)
        t0 = time.perf_counter()
        with autocast():
            logits = step_fn(x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    med = times[len(times) // 2]
    tok_s = args.batch * ctx * world / med  # every rank's tokens: the group's throughput
    n_params = sum(p.numel() for p in model.parameters())
    flops_per_token = 6 * n_params + 12 * cfg["n_layers"] * cfg["d_model"] * ctx  # 6N + attention (causal counted fully)
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else float("nan")
    name = ("torch.compile" if args.compile else "eager") + (" autocast" if amp else "") + (" fused-AdamW" if args.fused_adamw else "") + (f" DDP×{world}" if args.ddp else "")
    if rank == 0:
        print(f"pytorch {name} {args.dtype} {args.attention} attention: {tok_s:,.0f} tokens/s, {med * 1e3:.1f} ms/step, ~{tok_s * flops_per_token / 1e12:.1f} TFLOP/s, peak {peak:.2f} GiB")
    out = {"impl": f"pytorch-{name}", "dtype": args.dtype, "attention": args.attention, "batch": args.batch, "tokens_per_s": tok_s, "ms_per_step": med * 1e3,
           "tflops": tok_s * flops_per_token / 1e12, "peak_gib": peak, "params": n_params, "world": world,
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    if args.json and rank == 0:
        json.dump(out, open(args.json, "w"), indent=1)
    if args.ddp:
        torch.distributed.destroy_process_group()
    return out


@torch.no_grad()
def decode_bench(args):
    cfg = load_config(args.config)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    cfg = dict(cfg, max_seq_len=max(cfg["max_seq_len"], args.prompt + args.new))
    model = Twin(cfg).to(args.device)
    model.init_like_rust()
    model = model.to(dtype).eval()
    results = []
    cache = KvCache(cfg, args.batch, args.prompt + args.new, dtype, args.device)
    step = None
    if args.graphs:
        step = torch.compile(StaticDecode(model, cache), mode="reduce-overhead", fullgraph=True)
    for rep in range(3 if args.graphs else 2):  # the first repetitions warm up (and compile)
        prompt = torch.randint(0, cfg["vocab_size"], (args.batch, args.prompt), device=args.device)
        sync(args.device)
        t0 = time.perf_counter()
        logits = model(prompt, 0, cache)
        tok = logits[:, -1].argmax(-1, keepdim=True)
        sync(args.device)
        t1 = time.perf_counter()
        for i in range(args.new - 1):
            if step is None:
                logits = model(tok, args.prompt + i, cache)
                tok = logits[:, -1].argmax(-1, keepdim=True)
            else:
                tok = step(tok, torch.tensor([args.prompt + i], device=args.device)).clone()
        sync(args.device)
        t2 = time.perf_counter()
        results.append((t1 - t0, t2 - t1))
    prefill, decode = results[-1]
    tok_s = args.batch * (args.new - 1) / decode
    name = "compile reduce-overhead (CUDA graphs)" if args.graphs else "eager"
    print(f"pytorch {name} decode {args.dtype} batch {args.batch}: prefill {prefill * 1e3:.1f} ms, {decode / (args.new - 1) * 1e3:.2f} ms/step, {tok_s:,.0f} tokens/s")
    out = {"impl": f"pytorch-{name}", "dtype": args.dtype, "batch": args.batch, "prefill_ms": prefill * 1e3,
           "ms_per_token_step": decode / (args.new - 1) * 1e3, "tokens_per_s": tok_s,
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity")
    p.add_argument("dir")
    for q in (p,):
        pass
    t = sub.add_parser("train-bench")
    t.add_argument("--config", required=True)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--steps", type=int, default=20)
    t.add_argument("--warmup", type=int, default=5)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--amp", action="store_true", help="bf16 autocast over f32 weights and moments (with --dtype bf16)")
    t.add_argument("--fused-adamw", action="store_true", help="torch.optim.AdamW(fused=True)")
    t.add_argument("--attention", default="sdpa", choices=["sdpa", "naive"],
                   help="sdpa: F.scaled_dot_product_attention (fused kernels); naive: scores, mask, softmax, @V written out")
    t.add_argument("--ddp", action="store_true",
                   help="one rank of DistributedDataParallel under torchrun (--batch per rank; tokens/s of the whole group)")
    d = sub.add_parser("decode-bench")
    d.add_argument("--config", required=True)
    d.add_argument("--batch", type=int, default=1)
    d.add_argument("--prompt", type=int, default=128)
    d.add_argument("--new", type=int, default=512)
    d.add_argument("--graphs", action="store_true", help="decode step compiled with mode='reduce-overhead' (CUDA graphs)")
    for q in (p, t, d):
        q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        q.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
        q.add_argument("--json")
    args = ap.parse_args()
    {"parity": parity, "train-bench": train_bench, "decode-bench": decode_bench}[args.cmd](args)


if __name__ == "__main__":
    main()
