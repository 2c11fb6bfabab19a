//! The CPU engine: pure Rust, the numerical reference every other engine is held to.
//!
//! Buffers are `Vec<f32>`, views are slices. Ops run on rayon's global pool (its size is
//! set with `RAYON_NUM_THREADS`); matrix products go through the `gemm` crate. Reductions
//! accumulate in f64 in a fixed order, so results do not depend on the thread count.

mod conv;
mod linear;
mod loss;
pub(crate) mod matmul;
mod norm;
mod pool;
mod reduce;
mod scratch;
mod update;

use std::ops::Range;

pub use update::grad_dots;

use super::{
    AvgPool, BatchNorm, Conv2d, Engine, GradDots, Linear, MaxPool, Result, SgdUpdate, ViewPair,
    check_len,
};

/// The CPU engine. Stateless: every op runs on the calling thread and rayon's pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuEngine;

impl Engine for CpuEngine {
    type Buf = Vec<f32>;
    type View<'a> = &'a [f32];
    type ViewMut<'a> = &'a mut [f32];

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }

    fn download(&self, src: &[f32]) -> Result<Vec<f32>> {
        Ok(src.to_vec())
    }

    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn view<'a>(&self, buf: &'a Vec<f32>, range: Range<usize>) -> &'a [f32]
    where
        Self: 'a,
    {
        &buf[range]
    }

    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, range: Range<usize>) -> &'a mut [f32]
    where
        Self: 'a,
    {
        &mut buf[range]
    }

    fn fill_zero(&self, dst: &mut [f32]) -> Result<()> {
        dst.fill(0.0);
        Ok(())
    }

    fn conv2d_forward(&self, s: &Conv2d, x: &[f32], w: &[f32], y: &mut [f32]) -> Result<()> {
        s.check_forward(x.len(), w.len(), y.len())?;
        conv::forward(s, x, w, y);
        Ok(())
    }

    fn conv2d_backward(
        &self,
        s: &Conv2d,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dw: &mut [f32],
        dx: Option<&mut [f32]>,
    ) -> Result<()> {
        let dx_len = dx.as_ref().map(|dx| dx.len());
        s.check_backward(x.len(), w.len(), dy.len(), dw.len(), dx_len)?;
        conv::backward(s, x, w, dy, dw, dx);
        Ok(())
    }

    fn batchnorm_train_forward(
        &self,
        s: &BatchNorm,
        x: &[f32],
        affine: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
        saved: &mut [f32],
        running: &mut [f32],
    ) -> Result<()> {
        s.check(x.len(), affine.len(), residual.map(<[f32]>::len))?;
        s.check_like_input("batch norm output", y.len())?;
        s.check_pairs("batch norm saved statistics", saved.len())?;
        s.check_pairs("batch norm running statistics", running.len())?;
        norm::train_forward(s, x, affine, residual, relu, y, saved, running);
        Ok(())
    }

    fn batchnorm_eval_forward(
        &self,
        s: &BatchNorm,
        x: &[f32],
        affine: &[f32],
        running: &[f32],
        residual: Option<&[f32]>,
        relu: bool,
        y: &mut [f32],
    ) -> Result<()> {
        s.check(x.len(), affine.len(), residual.map(<[f32]>::len))?;
        s.check_pairs("batch norm running statistics", running.len())?;
        s.check_like_input("batch norm output", y.len())?;
        norm::eval_forward(s, x, affine, running, residual, relu, y);
        Ok(())
    }

    fn batchnorm_train_backward(
        &self,
        s: &BatchNorm,
        x: &[f32],
        affine: &[f32],
        saved: &[f32],
        relu_out: Option<&[f32]>,
        dy: &mut [f32],
        dx: &mut [f32],
        daffine: &mut [f32],
    ) -> Result<()> {
        s.check(x.len(), affine.len(), relu_out.map(<[f32]>::len))?;
        s.check_pairs("batch norm saved statistics", saved.len())?;
        s.check_like_input("batch norm output gradient", dy.len())?;
        s.check_like_input("batch norm input gradient", dx.len())?;
        s.check_pairs("batch norm parameter gradient", daffine.len())?;
        norm::train_backward(s, x, affine, saved, relu_out, dy, dx, daffine);
        Ok(())
    }

    fn maxpool_forward(&self, s: &MaxPool, x: &[f32], y: &mut [f32]) -> Result<()> {
        s.check(["max pool input", "max pool output"], x.len(), y.len())?;
        pool::max_forward(s, x, y);
        Ok(())
    }

    fn maxpool_backward(&self, s: &MaxPool, x: &[f32], dy: &[f32], dx: &mut [f32]) -> Result<()> {
        s.check(
            ["max pool input", "max pool output gradient"],
            x.len(),
            dy.len(),
        )?;
        check_len("max pool input gradient", dx.len(), x.len())?;
        pool::max_backward(s, x, dy, dx);
        Ok(())
    }

    fn avgpool_forward(&self, s: &AvgPool, x: &[f32], y: &mut [f32]) -> Result<()> {
        s.check(
            ["average pool input", "average pool output"],
            x.len(),
            y.len(),
        )?;
        pool::avg_forward(s, x, y);
        Ok(())
    }

    fn avgpool_backward(&self, s: &AvgPool, dy: &[f32], dx: &mut [f32]) -> Result<()> {
        let names = [
            "average pool input gradient",
            "average pool output gradient",
        ];
        s.check(names, dx.len(), dy.len())?;
        pool::avg_backward(s, dy, dx);
        Ok(())
    }

    fn linear_forward(
        &self,
        s: &Linear,
        x: &[f32],
        wb: &[f32],
        relu: bool,
        y: &mut [f32],
    ) -> Result<()> {
        s.check_forward(x.len(), wb.len(), y.len())?;
        linear::forward(s, x, wb, relu, y);
        Ok(())
    }

    fn linear_backward(
        &self,
        s: &Linear,
        x: &[f32],
        wb: &[f32],
        relu_out: Option<&[f32]>,
        dy: &mut [f32],
        dwb: &mut [f32],
        dx: Option<&mut [f32]>,
    ) -> Result<()> {
        let (y_len, dx_len) = (relu_out.map(<[f32]>::len), dx.as_ref().map(|dx| dx.len()));
        s.check_backward(x.len(), wb.len(), y_len, dy.len(), dwb.len(), dx_len)?;
        linear::backward(s, x, wb, relu_out, dy, dwb, dx);
        Ok(())
    }

    fn ntxent(
        &self,
        s: &ViewPair,
        z_i: &[f32],
        z_j: &[f32],
        temperature: f32,
        dz_i: &mut [f32],
        dz_j: &mut [f32],
    ) -> Result<f32> {
        s.check([z_i.len(), z_j.len(), dz_i.len(), dz_j.len()])?;
        Ok(loss::ntxent(s, z_i, z_j, temperature, dz_i, dz_j))
    }

    fn cohesion(
        &self,
        s: &ViewPair,
        z_i: &[f32],
        z_j: &[f32],
        temperature: f32,
        dz_i: &mut [f32],
        dz_j: &mut [f32],
    ) -> Result<f32> {
        s.check([z_i.len(), z_j.len(), dz_i.len(), dz_j.len()])?;
        Ok(loss::cohesion(s, z_i, z_j, temperature, dz_i, dz_j))
    }

    fn grad_dots(&self, g1: &[f32], g2: &[f32]) -> Result<GradDots> {
        check_len("second gradient", g2.len(), g1.len())?;
        Ok(update::grad_dots(g1, g2))
    }

    fn combine_grads(
        &self,
        g1: &[f32],
        g2: &[f32],
        alpha: f32,
        beta: f32,
        out: &mut [f32],
    ) -> Result<()> {
        check_len("second gradient", g2.len(), g1.len())?;
        check_len("combined gradient", out.len(), g1.len())?;
        update::combine(g1, g2, alpha, beta, out);
        Ok(())
    }

    fn sgd_step(
        &self,
        u: &SgdUpdate,
        g1: &[f32],
        g2: &[f32],
        params: &mut [f32],
        momentum: &mut [f32],
    ) -> Result<()> {
        check_len("first gradient", g1.len(), params.len())?;
        check_len("second gradient", g2.len(), params.len())?;
        check_len("momentum", momentum.len(), params.len())?;
        update::sgd_step(u, g1, g2, params, momentum);
        Ok(())
    }
}
