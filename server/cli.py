"""`gla-serve` command line: serve, generate, info.

`generate` runs the model's serving interface directly (prefill then decode through a one-slot
state pool), so it works without the HTTP server and exercises the same code path the engine uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local model directory (default: the bundled tiny model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, bf16 on CUDA)")


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


def cmd_generate(args: argparse.Namespace) -> int:
    from model import load_model

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    if tok is None:
        print("error: the model directory has no tokenizer", file=sys.stderr)
        return 2
    ids = tok(args.prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        print("error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(args.seed)
    dev = model.lm_head.weight.device
    pool = model.new_state_pool(1)
    slots = torch.zeros(1, dtype=torch.int32, device=dev)
    t0 = time.perf_counter()
    logits = model.prefill(
        torch.tensor(ids, device=dev), torch.tensor([0, len(ids)], dtype=torch.int32, device=dev), pool, slots
    )[0]
    out: list[int] = []
    printed = ""
    for _ in range(args.max_tokens):
        nxt = _sample(logits, args.temperature, args.top_p, gen)
        if nxt == tok.eos_token_id:
            break
        out.append(nxt)
        text = tok.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # hold back an incomplete UTF-8 sequence
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
        logits = model.decode(torch.tensor([nxt], device=dev), pool, slots)[0]
    dt = time.perf_counter() - t0
    sys.stdout.write("\n")
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / max(dt, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from model import GLAConfig, state_bytes_per_sequence
    from model.loader import resolve_model_path

    path = resolve_model_path(args.model)
    cfg = GLAConfig.from_pretrained(str(path))
    model, _ = _load_meta(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    info = {
        "model": str(path),
        "parameters": n_params,
        "state_bytes_per_sequence": state_bytes_per_sequence(cfg),
        "head_k_dim": cfg.head_k_dim,
        "head_v_dim": cfg.head_v_dim,
        "intermediate_size": cfg.mlp_intermediate_size,
        "config": cfg.to_dict(),
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print(f"model:                     {info['model']}")
        print(f"parameters:                {n_params:,}")
        print(f"state bytes per sequence:  {info['state_bytes_per_sequence']:,}")
        dims = f"K={cfg.head_k_dim}, V={cfg.head_v_dim}"
        print(f"layers x heads:            {cfg.num_hidden_layers} x {cfg.num_heads} ({dims})")
        print("config:")
        print(json.dumps(cfg.to_diff_dict(), indent=2, default=str))
    return 0


def _load_meta(cfg):
    from model import GLAForCausalLM

    with torch.device("meta"):
        return GLAForCausalLM(cfg), None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":
        from server.serve import main as serve_main

        serve_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="gla-serve", description="Serve and run GLA language models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the HTTP server (see `gla-serve serve --help`)")
    g = sub.add_parser("generate", help="generate text from a prompt, streamed to the terminal")
    g.add_argument("prompt")
    _add_model_args(g)
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    i = sub.add_parser("info", help="print config, parameter count and state bytes per sequence")
    i.add_argument("--model", default=None)
    i.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "generate" and args.max_tokens < 1:
        parser.error("--max-tokens must be >= 1")
    try:
        return cmd_generate(args) if args.cmd == "generate" else cmd_info(args)
    except (FileNotFoundError, ValueError) as e:  # a bad model dir or checkpoint: say so, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
