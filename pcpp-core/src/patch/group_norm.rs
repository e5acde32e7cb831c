//! The patch-parallel group norm (PCPP §2.6, §7.10): f32 statistics (mean and centred sum of
//! squares per group) merged with element counts so uneven bands are exact, biased variance;
//! modes sync / stale / corrected / separate. On the device path the stale modes keep the bands'
//! moments in a persistent table per step parity that the peers' moments are received into, and
//! can write their output channels-last into a convolution's halo window
//! ([`GroupNormLayer::forward_nhwc_into`]).

use std::sync::Arc;

use pcpp_kernels::{DType, Tensor};

use super::window::{copy_rows, device_windows, merged_into, row_parts, NormOut};
use super::{dims4, Shared};
use crate::cache::Slot;
use crate::exchange::RecvSpec;
use crate::layers::{CoreError, GroupNormLayer, LayerContext, Result, StepCtx};
use crate::schedule::GnMode;

pub(super) struct PatchGroupNorm {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) groups: usize,
    pub(super) eps: f64,
    pub(super) gamma: Option<Tensor>,
    pub(super) beta: Option<Tensor>,
    pub(super) slot: Option<Arc<Slot>>,
}

impl GroupNormLayer for PatchGroupNorm {
    fn forward(&self, ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        self.output(ctx, x, silu_after, NormOut::Nchw)
    }

    fn forward_nhwc(&self, ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        self.output(ctx, x, silu_after, NormOut::Nhwc)
    }

    fn forward_nhwc_into(
        &self,
        ctx: &StepCtx,
        (x, silu_after): (&Tensor, bool),
        dst: &Tensor,
        row0: usize,
    ) -> Result<()> {
        self.normalise(ctx, x, silu_after, NormOut::Into(dst, row0))
            .map(|_| ())
    }
}

impl PatchGroupNorm {
    /// The group norm of `x` as a new tensor laid out as `out` asks.
    fn output(&self, ctx: &StepCtx, x: &Tensor, silu: bool, out: NormOut<'_>) -> Result<Tensor> {
        self.normalise(ctx, x, silu, out)?
            .ok_or_else(|| CoreError::Config(format!("layer `{}`: no group-norm output", self.id)))
    }

    /// The group norm of `x` written as `out` asks (`None` when into a window): straight from
    /// the statistics window's launch on the device path's stale steps, as an NCHW image then
    /// delivered ([`NormOut::deliver`]) elsewhere.
    fn normalise(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        silu_after: bool,
        out: NormOut<'_>,
    ) -> Result<Option<Tensor>> {
        let id = &self.id;
        let sh = &self.sh;
        let (_, c, rows, w) = dims4(id, x)?;
        let level = sh.level_at(ctx, id, rows, w)?;
        let g = self.groups;
        let mode = sh.cfg.stale_gn_mode();
        let slot = match (&self.slot, sh.communicates()) {
            (Some(s), true) if ctx.sync || mode != GnMode::Separate => s,
            _ => {
                return x
                    .group_norm(
                        g,
                        self.gamma.as_ref(),
                        self.beta.as_ref(),
                        self.eps,
                        silu_after,
                    )
                    .at(id)
                    .and_then(|y| out.deliver(id, y))
            }
        };
        let plan = sh.plan();
        let me = sh.me();
        let counts: Vec<f64> = (0..plan.ranks())
            .map(|j| ((c / g.max(1)) * plan.band(level, j).len() * plan.width_at(level)) as f64)
            .collect();
        let peers = sh.peers();
        let dev = x.device();
        // The device path's statistics window: one `[1, bands, b·groups·2]` f32 table per step
        // parity, the peers' moments received into their rows ([`super::window`]).
        let window = (device_windows()
            && sh.on_device_path(dev)
            && matches!(mode, GnMode::Stale | GnMode::Corrected))
        .then(|| RecvSpec {
            peer: me,
            shape: vec![1, plan.ranks(), x.shape()[0] * g * 2],
            dtype: DType::F32,
        });
        if let (false, Some(w)) = (ctx.sync, &window) {
            // The previous step's table: the peers' moments and (kept then) this band's own.
            let prev = sh.read_window(id, slot, ctx, w)?;
            let next = sh.window_buffer(slot, ctx.step, w, dev)?;
            // Corrected: this step's moments go to the next step's table, where its correction
            // starts from them; stale: they replace this band's row of the table merged.
            let corrected = mode == GnMode::Corrected;
            let fresh = if corrected { &next } else { &prev };
            let win = (&prev, &counts[..], me, fresh, corrected);
            let ab = (self.gamma.as_ref(), self.beta.as_ref());
            let y = merged_into(id, x, g, win, ab, (self.eps, silu_after), out)?;
            let sends = peers
                .iter()
                .flat_map(|&p| row_parts(p, fresh, &(me..me + 1)))
                .collect();
            let peer_rows: Vec<_> = peers.iter().map(|&p| (p, p..p + 1)).collect();
            sh.post_window(id, slot, ctx, sends, &peer_rows, w, dev)?;
            return Ok(y);
        }
        // Mean and centred sum of squares per (batch, group), f32 on the wire, merged with each
        // band's element count (uneven bands are exact).
        let own = x.group_moments(g).at(id)?;
        let sends = peers.iter().map(|&p| (p, own.clone())).collect();
        let recvs = peers.iter().map(|&p| RecvSpec::of(p, &own)).collect();
        // All bands' moments in rank order, `mine` at this rank's place.
        let table = |others: &[Tensor], mine: &Tensor| -> Result<Tensor> {
            if others.len() != peers.len() {
                return Err(CoreError::Config(format!(
                    "layer `{id}`: statistics of {} peers, expected {}",
                    others.len(),
                    peers.len()
                )));
            }
            let mut rows: Vec<&Tensor> = others.iter().collect();
            rows.insert(me, mine);
            let t = Tensor::cat(&rows, 0).at(id)?;
            t.reshape(&[rows.len(), own.shape()[0], 2]).at(id)
        };
        let apply = |bands: &Tensor, corrected: Option<(usize, &Tensor)>| {
            x.group_norm_merged(
                g,
                bands,
                &counts,
                corrected,
                self.gamma.as_ref(),
                self.beta.as_ref(),
                self.eps,
                silu_after,
            )
            .at(id)
            .and_then(|y| out.deliver(id, y))
        };
        let as_row = |t: &Tensor| t.reshape(&[1, 1, t.numel()]).at(id);
        if ctx.sync || mode == GnMode::Sync {
            if let Some(w) = &window {
                let kind = slot.kind;
                let got = sh.exchange_now(id, kind, slot.index, sends, recvs, dev, false)?;
                let mut parts = vec![(as_row(&own)?, me)];
                for (t, &p) in got.iter().zip(&peers) {
                    parts.push((as_row(t)?, p));
                }
                sh.keep_window(id, slot, ctx, &parts, copy_rows, w, dev)?;
                return apply(&table(&got, &own)?, None);
            }
            let keep_local = own.clone();
            let got = sh.sync_exchange(id, slot, ctx, sends, recvs, dev, |got| {
                Ok(matches!(mode, GnMode::Stale | GnMode::Corrected)
                    .then(|| (got.to_vec(), Some(keep_local))))
            })?;
            // Every rank merges the same f32 moments in rank order: identical statistics.
            return apply(&table(&got, &own)?, None);
        }
        let (prev, own_prev) =
            sh.stale_exchange(id, slot, ctx, sends, recvs, Some(own.clone()), dev)?;
        match mode {
            GnMode::Corrected => {
                // The previous step's global moments plus the change of own moments (PCPP §2.6).
                let own_prev = own_prev.ok_or_else(|| {
                    CoreError::Config(format!(
                        "layer `{id}`: no own statistics kept from the previous step"
                    ))
                })?;
                apply(&table(&prev, &own_prev)?, Some((me, &own)))
            }
            _ => apply(&table(&prev, &own)?, None),
        }
    }
}
