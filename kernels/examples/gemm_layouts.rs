//! Throughput of the `gemm` crate on the shapes of a LoRA step, for each way of laying out the same
//! product (row-major or transposed output, packed or strided operands).
//!
//! RAYON_NUM_THREADS=2 cargo run --release -p lorad-kernels --example gemm_layouts [KxOUT ...]
use std::time::Instant;

#[allow(clippy::too_many_arguments)]
fn run(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    (dcs, drs): (isize, isize),
    lhs: &[f32],
    (lcs, lrs): (isize, isize),
    rhs: &[f32],
    (rcs, rrs): (isize, isize),
) {
    let par = match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        t => gemm::Parallelism::Rayon(t),
    };
    // SAFETY: every caller passes buffers of m*n, m*k and k*n floats with strides inside them.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs,
            drs,
            false,
            lhs.as_ptr(),
            lcs,
            lrs,
            rhs.as_ptr(),
            rcs,
            rrs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    f();
    let started = Instant::now();
    let mut reps = 0;
    while reps < 5 || started.elapsed().as_secs_f64() < 0.3 {
        f();
        reps += 1;
    }
    started.elapsed().as_secs_f64() * 1e3 / reps as f64
}

/// `KxOUT` arguments pick the shapes (default: SmolLM2-135M's projections and LM head); `ROWS` the
/// token count (default 1024 = batch 4 x seq 256).
fn main() {
    let rows: usize = std::env::var("ROWS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1024);
    let mut cases: Vec<(usize, usize)> = std::env::args()
        .skip(1)
        .filter_map(|a| {
            let (k, out) = a.split_once('x')?;
            Some((k.parse().ok()?, out.parse().ok()?))
        })
        .collect();
    if cases.is_empty() {
        cases = vec![
            (576, 576),
            (576, 192),
            (576, 1536),
            (1536, 576),
            (576, 49152),
        ];
    }
    println!("{rows} rows, {} threads", rayon::current_num_threads());
    if std::env::var_os("THIN").is_some() {
        thin();
        return;
    }
    for (k, out) in cases {
        let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let w: Vec<f32> = (0..out * k).map(|i| (i % 5) as f32 * 0.1).collect();
        let g: Vec<f32> = (0..rows * out).map(|i| (i % 3) as f32 * 0.1).collect();
        let mut y = vec![0f32; rows * out];
        let mut dx = vec![0f32; rows * k];
        let gf = 2.0 * (rows * k * out) as f64 / 1e9;
        let (ki, oi) = (k as isize, out as isize);
        // y = x @ W^T, y row-major.
        let a = time(|| run((rows, out, k), &mut y, (1, oi), &x, (1, ki), &w, (ki, 1)));
        // y^T = W @ x^T (the same memory, the transposed problem).
        let b = time(|| run((out, rows, k), &mut y, (oi, 1), &w, (1, ki), &x, (ki, 1)));
        // dx = g @ W, dx row-major.
        let c = time(|| run((rows, k, out), &mut dx, (1, ki), &g, (1, oi), &w, (1, ki)));
        // dx^T = W^T @ g^T.
        let d = time(|| run((k, rows, out), &mut dx, (ki, 1), &w, (ki, 1), &g, (oi, 1)));
        println!(
            "k {k:5} out {out:5}: y=x@W^T {a:7.2} ms {:4.0} GF/s | y^T=W@x^T {b:7.2} ms {:4.0} | \
             dx=g@W {c:7.2} ms {:4.0} | dx^T=W^T@g^T {d:7.2} ms {:4.0}",
            gf / a * 1e3,
            gf / b * 1e3,
            gf / c * 1e3,
            gf / d * 1e3
        );
    }
}

/// A named product: its multiply-adds and a closure that runs it.
type Case<'a> = (&'static str, f64, Box<dyn FnMut() + 'a>);

/// The rank-r products of a LoRA layer's backward at SmolLM2's q_proj shapes (n 1024, in = out 576,
/// r 16), as `lorad_kernels::linear::lora_linear` lays them out.
fn thin() {
    let (n, k, out, r) = (1024usize, 576usize, 576usize, 16usize);
    let buf = |len: usize| -> Vec<f32> { (0..len).map(|i| (i % 7) as f32 * 0.1).collect() };
    let (g, x, a, b) = (buf(n * out), buf(n * k), buf(r * k), buf(out * r));
    let (gb, u) = (buf(n * r), buf(n * r));
    let (ki, oi, ri) = (k as isize, out as isize, r as isize);
    let (mut d_nr, mut d_nr2) = (vec![0f32; n * r], vec![0f32; n * r]);
    let mut d_rk = vec![0f32; r * k];
    let mut d_or = vec![0f32; out * r];
    let mut d_ok = vec![0f32; out * k];
    let mut d_rk2 = vec![0f32; r * k];
    let cases: [Case; 6] = [
        (
            "gb = g @ b      ",
            (n * r * out) as f64,
            Box::new(|| run((n, r, out), &mut d_nr, (1, ri), &g, (1, oi), &b, (1, ri))),
        ),
        (
            "u = x @ a^T     ",
            (n * r * k) as f64,
            Box::new(|| run((n, r, k), &mut d_nr2, (1, ri), &x, (1, ki), &a, (ki, 1))),
        ),
        (
            "da = gb^T @ x   ",
            (r * k * n) as f64,
            Box::new(|| run((r, k, n), &mut d_rk, (1, ki), &gb, (ri, 1), &x, (1, ki))),
        ),
        (
            "da^T = x^T @ gb ",
            (r * k * n) as f64,
            Box::new(|| run((k, r, n), &mut d_rk2, (ki, 1), &x, (ki, 1), &gb, (1, ri))),
        ),
        (
            "db = g^T @ u    ",
            (out * r * n) as f64,
            Box::new(|| run((out, r, n), &mut d_or, (1, ri), &g, (oi, 1), &u, (1, ri))),
        ),
        (
            "merged: b @ a   ",
            (out * k * r) as f64,
            Box::new(|| run((out, k, r), &mut d_ok, (1, ki), &b, (1, ri), &a, (1, ki))),
        ),
    ];
    for (name, macs, mut f) in cases {
        let ms = time(&mut f);
        println!(
            "{name} {ms:6.3} ms {:5.0} GF/s",
            2.0 * macs / 1e9 / ms * 1e3
        );
    }
}
