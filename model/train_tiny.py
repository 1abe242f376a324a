"""Train the bundled tiny GLA on Shakespeare: fixed seed, AdamW + cosine, bf16 autocast on CUDA.

Uses our own `model.GLAForCausalLM` and its HF forward with labels (the chunked PyTorch GLA form in
`kernels/` is differentiable), so the weights it writes are exactly what gla-serve loads. Data and
tokenizer come from `model.data_prep` (run automatically when --data is missing).

    python -m model.train_tiny --out runs/tiny --max-steps 20 --device cpu      # smoke run on a CPU
    python -m model.train_tiny --out runs/tiny --time-budget-s 240              # the shipped run (H100)
    python -m model.train_tiny --out model/bundled --max-steps 0                # random-init placeholder

With --time-budget-s the number of steps is fixed after timing the first steps, and written to the
log; rerunning with --max-steps set to that number repeats the run step for step.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import time
from pathlib import Path

import torch

from model import GLAConfig, GLAForCausalLM
from model.data_prep import BOS_ID, EOS_ID, PAD_ID, prepare

TINY_CONFIG = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_heads=4,
    expand_k=0.5,  # head_k_dim 32
    expand_v=1.0,  # head_v_dim 64
    hidden_ratio=4,  # MLP width 768 by fla's rounding
    vocab_size=4096,
    tie_word_embeddings=True,  # 1M fewer parameters, and the tied (340M-style) layout gets exercised
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
    max_position_embeddings=2048,
    use_cache=True,
)


def tiny_config() -> GLAConfig:
    return GLAConfig(**TINY_CONFIG)


def load_data(data_dir: Path, device: torch.device) -> dict[str, torch.Tensor]:
    if not (data_dir / "train.pt").is_file():
        prepare(data_dir)
    return {k: torch.load(data_dir / f"{k}.pt").long().to(device) for k in ("train", "val", "val_chat")}


def batch_windows(stream: torch.Tensor, starts: torch.Tensor, ctx: int) -> torch.Tensor:
    """[B, ctx] windows of the token stream starting at `starts` [B]."""
    return stream[starts.unsqueeze(1) + torch.arange(ctx, device=stream.device)]


def targets(x: torch.Tensor) -> torch.Tensor:
    """Labels for x: every token except `<s>`, which only marks where a document starts."""
    return x.masked_fill(x == BOS_ID, -100)


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine from peak down to floor * peak at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(
    model: GLAForCausalLM, stream: torch.Tensor, ctx: int, batch: int, max_windows: int | None = None
) -> float:
    """Mean next-token loss over consecutive non-overlapping windows of the stream (each window
    starts from a zero state, as in training)."""
    model.eval()
    n = (stream.numel() - 1) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    starts = torch.arange(n, device=stream.device) * ctx
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x = batch_windows(stream, starts[i : i + batch], ctx)
        with autocast(stream.device):
            loss = model(input_ids=x, labels=targets(x)).loss
        n_targets = int((targets(x)[:, 1:] != -100).sum())
        total += float(loss) * n_targets
        count += n_targets
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def sample(model: GLAForCausalLM, tokenizer, prompt: str | list[dict], max_new: int, temperature: float,
           top_p: float, seed: int) -> str:
    """Text generation through the serving interface (prefill, then decode steps on a state pool)."""
    model.eval()
    dev = model.lm_head.weight.device
    if isinstance(prompt, str):
        ids = tokenizer(prompt).input_ids
    else:
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    g = torch.Generator(device="cpu").manual_seed(seed)
    pool = model.new_state_pool(1)
    slots = torch.zeros(1, dtype=torch.int32, device=dev)
    x = torch.tensor(ids, dtype=torch.long, device=dev)
    cu = torch.tensor([0, len(ids)], dtype=torch.int32, device=dev)
    logits = model.prefill(x, cu, pool, slots)
    out: list[int] = []
    for _ in range(max_new):
        p = logits[0].float().cpu()
        if temperature <= 0:
            nxt = int(p.argmax())
        else:
            probs = torch.softmax(p / temperature, -1)
            sp, si = probs.sort(descending=True)
            keep = sp.cumsum(0) - sp < top_p
            sp = sp * keep
            nxt = int(si[torch.multinomial(sp / sp.sum(), 1, generator=g)])
        if nxt == EOS_ID:
            break
        out.append(nxt)
        logits = model.decode(torch.tensor([nxt], device=dev), pool, slots)
    model.train()
    return tokenizer.decode(out)


def param_groups(model: GLAForCausalLM, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; norms, biases and the (tied) embedding are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_model_dir(model: GLAForCausalLM, tokenizer_dir: Path, out: Path, dtype: torch.dtype) -> None:
    """save_pretrained (safetensors) in `dtype` plus the tokenizer files, into a clean directory."""
    if out.exists():
        for f in out.iterdir():
            if f.is_file():
                f.unlink()
    out.mkdir(parents=True, exist_ok=True)
    model.to(dtype).save_pretrained(str(out))
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, out / f.name)


def versions(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    import transformers

    info["transformers"] = transformers.__version__
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def train(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = load_data(args.data, device)
    config = tiny_config()
    model = GLAForCausalLM(config).to(device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
        fused=device.type == "cuda",
    )
    gen = torch.Generator(device=device).manual_seed(args.seed)
    train_stream = data["train"]
    hi = train_stream.numel() - args.ctx

    total = args.max_steps
    log: dict = {
        "config": config.to_diff_dict() | {"num_parameters": n_params},
        "data": json.loads((args.data / "meta.json").read_text()),
        "train_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "env": versions(device),
        "history": [],
    }
    print(f"params {n_params:,}  train tokens {train_stream.numel():,}  device {device}", flush=True)
    best = (float("inf"), -1, None)
    t0 = time.perf_counter()
    step = 0
    eval_every = args.eval_every
    probe_start, probe_t = args.probe_steps // 3, []
    while total is None or step < total:
        if total is None and step in (probe_start, args.probe_steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            probe_t.append(time.perf_counter())  # the first steps carry one-off start-up costs: untimed
        if total is None and step == args.probe_steps:
            per_step = (probe_t[1] - probe_t[0]) / (args.probe_steps - probe_start)
            elapsed = time.perf_counter() - t0
            total = max(step + 1, step + int((args.time_budget_s - elapsed) / per_step))
            if args.max_epochs:
                total = min(total, math.ceil(args.max_epochs * train_stream.numel() / (args.batch * args.ctx)))
            eval_every = eval_every or max(50, total // 12)
            log["steps_from_budget"] = {"probe_steps": step, "s_per_step": per_step, "total_steps": total}
            print(f"{per_step * 1e3:.1f} ms/step -> {total} steps in {args.time_budget_s:.0f}s", flush=True)
        lr = lr_at(step, total or 10**9, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, hi, (args.batch,), device=device, generator=gen)
        x = batch_windows(train_stream, starts, args.ctx)
        with autocast(device):
            loss = model(input_ids=x, labels=targets(x)).loss
        loss_value = loss.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        step += 1
        last = total is not None and step == total
        if step % args.log_every == 0 or last:
            print(f"step {step} loss {float(loss_value):.4f} lr {lr:.2e} gnorm {float(gnorm):.2f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
        if (eval_every and step % eval_every == 0) or last:
            val = evaluate(model, data["val"], args.ctx, args.eval_batch, args.val_windows)
            rec = {"step": step, "train_loss": float(loss_value), "val_loss": val, "time_s": time.perf_counter() - t0}
            log["history"].append(rec)
            print(f"  eval step {step}: val loss {val:.4f} ppl {math.exp(val):.2f}", flush=True)
            if val < best[0]:
                best = (val, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
    train_time = time.perf_counter() - t0
    if best[2] is not None:
        model.load_state_dict(best[2])  # keep the best validation checkpoint (guards against overfitting)
    train_eval = evaluate(model, train_stream, args.ctx, args.eval_batch, args.val_windows)
    val = evaluate(model, data["val"], args.ctx, args.eval_batch, args.val_windows)
    val_chat = evaluate(model, data["val_chat"], args.ctx, args.eval_batch, args.val_windows)
    log["result"] = {
        "steps": step,
        "best_step": best[1],
        "train_time_s": train_time,
        "tokens_seen": step * args.batch * args.ctx,
        "epochs": step * args.batch * args.ctx / train_stream.numel(),
        "train_loss": train_eval,
        "val_loss": val,
        "val_perplexity": math.exp(val),
        "val_chat_loss": val_chat,
        "val_chat_perplexity": math.exp(val_chat),
    }
    print(json.dumps(log["result"], indent=2), flush=True)
    from transformers import AutoTokenizer

    tok_dir = args.data / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    samples = {}
    for name, prompt in (
        ("completion", "ROMEO.\nBut soft, what light"),
        ("chat", [{"role": "user", "content": "Good hermit, what is love?"}]),
    ):
        try:
            samples[name] = {"prompt": prompt, "text": sample(model, tokenizer, prompt, args.sample_tokens,
                                                               0.8, 0.95, args.seed)}
        except Exception as e:  # a sample is a nicety; never lose a trained model to it
            samples[name] = {"prompt": prompt, "error": repr(e)}
    log["samples"] = samples
    save_model_dir(model, tok_dir, args.out, getattr(torch, args.save_dtype))
    log["saved"] = {"dir": str(args.out), "dtype": args.save_dtype,
                    "bytes": sum(f.stat().st_size for f in args.out.iterdir())}
    if args.log:
        args.log.parent.mkdir(parents=True, exist_ok=True)
        args.log.write_text(json.dumps(log, indent=2) + "\n")
    return log


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(".data/prepared"), help="model.data_prep output")
    ap.add_argument("--out", type=Path, required=True, help="HF model directory to write")
    ap.add_argument("--log", type=Path, default=None, help="JSON log path")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--time-budget-s", type=float, default=None, help="pick max steps to fit this time")
    ap.add_argument("--max-epochs", type=float, default=0, help="with --time-budget-s: at most this many epochs")
    ap.add_argument("--probe-steps", type=int, default=30, help="steps timed before fixing the count")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=0, help="0: about 12 evaluations per run")
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--val-windows", type=int, default=None, help="cap evaluation windows (CPU runs)")
    ap.add_argument("--sample-tokens", type=int, default=80)
    ap.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args(argv)
    if args.max_steps is None and args.time_budget_s is None:
        ap.error("give --max-steps or --time-budget-s")
    if args.max_steps is not None and args.eval_every == 0:
        args.eval_every = max(1, args.max_steps // 12) if args.max_steps else 0
    return args


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
