//! The patch-parallel input layer (PCPP §2.2): the whole latent in on every rank, this rank's
//! band of the level-0 grid out, no communication. It reads the input rows its band's outputs
//! need (zero padding only at the image border). With a stride it patchifies (a DiT's
//! `kernel = stride = p` patch embedding): band row `r` of the output reads input rows
//! `r·stride − padding …`, so the band plan is in units of the output (token) grid. An output
//! `2^up` times finer than the level-0 grid (see [`crate::LayerFactory::fine_input_conv2d`])
//! is cut into the same bands, every row count times `2^up`.

use std::sync::Arc;

use pcpp_kernels::{Conv2dParams, Tensor};

use super::{dims4, Shared};
use crate::layers::{Conv2dLayer, CoreError, LayerContext, Result, StepCtx};

pub(super) struct InputConv {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) stride: usize,
    pub(super) pad: usize,
    /// The output grid is `2^up` times finer than the level-0 grid.
    pub(super) up: usize,
}

impl Conv2dLayer for InputConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let (_, _, h, w) = dims4(id, x)?;
        let plan = self.sh.plan_up(self.up)?;
        let k = self.weight.shape()[2];
        let (s, p) = (self.stride.max(1), self.pad);
        let out = |n: usize| (n + 2 * p).checked_sub(k).map(|m| m / s + 1);
        if out(h) != Some(plan.height) || out(w) != Some(plan.width) {
            let grid = if self.up == 0 {
                String::new()
            } else {
                format!(" ({}× finer than its grid)", 1 << self.up)
            };
            return Err(CoreError::Config(format!(
                "layer `{id}`: input is {h}×{w}, which a {k}×{k} kernel with stride {s} and padding {p} does not turn into the {}×{} grid the patch-parallel runtime was built for{grid}",
                plan.height, plan.width
            )));
        }
        let band = plan.band(0, self.sh.me());
        let params = Conv2dParams::new(s, p);
        if self.sh.cols(ctx) {
            // Naive patch cutting columns: the column band's input alone, zero-padded.
            let cb = self.sh.cplan_up(id, self.up)?.band(0, self.sh.me());
            let xs = x.narrow(3, cb.start * s, cb.len() * s).at(id)?;
            return xs.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        if !self.sh.communicates() {
            // Naive patch parallelism: the band's input alone, zero-padded like a separate image.
            let xs = x.narrow(2, band.start * s, band.len() * s).at(id)?;
            return xs.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        // Input rows that the band's outputs read (output row r reads r·s − p … r·s − p + k − 1),
        // clamped to the image; zeros outside it.
        let lo = (band.start * s) as isize - p as isize;
        let hi = ((band.end - 1) * s + k) as isize - p as isize;
        let (s0, s1) = (lo.max(0) as usize, (hi.min(h as isize)).max(0) as usize);
        let xs = x.narrow(2, s0, s1 - s0).at(id)?;
        let params = Conv2dParams {
            stride: s,
            pad_top: (-lo).max(0) as usize,
            pad_bottom: (hi - h as isize).max(0) as usize,
            pad_left: p,
            pad_right: p,
        };
        xs.conv2d(&self.weight, self.bias.as_ref(), params).at(id)
    }
}

#[cfg(test)]
mod tests {
    use pcpp_comm::{LocalTransport, Transport, TransportOptions};
    use pcpp_kernels::{Conv2dParams, Tensor};

    use crate::{ParallelConfig, PatchRuntime, StepCtx};

    fn pattern(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|i| ((i as f32 * 0.618_034 + seed).sin() * 43_758.547).fract() - 0.5)
            .collect();
        Tensor::from_vec(shape, v).unwrap()
    }

    /// Every rank's band of a strided input layer, stitched in rank order, against the serial
    /// output: `(kernel, stride, padding)` on a 20 × 6 input.
    fn bands_equal_serial(cfg: &ParallelConfig, k: usize, s: usize, p: usize) {
        let x = pattern(&[1, 3, 20, 6], 0.3);
        let (w, b) = (pattern(&[4, 3, k, k], 1.7), pattern(&[4], 2.9));
        let want = x.conv2d(&w, Some(&b), Conv2dParams::new(s, p)).unwrap();
        let (gh, gw) = (want.shape()[2], want.shape()[3]);
        for n in [2, 3, 4] {
            let bands = LocalTransport::run(
                n,
                TransportOptions::default(),
                |t: std::sync::Arc<dyn Transport>| {
                    let rt = PatchRuntime::new(t, false, cfg.clone(), gh, gw, 0)?;
                    let layer =
                        rt.factory()
                            .input_conv2d("in", w.clone(), Some(b.clone()), s, p)?;
                    layer.forward(&StepCtx::serial(), &x)
                },
            )
            .unwrap();
            let refs: Vec<&Tensor> = bands.iter().collect();
            let got = Tensor::cat(&refs, 2).unwrap();
            let e = got.max_abs_diff(&want).unwrap();
            assert!(
                e <= 1e-6,
                "{} n={n} k={k} s={s} p={p}: max|Δ| {e}",
                cfg.mode
            );
        }
    }

    #[test]
    fn strided_input_layer_bands_equal_the_serial_output() {
        // A general strided convolution reads input rows across band borders (PCPP reads them
        // from the whole input it holds); a patchify (kernel = stride, no padding) reads none,
        // so even naive patch parallelism is exact.
        bands_equal_serial(&ParallelConfig::pcpp(0.3), 3, 2, 1);
        bands_equal_serial(&ParallelConfig::pcpp(0.3), 3, 1, 1);
        bands_equal_serial(&ParallelConfig::pcpp(0.3), 2, 2, 0);
        bands_equal_serial(&ParallelConfig::naive_patch(), 2, 2, 0);
    }

    #[test]
    fn an_input_that_does_not_give_the_planned_grid_is_an_error() {
        let out = LocalTransport::run(
            2,
            TransportOptions::default(),
            |t: std::sync::Arc<dyn Transport>| {
                let rt = PatchRuntime::new(t, false, ParallelConfig::pcpp(0.3), 10, 3, 0)?;
                let layer = rt.factory().input_conv2d(
                    "in",
                    pattern(&[4, 3, 2, 2], 1.0),
                    Some(pattern(&[4], 2.0)),
                    2,
                    0,
                )?;
                // 22 rows patchify to 11, not the planned 10.
                layer
                    .forward(&StepCtx::serial(), &pattern(&[1, 3, 22, 6], 0.1))
                    .map(|_| ())
            },
        );
        let msg = out.unwrap_err().to_string();
        assert!(msg.contains("stride 2") && msg.contains("10×3"), "{msg}");
    }
}
