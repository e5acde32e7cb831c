//! The patch-parallel `k×k` convolution (PCPP §2.2, §7.3): halo rows point-to-point from the
//! bands that hold them (normally the two neighbours), zero rows at the image border; fresh in
//! synchronous steps, the previous step's rows afterwards. Naive patch parallelism pads with
//! zeros where other bands would be (rows, or columns on steps that cut columns). An input `2^up`
//! times finer than the level-0 grid (see [`crate::LayerFactory::fine_conv2d`]) is cut into the
//! same bands, every row count times `2^up`. On the device path, with a filter that takes
//! channels-last input, stale steps keep the halos in place ([`super::window`]), and a group norm
//! handed to the convolution ([`Conv2dLayer::forward_normed`]) writes the band's rows of that
//! window itself instead of writing an image that is then transposed in.

use std::sync::Arc;

use pcpp_kernels::{Conv2dParams, Tensor};

use super::window::{device_windows, nhwc_rows, row_parts};
use super::{dims4, Shared};
use crate::cache::Slot;
use crate::exchange::RecvSpec;
use crate::geometry::HaloPlan;
use crate::layers::{Conv2dLayer, CoreError, GroupNormLayer, LayerContext, Result, StepCtx};
use crate::schedule::SyncMode;

pub(super) struct HaloConv {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) weight: Tensor,
    pub(super) bias: Option<Tensor>,
    pub(super) stride: usize,
    pub(super) pad: usize,
    pub(super) slot: Option<Arc<Slot>>,
    /// The input is `2^up` times finer than the level-0 grid.
    pub(super) up: usize,
}

/// A convolution's input: an image, or a group norm of one that the convolution asks for where
/// it wants it (written straight into its halo window on the device path's stale steps).
#[derive(Clone, Copy)]
enum Src<'a> {
    Image(&'a Tensor),
    Normed(&'a dyn GroupNormLayer, &'a Tensor, bool),
}

impl Src<'_> {
    /// The input as an NCHW image (runs the norm: call it once, on one path).
    fn image(self, ctx: &StepCtx) -> Result<Tensor> {
        match self {
            Src::Image(x) => Ok(x.clone()),
            Src::Normed(norm, x, silu) => norm.forward(ctx, x, silu),
        }
    }
}

impl Conv2dLayer for HaloConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        self.forward_add(ctx, x, None, None)
    }

    fn forward_add(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.run(ctx, Src::Image(x), plane, residual)
    }

    fn forward_normed(
        &self,
        ctx: &StepCtx,
        norm: &dyn GroupNormLayer,
        (x, silu_after): (&Tensor, bool),
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.run(ctx, Src::Normed(norm, x, silu_after), plane, residual)
    }
}

impl HaloConv {
    fn run(
        &self,
        ctx: &StepCtx,
        src: Src<'_>,
        plane: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let conv = |xin: &Tensor, params| {
            xin.conv2d_add(&self.weight, self.bias.as_ref(), params, plane, residual)
                .at(&self.id)
        };
        let id = &self.id;
        let sh = &self.sh;
        let x = match src {
            Src::Image(x) | Src::Normed(_, x, _) => x,
        };
        let (b, c, rows, w) = dims4(id, x)?;
        let k = self.weight.shape()[2];
        if sh.cols(ctx) {
            // Naive patch cutting columns: zero columns where other bands would be.
            let level = sh.level_at_up(ctx, id, rows, w, self.up)?;
            let cplan = sh.cplan_up(id, self.up)?;
            let hp = HaloPlan::new(&cplan, level, sh.me(), k, self.stride, self.pad);
            let left: usize = hp.recv_above.iter().map(|r| r.1).sum();
            let right: usize = hp.recv_below.iter().map(|r| r.1).sum();
            let params = Conv2dParams {
                stride: self.stride,
                pad_top: self.pad,
                pad_bottom: self.pad,
                pad_left: hp.pad_top + left,
                pad_right: hp.pad_bottom + right,
            };
            return conv(&src.image(ctx)?, params);
        }
        let level = sh.level_at_up(ctx, id, rows, w, self.up)?;
        let plan = sh.plan_up(self.up)?;
        let hp = HaloPlan::new(&plan, level, sh.me(), k, self.stride, self.pad);
        let above: usize = hp.recv_above.iter().map(|r| r.1).sum();
        let below: usize = hp.recv_below.iter().map(|r| r.1).sum();
        let slot = match (&self.slot, sh.communicates()) {
            (Some(s), true) => s,
            _ => {
                // Naive patch parallelism: zero rows where other bands would be.
                let params = Conv2dParams {
                    stride: self.stride,
                    pad_top: hp.pad_top + above,
                    pad_bottom: hp.pad_bottom + below,
                    pad_left: self.pad,
                    pad_right: self.pad,
                };
                return conv(&src.image(ctx)?, params);
            }
        };
        let dev = x.device();
        // The device path's channels-last window: border zero rows, halos above, own rows,
        // halos below, border zero rows; the convolution reads it with no vertical padding.
        let top = hp.pad_top + above;
        let window =
            (device_windows() && sh.on_device_path(dev) && Tensor::conv_takes_nhwc(&self.weight))
                .then(|| RecvSpec {
                    peer: sh.me(),
                    shape: vec![b, top + rows + below + hp.pad_bottom, w, c],
                    dtype: x.dtype(),
                });
        let mut at = Vec::with_capacity(hp.recv_above.len() + hp.recv_below.len());
        let mut row = hp.pad_top;
        for &(p, n) in &hp.recv_above {
            at.push((p, row..row + n));
            row += n;
        }
        row += rows;
        for &(p, n) in &hp.recv_below {
            at.push((p, row..row + n));
            row += n;
        }
        if let (false, Some(spec)) = (ctx.sync, &window) {
            let prev = sh.read_window(id, slot, ctx, spec)?;
            match src {
                Src::Image(x) => nhwc_rows(id, x, &prev, top)?,
                Src::Normed(norm, x, silu) => norm.forward_nhwc_into(ctx, (x, silu), &prev, top)?,
            }
            if sh.cfg.sync_mode != SyncMode::None {
                let sends = hp
                    .send
                    .iter()
                    .flat_map(|(p, r)| row_parts(*p, &prev, &(top + r.start..top + r.end)))
                    .collect();
                sh.post_window(id, slot, ctx, sends, &at, spec, dev)?;
            }
            let params = Conv2dParams {
                stride: self.stride,
                pad_top: 0,
                pad_bottom: 0,
                pad_left: self.pad,
                pad_right: self.pad,
            };
            return prev
                .conv2d_add_nhwc(&self.weight, self.bias.as_ref(), params, plane, residual)
                .at(id);
        }
        let x = &src.image(ctx)?;
        let sends = hp
            .send
            .iter()
            .map(|(p, r)| Ok((*p, x.narrow(2, r.start, r.len()).at(id)?)))
            .collect::<Result<Vec<_>>>()?;
        let recv_rows: Vec<(usize, usize)> = hp
            .recv_above
            .iter()
            .chain(&hp.recv_below)
            .copied()
            .collect();
        let recvs = recv_rows
            .iter()
            .map(|&(p, n)| RecvSpec {
                peer: p,
                shape: vec![b, c, n, w],
                dtype: x.dtype(),
            })
            .collect();
        let got = match (ctx.sync, &window) {
            (true, Some(spec)) => {
                let kind = slot.kind;
                let got = sh.exchange_now(id, kind, slot.index, sends, recvs, dev, false)?;
                let parts: Vec<_> = got
                    .iter()
                    .zip(&at)
                    .map(|(t, (_, r))| (t.clone(), r.start))
                    .collect();
                sh.keep_window(id, slot, ctx, &parts, nhwc_rows, spec, dev)?;
                got
            }
            (true, None) => sh.sync_exchange(id, slot, ctx, sends, recvs, dev, |g| {
                Ok(Some((g.to_vec(), None)))
            })?,
            _ => sh.stale_exchange(id, slot, ctx, sends, recvs, None, dev)?.0,
        };
        if got.len() != recv_rows.len() {
            return Err(CoreError::Config(format!(
                "layer `{id}`: {} halo parts stored, {} expected",
                got.len(),
                recv_rows.len()
            )));
        }
        // Image-border rows are the convolution's own zero padding.
        let n_above = hp.recv_above.len();
        let mut parts: Vec<&Tensor> = got.iter().take(n_above).collect();
        parts.push(x);
        parts.extend(got.iter().skip(n_above));
        let xin = if parts.len() == 1 {
            x.clone()
        } else {
            Tensor::cat(&parts, 2).at(id)?
        };
        let params = Conv2dParams {
            stride: self.stride,
            pad_top: hp.pad_top,
            pad_bottom: hp.pad_bottom,
            pad_left: self.pad,
            pad_right: self.pad,
        };
        conv(&xin, params)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use pcpp_comm::{LocalTransport, Transport, TransportOptions};
    use pcpp_kernels::{Conv2dParams, Tensor};

    use crate::{CoreError, PatchRuntime};

    fn pattern(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|i| ((i as f32 * 0.618_034 + seed).sin() * 43_758.547).fract() - 0.5)
            .collect();
        Tensor::from_vec(shape, v).unwrap()
    }

    /// An input twice as fine as the 10 × 6 level-0 grid (`up = 1`): the fine input layer, a
    /// fine `3×3` convolution (halos of the fine bands) and a stride-2 fine convolution down to
    /// the level-0 grid; every rank's band, stitched in rank order, against the serial layers.
    #[test]
    fn fine_grid_bands_equal_the_serial_output() {
        let x = pattern(&[1, 3, 20, 12], 0.3);
        let (w0, b0) = (pattern(&[4, 3, 3, 3], 1.1), pattern(&[4], 1.3));
        let (w1, b1) = (pattern(&[4, 4, 3, 3], 2.1), pattern(&[4], 2.3));
        let (w2, b2) = (pattern(&[5, 4, 3, 3], 3.1), pattern(&[5], 3.3));
        let serial = |x: &Tensor| -> Tensor {
            let h = x.conv2d(&w0, Some(&b0), Conv2dParams::new(1, 1)).unwrap();
            let h = h.conv2d(&w1, Some(&b1), Conv2dParams::new(1, 1)).unwrap();
            h.conv2d(&w2, Some(&b2), Conv2dParams::new(2, 1)).unwrap()
        };
        let want = serial(&x);
        assert_eq!(want.shape(), &[1, 5, 10, 6]);
        for n in [2, 3] {
            let bands =
                LocalTransport::run(n, TransportOptions::default(), |t: Arc<dyn Transport>| {
                    let rt = PatchRuntime::one_pass(t, 10, 6, 0)?;
                    let f = rt.factory();
                    let l0 = f.fine_input_conv2d("c0", w0.clone(), Some(b0.clone()), 1, 1, 1)?;
                    let l1 = f.fine_conv2d("c1", w1.clone(), Some(b1.clone()), 1, 1, 1)?;
                    let l2 = f.fine_conv2d("c2", w2.clone(), Some(b2.clone()), 2, 1, 1)?;
                    let d = rt.driver();
                    d.begin_generation()?;
                    let ctx = d.step_ctx(0);
                    let h = l0.forward(&ctx, &x)?;
                    let h = l1.forward(&ctx, &h)?;
                    let out = l2.forward(&ctx, &h)?;
                    d.end_generation()?;
                    Ok::<Tensor, CoreError>(out)
                })
                .unwrap();
            let refs: Vec<&Tensor> = bands.iter().collect();
            let got = Tensor::cat(&refs, 2).unwrap();
            let e = got.max_abs_diff(&want).unwrap();
            assert!(e <= 1e-5, "n={n}: max|Δ| {e}");
        }
        // The serial factory ignores `up`; a wrong fine input size is an error naming the layer.
        let out = LocalTransport::run(2, TransportOptions::default(), |t: Arc<dyn Transport>| {
            let rt = PatchRuntime::one_pass(t, 10, 6, 0)?;
            let l0 = rt
                .factory()
                .fine_input_conv2d("c0", w0.clone(), Some(b0.clone()), 1, 1, 1)?;
            l0.forward(&rt.driver().step_ctx(0), &pattern(&[1, 3, 10, 6], 0.1))
                .map(|_| ())
        });
        let msg = out.unwrap_err().to_string();
        assert!(msg.contains("`c0`") && msg.contains("20×12"), "{msg}");
    }
}
