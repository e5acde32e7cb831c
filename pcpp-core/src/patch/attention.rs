//! The patch-parallel attention layers (PCPP §2.3–2.4, §7.2, §7.5): own K/V fresh; in stale
//! steps only the partial-conditioning window of the other bands is sent and used, one step old;
//! synchronous steps attend over all bands' fresh K/V (exact); naive patch parallelism attends
//! over its own band only. One K/V exchange ([`band_kv`], of k and v packed side by side) serves
//! both the self-attention that owns its projections (the UNet's: `[k | v]` from one GEMM, read
//! in place by the attention) and the attention over model-projected q/k/v with always local
//! extra tokens (a DiT's joint text + image attention, whose text K/V never travel).

use std::ops::Range;
use std::sync::Arc;

use pcpp_kernels::{Cols, LayerNormArgs, RowStats, Tensor};

use super::window::{copy_rows, device_windows, row_parts, Layout, OwnKv};
use super::Shared;
use crate::cache::Slot;
use crate::exchange::RecvSpec;
use crate::layers::{
    joint_attend, AttentionWeights, CoreError, LayerContext, ProjectedAttentionLayer, Result,
    SelfAttentionLayer, StackedProjection, StepCtx,
};
use crate::plan::{band_tokens, kv_recvs, kv_sends};
use crate::schedule::SyncMode;

/// The K and V that the band's queries attend over at `level`, packed `[k | v]` (`[b, L, 2c]`):
/// the other bands' (all of them, fresh, in synchronous steps; the stale window within the
/// level's portion otherwise) around this band's own K/V `own` (`[b, l, 2c]`), top to bottom.
/// Without a slot (naive patch, serial) just the own K/V. On the device path a stale step reads
/// and fills the slot's persistent windows in place ([`super::window`]).
fn band_kv(
    sh: &Shared,
    slot: Option<&Arc<Slot>>,
    ctx: &StepCtx,
    id: &str,
    level: usize,
    own: OwnKv<'_>,
) -> Result<Tensor> {
    let slot = match (slot, sh.communicates()) {
        (Some(s), true) => s,
        _ => return own.tensor(id),
    };
    let plan = sh.plan();
    let me = sh.me();
    let tokens = band_tokens(plan, level);
    let ([b, l, c2], dtype) = own.dims(id)?;
    if l != tokens[me] {
        return Err(CoreError::Config(format!(
            "layer `{id}`: {l} tokens but the band has {} at level {level}",
            tokens[me]
        )));
    }
    let portion = sh.cfg.portion_at(level);
    let dev = own.device();
    let spec = |peer: usize, n: usize| RecvSpec {
        peer,
        shape: vec![b, n, c2],
        dtype,
    };
    let lay = Layout::new(&tokens, me, portion);
    let window = (device_windows() && sh.on_device_path(dev)).then(|| spec(me, lay.rows));
    if let (false, Some(w)) = (ctx.sync, &window) {
        // In place: own K/V into its rows of the previous step's window, sent from there.
        let prev = sh.read_window(id, slot, ctx, w)?;
        own.write_rows(id, &prev, lay.own.start)?;
        if sh.cfg.sync_mode != SyncMode::None {
            let at = |r: Range<usize>| lay.own.start + r.start..lay.own.start + r.end;
            let sends = kv_sends(&tokens, me, portion)
                .into_iter()
                .flat_map(|(j, r)| row_parts(j, &prev, &at(r)))
                .collect();
            sh.post_window(id, slot, ctx, sends, &lay.parts, w, dev)?;
        }
        return Ok(prev);
    }
    let kv = own.tensor(id)?;
    // Other bands' K/V, top to bottom, with the band they come from.
    let mut others: Vec<(usize, Tensor)> = Vec::new();
    if ctx.sync {
        // Exact: every band's fresh K/V.
        let peers = sh.peers();
        let sends = peers.iter().map(|&p| (p, kv.clone())).collect();
        let recvs = peers.iter().map(|&p| spec(p, tokens[p])).collect();
        // What the window keeps of every band's K/V, in the order of `kv_recvs`.
        let keep = |got: &[Tensor]| -> Result<Vec<Tensor>> {
            kv_recvs(&tokens, me, portion)
                .into_iter()
                .map(|(j, r)| {
                    let i = peers.iter().position(|&p| p == j).ok_or_else(|| {
                        CoreError::Config(format!("layer `{id}`: no K/V from band {j}"))
                    })?;
                    got[i].narrow(1, r.start, r.len()).at(id)
                })
                .collect()
        };
        let got = match window {
            Some(w) => {
                let kind = slot.kind;
                let got = sh.exchange_now(id, kind, slot.index, sends, recvs, dev, false)?;
                let rows = lay.parts.iter().map(|(_, rows)| rows.start);
                let parts: Vec<_> = keep(&got)?.into_iter().zip(rows).collect();
                sh.keep_window(id, slot, ctx, &parts, copy_rows, &w, dev)?;
                got
            }
            None => sh.sync_exchange(id, slot, ctx, sends, recvs, dev, |got| {
                Ok(Some((keep(got)?, None)))
            })?,
        };
        others.extend(peers.iter().copied().zip(got));
    } else {
        let sends = kv_sends(&tokens, me, portion)
            .into_iter()
            .map(|(j, r)| Ok((j, kv.narrow(1, r.start, r.len()).at(id)?)))
            .collect::<Result<Vec<_>>>()?;
        let want = kv_recvs(&tokens, me, portion);
        let recvs = want.iter().map(|(j, r)| spec(*j, r.len())).collect();
        let (got, _) = sh.stale_exchange(id, slot, ctx, sends, recvs, None, dev)?;
        if got.len() != want.len() {
            return Err(CoreError::Config(format!(
                "layer `{id}`: {} K/V parts stored, {} expected",
                got.len(),
                want.len()
            )));
        }
        others.extend(want.iter().map(|(j, _)| *j).zip(got));
    }
    let mut parts: Vec<&Tensor> = others.iter().filter(|o| o.0 < me).map(|o| &o.1).collect();
    parts.push(&kv);
    parts.extend(others.iter().filter(|o| o.0 > me).map(|o| &o.1));
    Tensor::cat(&parts, 1).at(id)
}

/// The patch-parallel self-attention of a model that gives its projection weights: q from one
/// GEMM, `[k | v]` from another (one tensor to send, store and stack into the window), and the
/// attention reads k and v from the packed window in place.
pub(super) struct PatchAttention {
    id: String,
    sh: Arc<Shared>,
    to_q: Tensor,
    q_bias: Option<Tensor>,
    kv: StackedProjection,
    to_out: Tensor,
    out_bias: Option<Tensor>,
    heads: usize,
    slot: Option<Arc<Slot>>,
}

impl PatchAttention {
    pub(super) fn new(
        id: &str,
        sh: Arc<Shared>,
        w: AttentionWeights,
        slot: Option<Arc<Slot>>,
    ) -> Result<Self> {
        Ok(PatchAttention {
            id: id.to_string(),
            sh,
            kv: w.stacked_kv().at(id)?,
            to_q: w.to_q,
            q_bias: w.q_bias,
            to_out: w.to_out,
            out_bias: w.out_bias,
            heads: w.heads,
            slot,
        })
    }

    /// The band's queries `q` over its K/V window (the band's own K/V from `own`), heads merged,
    /// before the output projection.
    fn attend(
        &self,
        ctx: &StepCtx,
        q: &Tensor,
        own: OwnKv<'_>,
        spatial: (usize, usize),
    ) -> Result<Tensor> {
        let id = &self.id;
        let (rows, cols) = spatial;
        let level = self.sh.level_at(ctx, id, rows, cols)?;
        let win = band_kv(&self.sh, self.slot.as_ref(), ctx, id, level, own)?;
        let c = q.shape()[2];
        let (k, v) = (Cols::new(&win, 0), Cols::new(&win, c));
        Tensor::attention_packed(Cols::new(q, 0), k, v, c, self.heads, false).at(id)
    }
}

impl SelfAttentionLayer for PatchAttention {
    fn forward(&self, ctx: &StepCtx, x: &Tensor, spatial: (usize, usize)) -> Result<Tensor> {
        let q = x.linear(&self.to_q, self.q_bias.as_ref()).at(&self.id)?;
        self.attend(ctx, &q, OwnKv::Project(x, &self.kv), spatial)?
            .linear(&self.to_out, self.out_bias.as_ref())
            .at(&self.id)
    }

    fn forward_norm_add(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        norm: LayerNormArgs<'_>,
        stats: &RowStats,
        spatial: (usize, usize),
    ) -> Result<(Tensor, RowStats)> {
        // Without statistics the norm runs once, for both projections.
        let h;
        let (q, own) = if stats.is_some() {
            let q = x.norm_linear(norm, stats, &self.to_q, self.q_bias.as_ref());
            (q, OwnKv::ProjectNormed(x, &self.kv, norm, stats))
        } else {
            h = x.layer_norm(norm.gamma, norm.beta, norm.eps).at(&self.id)?;
            (
                h.linear(&self.to_q, self.q_bias.as_ref()),
                OwnKv::Project(&h, &self.kv),
            )
        };
        let q = q.at(&self.id)?;
        self.attend(ctx, &q, own, spatial)?
            .linear_add_stats(&self.to_out, self.out_bias.as_ref(), x)
            .at(&self.id)
    }
}

pub(super) struct PatchProjectedAttention {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) heads: usize,
    pub(super) slot: Option<Arc<Slot>>,
}

impl ProjectedAttentionLayer for PatchProjectedAttention {
    fn forward(
        &self,
        ctx: &StepCtx,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        extra: Option<(&Tensor, &Tensor, &Tensor)>,
        spatial: (usize, usize),
    ) -> Result<Tensor> {
        let id = &self.id;
        let (rows, cols) = spatial;
        let level = self.sh.level_at(ctx, id, rows, cols)?;
        if self.slot.is_none() || !self.sh.communicates() {
            return joint_attend(id, self.heads, q, k, v, extra);
        }
        let kv = Tensor::cat(&[k, v], 2).at(id)?;
        let own = OwnKv::Ready(&kv);
        let win = band_kv(&self.sh, self.slot.as_ref(), ctx, id, level, own)?;
        let c = k.shape()[2];
        let (kw, vw) = (win.narrow(2, 0, c).at(id)?, win.narrow(2, c, c).at(id)?);
        joint_attend(id, self.heads, q, &kw, &vw, extra)
    }
}
