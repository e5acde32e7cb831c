//! The patch-parallel attention layers (PCPP §2.3–2.4, §7.2, §7.5): own K/V fresh; in stale
//! steps only the partial-conditioning window of the other bands is sent and used, one step old;
//! synchronous steps attend over all bands' fresh K/V (exact); naive patch parallelism attends
//! over its own band only. One K/V exchange ([`band_kv`]) serves both the self-attention that
//! owns its projections (the UNet's) and the attention over model-projected q/k/v with always
//! local extra tokens (a DiT's joint text + image attention, whose text K/V never travel).

use std::sync::Arc;

use pcpp_kernels::Tensor;

use super::Shared;
use crate::cache::Slot;
use crate::exchange::RecvSpec;
use crate::layers::{
    joint_attend, AttentionWeights, CoreError, LayerContext, ProjectedAttentionLayer, Result,
    SelfAttentionLayer, StepCtx,
};
use crate::plan::{band_tokens, kv_recvs, kv_sends};

/// The K and V that the band's queries attend over at `level`: the other bands' (all of them,
/// fresh, in synchronous steps; the stale window within the level's portion otherwise) around
/// this band's own `k`, `v` (`[b, l, c]`), top to bottom. Without a slot (naive patch, serial)
/// just the own K/V.
fn band_kv(
    sh: &Shared,
    slot: Option<&Arc<Slot>>,
    ctx: &StepCtx,
    id: &str,
    level: usize,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let slot = match (slot, sh.communicates()) {
        (Some(s), true) => s,
        _ => return Ok((k.clone(), v.clone())),
    };
    let plan = sh.plan();
    let me = sh.me();
    let tokens = band_tokens(plan, level);
    let (b, l, c) = match k.shape() {
        &[b, l, c] => (b, l, c),
        s => {
            return Err(CoreError::Config(format!(
                "layer `{id}`: expected tokens [b, l, c], got {s:?}"
            )))
        }
    };
    if l != tokens[me] {
        return Err(CoreError::Config(format!(
            "layer `{id}`: {l} tokens but the band has {} at level {level}",
            tokens[me]
        )));
    }
    let kv = Tensor::cat(&[k, v], 2).at(id)?;
    let portion = sh.cfg.portion_at(level);
    let dev = k.device();
    let spec = |peer: usize, n: usize| RecvSpec {
        peer,
        shape: vec![b, n, 2 * c],
        dtype: k.dtype(),
    };
    // Other bands' K/V, top to bottom, with the band they come from.
    let mut others: Vec<(usize, Tensor)> = Vec::new();
    if ctx.sync {
        // Exact: every band's fresh K/V.
        let peers = sh.peers();
        let sends = peers.iter().map(|&p| (p, kv.clone())).collect();
        let recvs = peers.iter().map(|&p| spec(p, tokens[p])).collect();
        let keep = kv_recvs(&tokens, me, portion);
        let got = sh.sync_exchange(id, slot, ctx, sends, recvs, dev, |got| {
            let mut out = Vec::with_capacity(keep.len());
            for (j, r) in &keep {
                let i = peers.iter().position(|p| p == j).ok_or_else(|| {
                    CoreError::Config(format!("layer `{id}`: no K/V from band {j}"))
                })?;
                out.push(got[i].narrow(1, r.start, r.len()).at(id)?);
            }
            Ok(Some((out, None)))
        })?;
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
    let win = Tensor::cat(&parts, 1).at(id)?;
    let kw = win.narrow(2, 0, c).at(id)?;
    let vw = win.narrow(2, c, c).at(id)?;
    Ok((kw, vw))
}

pub(super) struct PatchAttention {
    pub(super) id: String,
    pub(super) sh: Arc<Shared>,
    pub(super) w: AttentionWeights,
    pub(super) slot: Option<Arc<Slot>>,
}

impl SelfAttentionLayer for PatchAttention {
    fn forward(&self, ctx: &StepCtx, x: &Tensor, spatial: (usize, usize)) -> Result<Tensor> {
        let id = &self.id;
        let (rows, cols) = spatial;
        let level = self.sh.level_at(ctx, id, rows, cols)?;
        let (q, k, v) = self.w.qkv(x).at(id)?;
        let (kw, vw) = band_kv(&self.sh, self.slot.as_ref(), ctx, id, level, &k, &v)?;
        self.w.attend(&q, &kw, &vw).at(id)
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
        let (kw, vw) = band_kv(&self.sh, self.slot.as_ref(), ctx, id, level, k, v)?;
        joint_attend(id, self.heads, q, &kw, &vw, extra)
    }
}
