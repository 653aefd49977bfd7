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
