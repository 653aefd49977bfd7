//! Rotary position embeddings (transformers' non-interleaved `rotate_half` layout), one pass over
//! memory forward and one backward.
//!
//! With `x = [x1, x2]` split in halves along the last dimension and the tables split the same way:
//!
//! ```text
//! y1 = x1 * cos1 - x2 * sin1          dx1 = g1 * cos1 + g2 * sin2
//! y2 = x2 * cos2 + x1 * sin2          dx2 = g2 * cos2 - g1 * sin1
//! ```
//!
//! The op is linear in `x`, so backward needs only the tables: nothing is saved. The input is usually
//! a transposed view (`[b, t, h, d]` seen as `[b, h, t, d]`); it is read through its strides, without
//! a copy, as long as the last dimension is unit-stride. The output is contiguous, not zeroed before
//! it is written; the row loop is compiled for AVX-512/AVX2 as well and picked at run time.
use crate::cpu::{contiguous_f32, rows_per_task, uninit_output, wide};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `x * cos + rotate_half(x) * sin`, with `rotate_half([x1, x2]) = [-x2, x1]`.
///
/// `x` is `[.., t, d]` (usually `[b, heads, t, d]`, any layout) and gets a gradient; `cos` and `sin`
/// are frozen `[t, d]` tables (no gradient). f32 on the CPU runs the fused kernel; any other device or
/// dtype runs the candle composition (as `ops::apply_rope`).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && [x, cos, sin].iter().all(|t| t.dtype() == DType::F32)
        && x.elem_count() > 0;
    if !fused {
        return composed(x, cos, sin);
    }
    let rank = x.rank();
    let (t, d) = (x.dim(D::Minus2)?, x.dim(D::Minus1)?);
    if d % 2 != 0 || cos.dims() != [t, d] || sin.dims() != [t, d] {
        bail!(
            "rope: input {:?} needs an even last dimension and cos/sin tables of [{t}, {d}], got {:?} and {:?}",
            x.dims(),
            cos.dims(),
            sin.dims()
        )
    }
    // Strided reads cover every layout whose rows are unit-stride; anything else is copied.
    let x = if x.stride()[rank - 1] == 1 {
        x.clone()
    } else {
        x.contiguous()?
    };
    x.apply_op3(
        &cos.contiguous()?,
        &sin.contiguous()?,
        Rope { transposed: false },
    )
}

/// The candle composition, for devices and dtypes without a fused kernel.
fn composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// The op on (`x`, `cos`, `sin`): the rotation itself, or its transpose (the backward, applied to the
/// incoming gradient), which rotates the other way.
struct Rope {
    transposed: bool,
}

/// One row: the rotation (`T = false`) or its transpose, from the halves of the input and tables.
#[inline(always)]
fn rotate_row<const T: bool>(y: &mut [MaybeUninit<f32>], x: &[f32], cos: &[f32], sin: &[f32]) {
    let h = x.len() / 2;
    let (y1, y2) = y.split_at_mut(h);
    let (x1, x2) = x.split_at(h);
    let (c1, c2) = cos.split_at(h);
    let (s1, s2) = sin.split_at(h);
    // Every slice re-cut to `h`, so the loop runs without bounds checks and vectorises.
    let (y1, y2, x1, x2) = (&mut y1[..h], &mut y2[..h], &x1[..h], &x2[..h]);
    let (c1, c2, s1, s2) = (&c1[..h], &c2[..h], &s1[..h], &s2[..h]);
    for j in 0..h {
        if T {
            y1[j].write(x1[j] * c1[j] + x2[j] * s2[j]);
            y2[j].write(x2[j] * c2[j] - x1[j] * s1[j]);
        } else {
            y1[j].write(x1[j] * c1[j] - x2[j] * s1[j]);
            y2[j].write(x2[j] * c2[j] + x1[j] * s2[j]);
        }
    }
}

impl Rope {
    fn run(&self, x: &[f32], l: &Layout, cos: &[f32], sin: &[f32]) -> Result<Vec<f32>> {
        let (dims, strides) = (l.dims(), l.stride());
        let rank = dims.len();
        if rank < 2 || strides[rank - 1] != 1 {
            bail!("rope: input {dims:?} with strides {strides:?} is not row-major in its last dimension")
        }
        let (t, d) = (dims[rank - 2], dims[rank - 1]);
        let t_stride = strides[rank - 2];
        // Where each `[t, d]` plane starts in `x`: the leading dims unravelled through their strides.
        let mut planes = vec![l.start_offset()];
        for (&n, &s) in dims[..rank - 2].iter().zip(&strides[..rank - 2]) {
            planes = planes
                .iter()
                .flat_map(|&p| (0..n).map(move |i| p + i * s))
                .collect();
        }
        let rows = planes.len() * t;
        let per_task = rows_per_task(d);
        let rows_of = |task: usize, y: &mut [MaybeUninit<f32>]| {
            for (i, y) in y.chunks_exact_mut(d).enumerate() {
                let row = task * per_task + i;
                let (plane, pos) = (row / t, row % t);
                let start = planes[plane] + pos * t_stride;
                let (x, c, s) = (
                    &x[start..start + d],
                    &cos[pos * d..(pos + 1) * d],
                    &sin[pos * d..(pos + 1) * d],
                );
                if self.transposed {
                    rotate_row::<true>(y, x, c, s);
                } else {
                    rotate_row::<false>(y, x, c, s);
                }
            }
        };
        let out = uninit_output(rows * d, |out| {
            out.par_chunks_mut(per_task * d)
                .enumerate()
                .for_each(|(task, y)| wide(|| rows_of(task, y)));
        });
        Ok(out)
    }
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        if self.transposed {
            "fused-rope-bwd"
        } else {
            "fused-rope"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (cos, sin) = (
            contiguous_f32("rope", s2, l2)?,
            contiguous_f32("rope", s3, l3)?,
        );
        let out = self.run(s1.as_slice::<f32>()?, l1, cos, sin)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = if grad.stride()[grad.rank() - 1] == 1 {
            grad.clone()
        } else {
            grad.contiguous()?
        };
        let dx = grad.apply_op3_no_bwd(cos, sin, &Rope { transposed: true })?;
        Ok((Some(dx), None, None))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, random, report};
    use candle_core::{Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Tables as lorad's `Rope` builds them: angles `pos * theta^(-2i/d)`, the second half repeating
    /// the first.
    fn tables(t: usize, d: usize) -> (Tensor, Tensor) {
        let mut angles = Vec::with_capacity(t * d);
        for pos in 0..t {
            let row: Vec<f32> = (0..d / 2)
                .map(|i| pos as f32 / 10_000f32.powf((2 * i) as f32 / d as f32))
                .collect();
            angles.extend_from_slice(&row);
            angles.extend_from_slice(&row);
        }
        let angles = Tensor::from_vec(angles, (t, d), &Device::Cpu).unwrap();
        (angles.cos().unwrap(), angles.sin().unwrap())
    }

    /// The unfused composition (`ops::apply_rope`), written out with plain candle ops.
    fn reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
        let half = x.dim(D::Minus1).unwrap() / 2;
        let x1 = x.narrow(D::Minus1, 0, half).unwrap();
        let x2 = x.narrow(D::Minus1, half, half).unwrap();
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], D::Minus1).unwrap();
        (x.broadcast_mul(cos).unwrap() + rotated.broadcast_mul(sin).unwrap()).unwrap()
    }

    /// Values and the gradient of `x`, built by `make` from a variable of `base` dims; `tables` gives
    /// cos/sin for the `[t, d]` of the built input.
    fn check(
        seed: u64,
        base: &[usize],
        make: impl Fn(&Tensor) -> Tensor,
        tables: impl Fn(&mut ChaCha8Rng, usize, usize) -> (Tensor, Tensor),
    ) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base = random(&mut rng, base, 2.0);
        let probe = make(&base);
        let (t, d) = (probe.dim(D::Minus2).unwrap(), probe.dim(D::Minus1).unwrap());
        let (cos, sin) = tables(&mut rng, t, d);
        let r = random(&mut rng, probe.dims(), 1.0);
        let run = |f: &dyn Fn(&Tensor) -> Tensor| {
            let v = Var::from_tensor(&base).unwrap();
            let y = f(&make(v.as_tensor()));
            let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(v.as_tensor()).expect("gradient of x").clone())
        };
        let (y, gx) = run(&|x| rope(x, &cos, &sin).unwrap());
        let (y_ref, gx_ref) = run(&|x| reference(x, &cos, &sin));
        assert!(y.is_contiguous());
        assert_close(&y, &y_ref, "value");
        assert_close(&gx, &gx_ref, "gradient of x");
    }

    fn lorad_tables(_: &mut ChaCha8Rng, t: usize, d: usize) -> (Tensor, Tensor) {
        tables(t, d)
    }

    /// Unrelated random halves: checks the kernel uses each table element where the composition does.
    fn random_tables(rng: &mut ChaCha8Rng, t: usize, d: usize) -> (Tensor, Tensor) {
        (random(rng, &[t, d], 1.0), random(rng, &[t, d], 1.0))
    }

    #[test]
    fn matches_composition_4d() {
        check(1, &[2, 9, 17, 64], |x| x.clone(), lorad_tables);
        check(2, &[1, 1, 1, 2], |x| x.clone(), lorad_tables);
        check(3, &[3, 2, 5, 6], |x| x.clone(), random_tables);
    }

    #[test]
    fn matches_composition_2d_and_3d() {
        check(4, &[11, 10], |x| x.clone(), lorad_tables);
        check(5, &[4, 7, 34], |x| x.clone(), random_tables);
    }

    #[test]
    fn matches_composition_on_transposed_and_narrowed_views() {
        // As the model feeds it: [b, t, h, d] viewed as [b, h, t, d].
        check(
            6,
            &[2, 13, 3, 64],
            |x| x.transpose(1, 2).unwrap(),
            lorad_tables,
        );
        // Enough rows (720 of 64) for three rayon tasks, whose bounds fall inside a [t, d] plane.
        check(
            10,
            &[2, 40, 9, 64],
            |x| x.transpose(1, 2).unwrap(),
            random_tables,
        );
        // A narrowed head dimension (row stride > d, non-zero offset).
        check(
            7,
            &[2, 3, 5, 20],
            |x| x.narrow(3, 2, 16).unwrap(),
            random_tables,
        );
        // The last dimension itself strided: copied first.
        check(
            8,
            &[2, 3, 8, 5],
            |x| x.transpose(2, 3).unwrap(),
            random_tables,
        );
    }

    #[test]
    fn tables_get_no_gradient_and_other_dtypes_fall_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let x = Var::from_tensor(&random(&mut rng, &[1, 2, 3, 8], 1.0)).unwrap();
        let (cos, sin) = tables(3, 8);
        let (cos_v, sin_v) = (
            Var::from_tensor(&cos).unwrap(),
            Var::from_tensor(&sin).unwrap(),
        );
        let grads = rope(&x, &cos_v, &sin_v)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&cos_v).is_none() && grads.get(&sin_v).is_none());

        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let y = rope(&to64(&x), &to64(&cos), &to64(&sin)).unwrap();
        assert_eq!(y.dtype(), DType::F64);
        assert_close(
            &y.to_dtype(DType::F32).unwrap(),
            &reference(&x, &cos, &sin),
            "f64 fallback",
        );
    }

    /// SmolLM2-135M attention (9 query heads, 3 KV heads, head_dim 64), batch 4 x seq 256, inputs as
    /// the model makes them (transposed views of `[b, t, h, d]`). Run with the
    /// worker's allocator settings (without them every fresh buffer is page-faulted and zeroed by
    /// the kernel, which dominates the backward figures):
    /// `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 RAYON_NUM_THREADS=2
    /// cargo test --release -p lorad-kernels -- --ignored --nocapture --test-threads=1 bench`.
    #[test]
    #[ignore]
    fn bench_rope() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        let (cos, sin) = tables(256, 64);
        for (name, heads) in [("q", 9), ("k", 3)] {
            let v = Var::from_tensor(&random(&mut rng, &[4, 256, heads, 64], 2.0)).unwrap();
            let x = v.transpose(1, 2).unwrap();
            report(
                &format!("rope {name} [4,{heads},256,64] (transposed view)"),
                &|| rope(&x, &cos, &sin).unwrap(),
                &|| reference(&x, &cos, &sin),
            );
        }
    }
}
