//! The CPU backend gives bit-identical f32 results whatever the number of threads.

use chingu_kernels::{AttentionShape, Backend, Cpu};

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| (((i as u32).wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

/// Runs `work` on a pool of `threads` threads.
fn on_threads<R: Send>(threads: usize, work: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(work)
}

/// Asserts that every output of `work` has the same bits on each of `threads` as on one
/// thread; returns the one-thread outputs.
fn assert_thread_count_independent(
    what: &str,
    threads: &[usize],
    work: impl Fn() -> Vec<Vec<f32>> + Send + Sync,
) -> Vec<Vec<f32>> {
    let one = on_threads(1, &work);
    for &count in threads {
        let many = on_threads(count, &work);
        for (k, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!(same_bits(a, b), "{what} output {k} differs between 1 and {count} threads");
        }
    }
    one
}

/// True when `a` and `b` hold the same values to the bit.
fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn run_all() -> Vec<Vec<f32>> {
    let cpu = Cpu::<f32>::new();
    let (n, i, o) = (200, 48, 40);
    let (x, w, b) = (data(n * i, 1), data(o * i, 2), data(o, 3));
    let mut y = vec![0.0; n * o];
    cpu.linear_forward(&mut y, &x, &w, Some(&b), n, i, o);
    let (mut dx, mut dw, mut db) = (vec![0.0; n * i], vec![0.0; o * i], vec![0.0; o]);
    cpu.linear_backward(Some(&mut dx), false, &mut dw, Some(&mut db), &y, &x, &w, n, i, o);
    let (mut ln, mut mean, mut rstd) = (vec![0.0; n * i], vec![0.0; n], vec![0.0; n]);
    let gamma = data(i, 4);
    cpu.layernorm_forward(
        &mut ln,
        &mut mean,
        &mut rstd,
        &x,
        &gamma,
        &b[..i.min(40)].iter().chain(&data(8, 5)).copied().collect(),
        n,
        i,
    );
    let (mut dln, mut dg, mut dbeta) = (vec![0.0; n * i], vec![0.0; i], vec![0.0; i]);
    cpu.layernorm_backward(&mut dln, &mut dg, &mut dbeta, &ln, &x, &mean, &rstd, &gamma, n, i);
    let shape = AttentionShape {
        batch: 5,
        q_len: 40,
        k_len: 40,
        heads: 4,
        head_dim: 12,
        causal: true,
        q_offset: 0,
    };
    let (mut out, mut probs) = (vec![0.0; 200 * 48], vec![0.0; 5 * 4 * 40 * 40]);
    cpu.attention_forward(&mut out, &mut probs, &x, &x, &x, &[40, 3, 17, 40, 1], shape);
    let (mut dq, mut dk, mut dv) = (vec![0.0; 200 * 48], vec![0.0; 200 * 48], vec![0.0; 200 * 48]);
    let lens = [40, 3, 17, 40, 1];
    cpu.attention_backward(&mut dq, &mut dk, &mut dv, &out, &x, &x, &x, &out, &probs, &lens, shape);
    let mut grad = vec![0.0; n * o];
    let targets: Vec<u32> = (0..n as u32).map(|t| t % o as u32).collect();
    let (loss, _) = cpu.cross_entropy(&mut grad, &y, &targets, o, 0, 0.1);
    let norm = cpu.sum_squares(&dw) as f32;
    vec![y, dx, dw, db, ln, dln, dg, dbeta, out, dq, dk, dv, grad, vec![loss as f32, norm]]
}

#[test]
fn thread_count_does_not_change_any_bit() {
    assert_thread_count_independent("op", &[2, 3, 8], run_all);
}

/// GEMMs large enough to be split by rows across the pool's threads give the same bits with one
/// thread as with three (uneven blocks) and four.
#[test]
fn gemm_row_split_does_not_change_any_bit() {
    let large_linear = || {
        let cpu = Cpu::<f32>::new();
        let (n, i, o) = (1000, 512, 1024);
        let (x, w) = (data(n * i, 11), data(o * i, 12));
        let mut y = vec![0.0; n * o];
        cpu.linear_forward(&mut y, &x, &w, None, n, i, o);
        let (mut dx, mut dw) = (vec![0.0; n * i], vec![0.0; o * i]);
        cpu.linear_backward(Some(&mut dx), false, &mut dw, None, &y, &x, &w, n, i, o);
        vec![y, dx, dw]
    };
    assert_thread_count_independent("GEMM", &[3, 4], large_linear);
}

/// The backward products run as halves side by side: k halves (a layer with more batch rows
/// than outputs, the vocabulary projection's input gradient) and row halves. Both kinds give
/// the same bits with one thread as with two and three, and match an f64 reference.
#[test]
fn backward_product_halves_do_not_change_any_bit_and_stay_exact() {
    // (rows, in, out): dw halved along k, dx by rows; then dx along k, dw by rows.
    let shapes = [(1200, 96, 80), (96, 64, 2000)];
    let backward = move || {
        let cpu = Cpu::<f32>::new();
        let mut outputs = Vec::new();
        for (s, &(n, i, o)) in shapes.iter().enumerate() {
            let s = s as u32 * 10;
            let (x, w, dy) = (data(n * i, 21 + s), data(o * i, 22 + s), data(n * o, 23 + s));
            // Accumulating into non-zero gradients, as the model's residual paths do.
            let (mut dx, mut dw) = (data(n * i, 24 + s), data(o * i, 25 + s));
            cpu.linear_backward(Some(&mut dx), true, &mut dw, None, &dy, &x, &w, n, i, o);
            outputs.push(dx);
            outputs.push(dw);
        }
        outputs
    };
    let one = assert_thread_count_independent("backward", &[2, 3], backward);
    for (idx, &(n, i, o)) in shapes.iter().enumerate() {
        let s = idx as u32 * 10;
        let f64s = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
        let (x, w, dy) =
            (f64s(data(n * i, 21 + s)), f64s(data(o * i, 22 + s)), f64s(data(n * o, 23 + s)));
        let (dx0, dw0) = (f64s(data(n * i, 24 + s)), f64s(data(o * i, 25 + s)));
        let (dx, dw) = (&one[2 * idx], &one[2 * idx + 1]);
        for r in 0..n {
            for c in 0..i {
                let want =
                    dx0[r * i + c] + (0..o).map(|j| dy[r * o + j] * w[j * i + c]).sum::<f64>();
                // f32 sums of up to 2,000 products of magnitude ≤ 1: 1e-3 absolute is ~10x the
                // worst rounding seen, and far below any indexing error (order 1).
                assert!((f64::from(dx[r * i + c]) - want).abs() < 1e-3, "dx[{r},{c}] shape {s}");
            }
        }
        for j in 0..o {
            for c in 0..i {
                let want =
                    dw0[j * i + c] + (0..n).map(|r| dy[r * o + j] * x[r * i + c]).sum::<f64>();
                assert!((f64::from(dw[j * i + c]) - want).abs() < 1e-3, "dw[{j},{c}] shape {s}");
            }
        }
    }
}

/// The CPU's feed-forward backward applies GELU's slope to each block of the input gradient
/// right after its product: the same bits as the plain composition (product into a separate
/// buffer, then `gelu_backward`), for row halves and for k halves, whatever the thread count.
#[test]
fn fused_gelu_backward_equals_the_plain_composition() {
    use chingu_kernels::backend::linear_backward_then_gelu;
    // (rows, in = d_ff, out = d_model): the input gradient halved by rows, then along k.
    for (s, &(n, i, o)) in [(640, 128, 96), (64, 96, 1000)].iter().enumerate() {
        let s = s as u32 * 10;
        let (dy, w, pre) = (data(n * o, 31 + s), data(o * i, 32 + s), data(n * i, 33 + s));
        let run = |fused: bool| {
            let cpu = Cpu::<f32>::new();
            let mut act = vec![0.0; n * i];
            cpu.gelu_forward(&mut act, &pre);
            let (mut d_pre, mut dw, mut db) = (vec![0.0; n * i], data(o * i, 34 + s), vec![0.0; o]);
            if fused {
                cpu.linear_backward_through_gelu(
                    &mut d_pre,
                    &mut dw,
                    Some(&mut db),
                    &dy,
                    &act,
                    &pre,
                    &w,
                    n,
                    i,
                    o,
                );
            } else {
                linear_backward_then_gelu(
                    &cpu,
                    &mut d_pre,
                    &mut dw,
                    Some(&mut db),
                    &dy,
                    &act,
                    &pre,
                    &w,
                    n,
                    i,
                    o,
                );
            }
            vec![d_pre, dw, db]
        };
        let plain = on_threads(1, || run(false));
        for threads in [1, 2, 3] {
            let fused = on_threads(threads, || run(true));
            for (k, (a, b)) in plain.iter().zip(&fused).enumerate() {
                assert!(
                    same_bits(a, b),
                    "shape {s}: output {k} differs (fused, {threads} threads)"
                );
            }
        }
        assert!(plain[0].iter().any(|&g| g != 0.0), "the input gradient is not trivially zero");
    }
}

/// The CPU's `linear` (output written into a fresh, never zero-filled buffer: the bias rows
/// then the product onto them, or the product alone) gives the bits of `zeros` +
/// `linear_forward`, split across threads or not; `duplicate` copies exactly.
#[test]
fn fresh_outputs_equal_zero_filled_ones() {
    let cpu = Cpu::<f32>::new();
    // Small (one product) and large (split by rows); with k > 256, the bias-first sum order.
    for &(n, i, o) in &[(7, 5, 3), (700, 300, 130)] {
        let (x, w, b) = (data(n * i, 41), data(o * i, 42), data(o, 43));
        for bias in [None, Some(&b)] {
            let mut zeroed = cpu.zeros(n * o);
            cpu.linear_forward(&mut zeroed, &x, &w, bias, n, i, o);
            for threads in [1, 3] {
                let fresh = on_threads(threads, || cpu.linear(&x, &w, bias, n, i, o));
                let with_bias = bias.is_some();
                assert!(
                    same_bits(&fresh, &zeroed),
                    "linear {n}x{i}->{o} bias {with_bias} threads {threads}"
                );
            }
            // And both are the product: spot-check against f64.
            let want = |r: usize, c: usize| {
                (0..i).map(|p| f64::from(x[r * i + p]) * f64::from(w[c * i + p])).sum::<f64>()
                    + bias.map_or(0.0, |b| f64::from(b[c]))
            };
            for (r, c) in [(0, 0), (n - 1, o - 1), (n / 2, o / 3)] {
                assert!((f64::from(zeroed[r * o + c]) - want(r, c)).abs() < 1e-3);
            }
        }
    }
    let x = data(100_003, 44);
    let copy = cpu.duplicate(&x);
    assert!(same_bits(&copy, &x));
}
