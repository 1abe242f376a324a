"""Where our bf16 serving path and fla's bf16 model part ways: layer 0's attention, stage by stage.

`fla_parity.py` compares logits, which mixes every rounding of every layer. This script takes fla
0.6.0's `GLAForCausalLM` (the parity script's small random model), records what fla's layer-0
attention computed at each stage (q, k, v, the log gate, the chunk kernel's output, the norm x swish
gate, o_proj), and feeds each of our stages the very tensors fla's stage received. Each row is then
that stage's own disagreement (rel-RMS), and for the recurrence also each side's distance from a
float64 reference on the same inputs, so a row says whether ours rounds differently or worse.

    python benchmarks/fla_stages.py --out benchmarks/results/fla-stages.json   # GPU; fla on PYTHONPATH
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os

import torch
from fla_parity import VARIANTS, first_config_only, fla_model, rel_rms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="fla-stages.json")
    ap.add_argument("--T", type=int, default=200)
    ap.add_argument("--variant", choices=tuple(VARIANTS), default="plain")
    args = ap.parse_args()
    first_config_only()
    import fla.layers.gla as fla_gla

    import kernels
    from kernels.naive import naive_recurrent_gla
    from model import load_checkpoint

    dev = "cuda"
    ref, d = fla_model(VARIANTS[args.variant], dev)
    ref = ref.to(torch.bfloat16)
    ours = load_checkpoint(d, dtype=torch.bfloat16, device=dev)
    T = args.T
    ids = torch.randint(0, 1000, (2, T), device=dev, generator=torch.Generator(dev).manual_seed(T))

    seen: dict[str, object] = {}
    chunk = fla_gla.chunk_gla

    def spy(**kw):  # type: ignore[no-untyped-def]
        out = chunk(**kw)
        if "o" not in seen:
            seen.update(q=kw["q"], k=kw["k"], v=kw["v"], g=kw["g"], o=out[0], state=out[1])
        return out

    fla_gla.chunk_gla = spy
    attn = ref.model.layers[0].attn
    hooks = [
        attn.register_forward_hook(lambda m, a, kw, out: seen.update(x=kw.get("hidden_states", a[0] if a else None),
                                                                     attn_out=out[0]), with_kwargs=True),
        attn.g_norm_swish_gate.register_forward_hook(lambda m, a, out: seen.update(norm_in=a, norm_out=out)),
        attn.o_proj.register_forward_hook(lambda m, a, out: seen.update(oproj_in=a[0], oproj_out=out)),
    ]
    with torch.no_grad():
        ref(ids, use_cache=True)
    for h in hooks:
        h.remove()
    fla_gla.chunk_gla = chunk

    mine = ours.model.layers[0].attn
    rows: dict[str, float] = {}
    with torch.no_grad():
        x = seen["x"].reshape(2 * T, -1)
        q, k, v, gk, gate = mine._project(x, None) if not mine.use_short_conv else (None,) * 5
        if q is not None:
            for name, a in (("q", q), ("k", k), ("v", v), ("g", gk)):
                rows[f"stage_{name}"] = rel_rms(a, seen[name].reshape(a.shape))
        # the recurrence on fla's own inputs: packed [2T, H, .] like our prefill
        fq, fk, fv, fg = (seen[n].reshape(2 * T, *seen[n].shape[2:]).contiguous() for n in ("q", "k", "v", "g"))
        H, K, V = fq.shape[1], fq.shape[2], fv.shape[2]
        pool = torch.zeros(4, H, V, K, dtype=torch.float32, device=dev)
        slots = torch.tensor([3, 1], dtype=torch.int32, device=dev)
        cu = torch.tensor([0, T, 2 * T], dtype=torch.int32, device=dev)
        o_ours = kernels.chunk_gla_prefill(fq, fk, fv, fg, cu, pool, slots, scale=K**-0.5)
        o_fla = seen["o"].reshape(2 * T, H, V)
        o64, _ = naive_recurrent_gla(*(t.reshape(2, T, *t.shape[1:]).double() for t in (fq, fk, fv, fg)),
                                     scale=K**-0.5)
        o64 = o64.reshape(2 * T, H, V)
        rows["recurrence_ours_vs_fla"] = rel_rms(o_ours, o_fla)
        rows["recurrence_ours_vs_fp64"] = rel_rms(o_ours, o64)
        rows["recurrence_fla_vs_fp64"] = rel_rms(o_fla, o64)
        rows["recurrence_fp64_rounded_bf16_vs_fp64"] = rel_rms(o64.to(torch.bfloat16), o64)
        rows["final_state_ours_vs_fla"] = rel_rms(pool[slots.long()], seen["state"].float())
        # what moves the recurrence's disagreement: our kernel's variants, and fla against itself
        from fla.ops.gla import fused_recurrent_gla

        from kernels import triton_chunk

        for prec in ("ieee", "tf32x3"):
            triton_chunk.A_PRECISION["half"] = prec
            o_p = kernels.chunk_gla_prefill(fq, fk, fv, fg, cu, torch.zeros_like(pool), slots, scale=K**-0.5)
            rows[f"recurrence_ours_A_{prec}_vs_fla"] = rel_rms(o_p, o_fla)
            rows[f"recurrence_ours_A_{prec}_vs_fp64"] = rel_rms(o_p, o64)
        triton_chunk.A_PRECISION["half"] = "tf32"
        o_1 = triton_chunk.chunk_gla_prefill_triton(fq, fk, fv, fg, cu, torch.zeros_like(pool), slots, scale=K**-0.5,
                                                    seg_len=4096)
        rows["recurrence_ours_one_segment_vs_fla"] = rel_rms(o_1, o_fla)
        o_fr, _ = fused_recurrent_gla(q=seen["q"], k=seen["k"], v=seen["v"], gk=seen["g"], scale=K**-0.5,
                                      state_v_first=True)
        rows["recurrence_fla_fused_recurrent_vs_fla_chunk"] = rel_rms(o_fr.reshape(o_fla.shape), o_fla)
        rows["recurrence_fla_fused_recurrent_vs_fp64"] = rel_rms(o_fr.reshape(o64.shape), o64)
        # norm x swish gate on fla's inputs
        n_o, n_g = seen["norm_in"][0], seen["norm_in"][1]
        y = mine._gate_norm(n_o.reshape(2 * T, H, V).contiguous(), n_g.reshape(2 * T, H, V).contiguous())
        rows["gate_norm"] = rel_rms(y, seen["norm_out"].reshape(y.shape))
        z = kernels.linear(seen["oproj_in"].reshape(2 * T, -1), mine.o_proj.weight)
        rows["o_proj"] = rel_rms(z, seen["oproj_out"].reshape(z.shape))
        if gate is not None:
            rows["stage_gate"] = rel_rms(gate, n_g.reshape(gate.shape))
        # the whole serving-path attention layer on fla's input
        if not mine.use_short_conv:  # (the conv path needs the pool's conv tails: see fla_parity.py)
            pool.zero_()
            whole = mine.prefill(x, cu, [0, T, 2 * T], pool, None, slots, None, None)
            rows["attn_prefill_path"] = rel_rms(whole, seen["attn_out"].reshape(whole.shape))
        rows["attn_forward_path"] = rel_rms(mine(seen["x"]), seen["attn_out"])
    for kk, vv in rows.items():
        print(f"{kk:40s} {vv:.3e}")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "fla": __import__("fla").__version__,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "variant": args.variant, "T": T,
            "command": f"python benchmarks/fla_stages.py --variant {args.variant} --T {T}",
            "TRITON_F32_DEFAULT": os.environ.get("TRITON_F32_DEFAULT")}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
