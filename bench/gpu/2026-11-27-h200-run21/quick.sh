#!/usr/bin/env bash
# GPU run 21: the eleventh session's changes after run 20 (scripts/gpu-check took 434 s of the
# session's 900; this fits what was left). Binaries from `scripts/gpu-check --prebuild`.
set -uo pipefail
root=$(pwd); bin="$root/.gpu-quick"; out="${OUT:-$root/gpu-quick-out}"; mkdir -p "$out"
nv_dir=$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null || echo /nonexistent)
for dir in "$nv_dir/cuda_nvrtc/lib" "$nv_dir/cu13/lib" /usr/local/cuda/lib64; do
    [[ -d "$dir" ]] && export LD_LIBRARY_PATH="$dir:${LD_LIBRARY_PATH:-}"
done
for dir in /usr/local/cuda/include "$nv_dir/cu13/include" "$nv_dir/cuda_runtime/include"; do
    if [[ -f "$dir/cuda_fp16.h" ]]; then export CHINGU_CUDA_INCLUDE="$dir"; break; fi
done
status=0
fail() { echo "FAILED: $*"; status=1; }
echo "source $(cat "$bin/COMMIT")"; nvidia-smi -L
echo "== GPU tests (${SECONDS}s)"
for t in gpu_kernels gpu_backend; do
    CHINGU_GPU_TESTS=only timeout 150 "$bin/$t" --test-threads=1 > "$out/test-$t.log" 2>&1 || fail "$t"
    echo "$t: $(grep "test result" "$out/test-$t.log")"
done
CHINGU_ATTN=gemm CHINGU_GPU_TESTS=only timeout 150 "$bin/gpu_backend" --test-threads=1 > "$out/test-gpu_backend-gemm.log" 2>&1 || fail "gpu_backend gemm"
echo "gpu_backend CHINGU_ATTN=gemm: $(grep "test result" "$out/test-gpu_backend-gemm.log")"
echo "== throughput (${SECONDS}s)"
: > "$out/train-bench.jsonl"
row() {  # row LABEL PRESET LEN [VAR=VALUE...]
    local label=$1 preset=$2 len=$3; shift 3
    env "$@" timeout 120 "$bin/chingu" bench-train --device cuda --preset "$preset" --batch 18 --src-len "$len" \
        --tgt-len "$len" --steps 20 --warmup 3 2>>"$out/train-bench.err" | tail -1 |
        sed "s/\"impl\":\"chingu-cuda\"/\"impl\":\"$label\"/" >> "$out/train-bench.jsonl" || fail "bench $label $preset $len"
}
# The previous head's binary (b650fe5, run 20's) beside this one, on the same GPU.
old() {  # old LABEL PRESET LEN
    timeout 120 "$bin/chingu-b650fe5" bench-train --device cuda --preset "$2" --batch 18 --src-len "$3" \
        --tgt-len "$3" --steps 20 --warmup 3 2>>"$out/train-bench.err" | tail -1 |
        sed "s/\"impl\":\"chingu-cuda\"/\"impl\":\"$1\"/" >> "$out/train-bench.jsonl" || fail "bench $1 $2 $3"
}
old b650fe5 seed-768 1024
row default seed-768 1024
old b650fe5-again seed-768 1024
row bias-grad-epilogue seed-768 1024 CHINGU_BIAS_GRAD_EPILOGUE=1
row causal-band-256 seed-768 1024 CHINGU_ATTN_CAUSAL_BAND=256
row causal-band-128 seed-768 1024 CHINGU_ATTN_CAUSAL_BAND=128
row default-again seed-768 1024
old b650fe5 seed-256 1024
row default seed-256 1024
row bias-grad-epilogue seed-256 1024 CHINGU_BIAS_GRAD_EPILOGUE=1
old b650fe5 seed-768 128
row default seed-768 128
old b650fe5 seed-256 512
row default seed-256 512
timeout 120 python3 bench/torch_ref.py bench --device cuda --amp --preset seed-768 --batch 18 --src-len 1024 \
    --tgt-len 1024 --steps 20 --warmup 5 2>>"$out/train-bench.err" | tail -1 >> "$out/train-bench.jsonl" || fail "torch bench"
python3 - "$out/train-bench.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    mem = r.get("device_memory_gib", r.get("peak_mem_gib", 0))
    print(f"{r['impl']:>22} {r['preset']} {r['batch']} {r['step_ms']:7.1f} ms {r['tokens_per_s']:>11,.0f} tok/s {mem:6.2f} GiB skipped {r.get('skipped_steps', '-')}")
PY
echo "== profiles (${SECONDS}s)"
for p in seed-768 seed-256; do
    CHINGU_PROFILE=events timeout 120 "$bin/chingu" bench-train --device cuda --preset $p --batch 18 --src-len 1024 \
        --tgt-len 1024 --steps 2 --warmup 1 2> "$out/profile-$p-1024.md" > /dev/null || fail "profile $p"
    grep -E "all timed|layernorm|dropped|dropout|cross_entropy|softmax|delta|bias_backward|column_sum" "$out/profile-$p-1024.md"
done
CHINGU_PROFILE=events timeout 120 "$bin/chingu-b650fe5" bench-train --device cuda --preset seed-768 --batch 18 \
    --src-len 1024 --tgt-len 1024 --steps 2 --warmup 1 2> "$out/profile-seed-768-1024-b650fe5.md" > /dev/null || fail "old profile"
grep -E "all timed|layernorm|dropped|cross_entropy|softmax|delta" "$out/profile-seed-768-1024-b650fe5.md"
echo "== kernel_bench (${SECONDS}s)"
timeout 90 "$bin/kernel_bench" --device cuda --reps 20 --json "$out/chingu-kernels.json" > "$out/kernel-bench.log" 2>&1 || fail "kernel_bench"
timeout 90 python3 bench/kernel_bench.py --device cuda --reps 20 --json "$out/torch-kernels.json" \
    > "$out/torch-kernel-bench.log" 2>&1 || fail "bench/kernel_bench.py"
python3 bench/kernel_compare.py "$out/chingu-kernels.json" "$out/torch-kernels.json" > "$out/kernel-compare.md" 2>&1
grep -E "layernorm|dropout|dropped|cross_entropy|bias|dh192" "$out/kernel-compare.md"
echo "== launch seed-256 and eval on GPU and CPU (${SECONDS}s)"
work=$(mktemp -d); cp -r deploy "$work/"
(cd "$work" && timeout 150 "$bin/chingu" launch deploy/single-gpu.toml) > "$out/launch.log" 2>&1 || fail "launch"
grep -o "valid_loss=[0-9.]*" "$out/launch.log" | tail -1
for d in cuda cpu; do
    (cd "$work" && timeout 90 "$bin/chingu" eval --run runs/single-gpu --data prepared --limit 200 --json --device $d) \
        > "$out/eval-$d.json" 2>/dev/null || fail "eval $d"
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], r['valid']['loss'])" "$out/eval-$d.json" $d
done
echo "done at ${SECONDS}s, status $status"
exit $status
