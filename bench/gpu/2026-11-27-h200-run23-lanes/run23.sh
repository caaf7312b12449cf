b=.gpu-bin; export CHINGU_GPU_TESTS=only; o=$OUT; t0=$SECONDS
$b/chingu gpu > $o/gpu.txt 2>&1; echo "gpu rc=$? at $((SECONDS-t0))s"
for t in gpu_kernels gpu_gemm; do timeout 60 $b/$t --test-threads=1 > $o/$t.log 2>&1; echo "$t rc=$? $(grep 'test result' $o/$t.log)"; done
CHINGU_ATTN=gemm timeout 60 $b/gpu_backend --test-threads=1 > $o/backend.log 2>&1; echo "gpu_backend gemm rc=$? $(grep 'test result' $o/backend.log)"
echo "at $((SECONDS-t0))s"
r() { env "$@" timeout 40 $b/chingu bench-train --device cuda --preset seed-768 --batch 18 --src-len 1024 --tgt-len 1024 --steps 20 --warmup 3 2>>$o/bench.err | tail -1 | tee -a $o/bench.jsonl | grep -o "\"step_ms\":[0-9.]*" | sed "s/^/$* /"; }
r CHINGU_GEMM_LANES=1; r CHINGU_GEMM_LANES=4; r CHINGU_GEMM_LANES=8; r CHINGU_GEMM_LANES=1; r CHINGU_GEMM_LANES=4 CHINGU_GEMM_TUNE=1; r CHINGU_GEMM_LANES=8 CHINGU_GEMM_TUNE=1
echo "at $((SECONDS-t0))s"
CHINGU_PROFILE=events timeout 40 $b/chingu bench-train --device cuda --preset seed-768 --batch 18 --src-len 1024 --tgt-len 1024 --steps 5 --warmup 2 > $o/profile.md 2>&1; echo "profile rc=$? at $((SECONDS-t0))s"
