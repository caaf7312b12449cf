#!/usr/bin/env bash
# GPU run 25 (after run 24): pointer-array batches on by default, the bias gradient's 8-row
# loads. Tests, then seed-768 18 x (1024+1024) steps with and without the arrays, interleaved,
# one long row beside the SM clock, and a device-event profile.
b=.gpu-bin; export CHINGU_GPU_TESTS=only; o=$OUT; t0=$SECONDS
$b/chingu gpu > $o/gpu.txt 2>&1; echo "chingu gpu rc=$? at $((SECONDS-t0))s"
timeout 60 $b/gpu_kernels --test-threads=1 bias > $o/test-gpu_kernels-bias.log 2>&1; echo "gpu_kernels bias rc=$? $(grep 'test result' $o/test-gpu_kernels-bias.log)"
timeout 60 $b/gpu_gemm --test-threads=1 --nocapture > $o/test-gpu_gemm.log 2>&1; echo "gpu_gemm rc=$? $(grep 'test result' $o/test-gpu_gemm.log)"; grep "cuda:.*pointer-array" $o/test-gpu_gemm.log
for a in auto gemm; do CHINGU_ATTN=$a timeout 60 $b/gpu_backend --test-threads=1 > $o/test-gpu_backend-$a.log 2>&1; echo "gpu_backend $a rc=$? $(grep 'test result' $o/test-gpu_backend-$a.log)"; done
echo "tests done at $((SECONDS-t0))s"
r() { local steps=$1; shift; env "$@" timeout 60 $b/chingu bench-train --device cuda --preset seed-768 --batch 18 --src-len 1024 --tgt-len 1024 --steps $steps --warmup 3 2>>$o/bench.err | tail -1 | tee -a $o/bench.jsonl | grep -oE "\"(step_ms|tokens_per_s)\":[0-9.]*" | tr '\n' ' ' | sed "s/^/steps=$steps $* /"; echo; }
r 20 CHINGU_GEMM_ARRAYS=1; r 20 CHINGU_GEMM_ARRAYS=0; r 20 CHINGU_GEMM_ARRAYS=1; r 20 CHINGU_GEMM_ARRAYS=0; r 20 CHINGU_GEMM_ARRAYS=1
echo "rows done at $((SECONDS-t0))s"
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.sw_power_cap --format=csv,noheader -lms 200 > $o/clocks.log 2>&1 & p=$!
r 150 CHINGU_GEMM_ARRAYS=1
kill $p; echo "long row done at $((SECONDS-t0))s"
CHINGU_PROFILE=events timeout 60 $b/chingu bench-train --device cuda --preset seed-768 --batch 18 --src-len 1024 --tgt-len 1024 --steps 5 --warmup 2 > $o/profile.md 2>&1; echo "profile rc=$? at $((SECONDS-t0))s"
grep -E "all timed|bias_backward|pointer|layernorm_backward" $o/profile.md
