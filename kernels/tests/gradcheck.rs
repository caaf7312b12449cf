//! Finite-difference gradient checks, in f64, for every op of the CPU backend.
//!
//! Each op is wrapped as a scalar function L(inputs) = Σ output ⊙ R for a fixed random R; its
//! backward (fed dy = R) must match central differences with step 1e-6. Tolerance: absolute
//! 1e-7 plus relative 1e-6 of |numeric| — central differences in f64 are accurate to about
//! h² · f''' ≈ 1e-12 here plus rounding ≈ 1e-16 / h = 1e-10, so 1e-7 leaves ample margin
//! while any real mistake (a missing term, a wrong index) is off by far more.

use chingu_kernels::{AdamW, AttentionShape, Backend, Cpu, DropoutKey};

const STEP: f64 = 1e-6;

/// A small deterministic generator (splitmix64) for test data.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.next()).collect()
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Compares `analytic[i]` with the central difference of `loss` in `inputs[i]`.
fn check(
    name: &str,
    inputs: &[Vec<f64>],
    analytic: &[Vec<f64>],
    loss: impl Fn(&[Vec<f64>]) -> f64,
) {
    let mut worst = (0.0f64, String::new());
    for (i, grad) in analytic.iter().enumerate() {
        assert_eq!(grad.len(), inputs[i].len(), "{name}: gradient {i} has the wrong length");
        for j in 0..inputs[i].len() {
            let mut plus = inputs.to_vec();
            plus[i][j] += STEP;
            let mut minus = inputs.to_vec();
            minus[i][j] -= STEP;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * STEP);
            let err = (numeric - grad[j]).abs();
            let tol = 1e-7 + 1e-6 * numeric.abs();
            if err / tol > worst.0 {
                worst =
                    (err / tol, format!("input {i}[{j}]: analytic {} numeric {numeric}", grad[j]));
            }
            assert!(
                err <= tol,
                "{name}: input {i}[{j}]: analytic {} vs numeric {numeric}",
                grad[j]
            );
        }
    }
    eprintln!("{name}: worst error/tolerance {:.3} ({})", worst.0, worst.1);
}

fn cpu() -> Cpu<f64> {
    Cpu::new()
}

#[test]
fn linear() {
    let (n, i, o) = (5, 4, 3);
    let mut rng = Rng(1);
    let inputs = vec![rng.vec(n * i), rng.vec(o * i), rng.vec(o)];
    let r = rng.vec(n * o);
    let forward = |x: &[Vec<f64>]| {
        let mut y = vec![0.0; n * o];
        cpu().linear_forward(&mut y, &x[0], &x[1], Some(&x[2]), n, i, o);
        dot(&y, &r)
    };
    let (mut dx, mut dw, mut db) = (vec![0.0; n * i], vec![0.0; o * i], vec![0.0; o]);
    cpu().linear_backward(
        Some(&mut dx),
        false,
        &mut dw,
        Some(&mut db),
        &r,
        &inputs[0],
        &inputs[1],
        n,
        i,
        o,
    );
    check("linear", &inputs, &[dx, dw, db], forward);
}

#[test]
fn linear_accumulates_parameter_gradients() {
    let (n, i, o) = (70, 3, 2); // more rows than one parallel chunk
    let mut rng = Rng(2);
    let (x, w, dy) = (rng.vec(n * i), rng.vec(o * i), rng.vec(n * o));
    let (mut dw, mut db) = (vec![1.0; o * i], vec![1.0; o]);
    let mut dx = vec![1.0; n * i];
    cpu().linear_backward(Some(&mut dx), true, &mut dw, Some(&mut db), &dy, &x, &w, n, i, o);
    for a in 0..o {
        let expect_db = 1.0 + (0..n).map(|r| dy[r * o + a]).sum::<f64>();
        assert!((db[a] - expect_db).abs() < 1e-12);
        for b in 0..i {
            let expect = 1.0 + (0..n).map(|r| dy[r * o + a] * x[r * i + b]).sum::<f64>();
            assert!((dw[a * i + b] - expect).abs() < 1e-12);
        }
    }
    let expect_dx0 = 1.0 + (0..o).map(|a| dy[a] * w[a * i]).sum::<f64>();
    assert!((dx[0] - expect_dx0).abs() < 1e-12);
}

#[test]
fn layernorm() {
    let (n, d) = (4, 6);
    let mut rng = Rng(3);
    let inputs =
        vec![rng.vec(n * d), rng.vec(d).iter().map(|g| 1.0 + 0.5 * g).collect(), rng.vec(d)];
    let r = rng.vec(n * d);
    let forward = |x: &[Vec<f64>]| {
        let (mut y, mut mean, mut rstd) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
        cpu().layernorm_forward(&mut y, &mut mean, &mut rstd, &x[0], &x[1], &x[2], n, d);
        dot(&y, &r)
    };
    let (mut y, mut mean, mut rstd) = (vec![0.0; n * d], vec![0.0; n], vec![0.0; n]);
    cpu().layernorm_forward(&mut y, &mut mean, &mut rstd, &inputs[0], &inputs[1], &inputs[2], n, d);
    let (mut dx, mut dg, mut db) = (vec![0.0; n * d], vec![0.0; d], vec![0.0; d]);
    cpu().layernorm_backward(
        &mut dx, &mut dg, &mut db, &r, &inputs[0], &mean, &rstd, &inputs[1], n, d,
    );
    check("layernorm", &inputs, &[dx, dg, db], forward);
}

#[test]
fn gelu_and_relu() {
    let mut rng = Rng(4);
    let x: Vec<f64> = rng.vec(40).iter().map(|v| v * 4.0).collect();
    let r = rng.vec(40);
    let mut dx = vec![0.0; 40];
    cpu().gelu_backward(&mut dx, &r, &x);
    check("gelu", std::slice::from_ref(&x), &[dx], |x| {
        let mut y = vec![0.0; 40];
        cpu().gelu_forward(&mut y, &x[0]);
        dot(&y, &r)
    });
    // Keep ReLU inputs away from its kink at 0.
    let x: Vec<f64> = x.iter().map(|v| if v.abs() < 0.01 { 0.5 } else { *v }).collect();
    let mut dx = vec![0.0; 40];
    cpu().relu_backward(&mut dx, &r, &x);
    check("relu", &[x], &[dx], |x| {
        let mut y = vec![0.0; 40];
        cpu().relu_forward(&mut y, &x[0]);
        dot(&y, &r)
    });
}

#[test]
fn gelu_matches_its_formula() {
    let x = vec![-3.0, -1.0, 0.0, 0.5, 2.0];
    let mut y = vec![0.0; 5];
    cpu().gelu_forward(&mut y, &x);
    for (x, y) in x.iter().zip(&y) {
        let expect = 0.5
            * x
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        assert!((y - expect).abs() < 1e-15);
    }
}

fn attention_case(shape: AttentionShape, key_len: &[usize], seed: u64) {
    let d = shape.width();
    let mut rng = Rng(seed);
    let inputs = vec![
        rng.vec(shape.batch * shape.q_len * d),
        rng.vec(shape.batch * shape.k_len * d),
        rng.vec(shape.batch * shape.k_len * d),
    ];
    let r = rng.vec(shape.batch * shape.q_len * d);
    let run = |x: &[Vec<f64>]| {
        let mut out = vec![0.0; shape.batch * shape.q_len * d];
        let mut probs = vec![0.0; shape.batch * shape.heads * shape.q_len * shape.k_len];
        cpu().attention_forward(&mut out, &mut probs, &x[0], &x[1], &x[2], key_len, shape);
        (out, probs)
    };
    let (out, probs) = run(&inputs);
    let (mut dq, mut dk, mut dv) =
        (vec![0.0; inputs[0].len()], vec![0.0; inputs[1].len()], vec![0.0; inputs[2].len()]);
    cpu().attention_backward(
        &mut dq, &mut dk, &mut dv, &r, &inputs[0], &inputs[1], &inputs[2], &out, &probs, key_len,
        shape,
    );
    check(&format!("attention {shape:?}"), &inputs, &[dq, dk, dv], |x| dot(&run(x).0, &r));
}

#[test]
fn attention_with_padding_masks() {
    let shape = AttentionShape {
        batch: 2,
        q_len: 3,
        k_len: 4,
        heads: 2,
        head_dim: 3,
        causal: false,
        q_offset: 0,
    };
    attention_case(shape, &[4, 2], 5);
}

#[test]
fn attention_causal() {
    let shape = AttentionShape {
        batch: 2,
        q_len: 4,
        k_len: 4,
        heads: 2,
        head_dim: 2,
        causal: true,
        q_offset: 0,
    };
    attention_case(shape, &[4, 3], 6);
}

#[test]
fn attention_masks_are_exact() {
    // Masked keys get probability exactly 0, and changing them changes nothing.
    let shape = AttentionShape {
        batch: 1,
        q_len: 3,
        k_len: 3,
        heads: 1,
        head_dim: 2,
        causal: true,
        q_offset: 0,
    };
    let mut rng = Rng(7);
    let (q, mut k, v) = (rng.vec(6), rng.vec(6), rng.vec(6));
    let (mut out, mut probs) = (vec![0.0; 6], vec![0.0; 9]);
    cpu().attention_forward(&mut out, &mut probs, &q, &k, &v, &[2], shape);
    assert_eq!([probs[1], probs[2], probs[5], probs[8]], [0.0; 4]);
    assert!((probs[0] - 1.0).abs() < 1e-15);
    k[4] += 10.0; // key 2, beyond key_len
    let mut out2 = vec![0.0; 6];
    cpu().attention_forward(&mut out2, &mut probs, &q, &k, &v, &[2], shape);
    assert_eq!(out, out2);
}

#[test]
fn incremental_attention_equals_full() {
    // One query at offset t against t+1 keys equals row t of the full causal computation.
    let full = AttentionShape {
        batch: 1,
        q_len: 5,
        k_len: 5,
        heads: 2,
        head_dim: 2,
        causal: true,
        q_offset: 0,
    };
    let mut rng = Rng(8);
    let (q, k, v) = (rng.vec(20), rng.vec(20), rng.vec(20));
    let (mut out, mut probs) = (vec![0.0; 20], vec![0.0; 2 * 25]);
    cpu().attention_forward(&mut out, &mut probs, &q, &k, &v, &[5], full);
    for t in 0..5 {
        let step = AttentionShape { q_len: 1, q_offset: t, ..full };
        let (mut o, mut p) = (vec![0.0; 4], vec![0.0; 2 * 5]);
        cpu().attention_forward(
            &mut o,
            &mut p,
            &q[t * 4..(t + 1) * 4].to_vec(),
            &k,
            &v,
            &[t + 1],
            step,
        );
        for (a, b) in o.iter().zip(&out[t * 4..(t + 1) * 4]) {
            assert!((a - b).abs() < 1e-14, "step {t}");
        }
    }
}

#[test]
fn embedding() {
    let (v, d) = (5, 3);
    let ids = [1u32, 4, 1, 0];
    let pos = [0usize, 1, 2, 0];
    let mut rng = Rng(9);
    let positions = rng.vec(3 * d);
    let inputs = vec![rng.vec(v * d)];
    let r = rng.vec(ids.len() * d);
    let mut dt = vec![0.0; v * d];
    cpu().embedding_backward(&mut dt, &r, &ids, d, 2.0);
    check("embedding", &inputs, &[dt], |x| {
        let mut out = vec![0.0; ids.len() * d];
        cpu().embedding_forward(&mut out, &x[0], &positions, &ids, &pos, d, 2.0);
        dot(&out, &r)
    });
}

#[test]
fn cross_entropy_with_smoothing_and_padding() {
    let (n, v) = (4, 5);
    let targets = [2u32, 0, 4, 1]; // row 1 is padding (ignore id 0)
    let mut rng = Rng(10);
    let logits = rng.vec(n * v).iter().map(|x| x * 3.0).collect::<Vec<_>>();
    let mut grad = vec![0.0; n * v];
    let (loss, counted) = cpu().cross_entropy(&mut grad, &logits, &targets, v, 0, 0.1);
    assert_eq!(counted, 3);
    // Independent reference: the definition written out.
    let mut expect = 0.0;
    for (row, &t) in targets.iter().enumerate() {
        if t == 0 {
            continue;
        }
        let x = &logits[row * v..][..v];
        let lse = x.iter().map(|x| x.exp()).sum::<f64>().ln();
        let logp: Vec<f64> = x.iter().map(|x| x - lse).collect();
        let eps = 0.1;
        expect += (1.0 - eps) * -logp[t as usize] + eps * -logp.iter().sum::<f64>() / v as f64;
    }
    assert!((loss - expect / 3.0).abs() < 1e-13, "{loss} vs {}", expect / 3.0);
    assert!(grad[v..2 * v].iter().all(|&g| g == 0.0));
    check("cross_entropy", &[logits], &[grad], |x| {
        cpu().cross_entropy(&mut vec![0.0; n * v], &x[0], &targets, v, 0, 0.1).0
    });
}

#[test]
fn adamw_matches_the_update_rule() {
    let mut rng = Rng(11);
    let (mut p, g) = (rng.vec(10), rng.vec(10));
    let (mut m, mut v) = (rng.vec(10), rng.vec(10).iter().map(|x| x.abs()).collect::<Vec<_>>());
    let s = AdamW {
        lr: 0.01,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.75,
    };
    let (p0, m0, v0) = (p.clone(), m.clone(), v.clone());
    cpu().adamw(&mut p, &g, &mut m, &mut v, s);
    for i in 0..10 {
        let (lr, b1, b2, eps, wd) =
            (0.01f32 as f64, 0.9f32 as f64, 0.999f32 as f64, 1e-8f32 as f64, 0.1f32 as f64);
        let g = g[i] * 0.75;
        let mi = b1 * m0[i] + (1.0 - b1) * g;
        let vi = b2 * v0[i] + (1.0 - b2) * g * g;
        let mhat = mi / (1.0 - b1.powi(3));
        let vhat = vi / (1.0 - b2.powi(3));
        let pi = p0[i] * (1.0 - lr * wd) - lr * mhat / (vhat.sqrt() + eps);
        assert!((m[i] - mi).abs() < 1e-15 && (v[i] - vi).abs() < 1e-15);
        assert!((p[i] - pi).abs() < 1e-14, "{} vs {pi}", p[i]);
    }
}

#[test]
fn dropout_is_keyed_and_inverted() {
    let key = DropoutKey { seed: 7, step: 3, site: 11 };
    let mut x = vec![1.0f64; 100_000];
    cpu().dropout(&mut x, 0.25, key);
    let kept = x.iter().filter(|&&v| v != 0.0).count() as f64 / x.len() as f64;
    assert!((kept - 0.75).abs() < 0.01, "{kept}");
    assert!(x.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-15));
    // The mask is the documented per-element decision (`cpu::dropout_keeps`, which the GPU
    // kernels follow), group tails included.
    for (i, &v) in x.iter().enumerate().take(1003) {
        let keeps = chingu_kernels::cpu::dropout_keeps(key, i as u64, 0.25);
        assert_eq!(v != 0.0, keeps, "element {i}");
    }
    let mut again = vec![1.0f64; 100_000];
    cpu().dropout(&mut again, 0.25, key);
    assert_eq!(x, again, "same key, same mask");
    let mut other = vec![1.0f64; 100_000];
    cpu().dropout(&mut other, 0.25, DropoutKey { step: 4, ..key });
    assert_ne!(x, other, "another step, another mask");
    // Four neighbours share one hash (16 bits each): their decisions must still be
    // independent. Each pair of positions within a group of four is kept together ~0.75² of
    // the time (±0.015: ~5 standard deviations over 25,000 groups).
    for (a, b) in [(0, 1), (0, 3), (1, 2), (2, 3)] {
        let groups = x.chunks(4);
        let both = groups.clone().filter(|g| g[a] != 0.0 && g[b] != 0.0).count() as f64;
        let rate = both / groups.count() as f64;
        assert!((rate - 0.5625).abs() < 0.015, "positions {a} and {b} kept together: {rate}");
    }
    // A rate below 2^-17 drops (and scales) nothing.
    let mut tiny = vec![1.0f64; 1000];
    cpu().dropout(&mut tiny, 1e-6, key);
    assert!(tiny.iter().all(|&v| v == 1.0));
    // Survivors are scaled by one over the keep rate the rounded threshold gives: at
    // p = 1 − 1.5·2^-16 the threshold is 65,535 of 65,536, so 2^16 (where 1/(1 − p) would
    // give 2^16/1.5, a third short of keeping the expectation).
    let near_one = 1.0 - 1.5 / 65_536.0;
    let mut near = vec![1.0f64; 1 << 18];
    cpu().dropout(&mut near, near_one as f32, key);
    assert!(near.iter().all(|&v| v == 0.0 || v == 65_536.0));
    let survivors = near.iter().filter(|&&v| v != 0.0).count();
    assert!((1..=12).contains(&survivors), "{survivors} of 2^18 kept, 4 expected");
}
