//! Tensor parallelism, the baseline of PCPP §5 (`parallelism = tensor`): every rank of a group
//! holds the whole image; self-attention heads, GEGLU feed-forward hidden units and the middle
//! channels of a [`ChannelSplit`] block (in SDXL, between the two convolutions of a ResNet block)
//! are split over the group's ranks, each rank computes a partial output, and an all-reduce sums
//! them after each split block. The split block's group norm all-reduces its statistics (2 values
//! per batch and group, f32). Everything else (input conv, other norms, projections,
//! cross-attention, samplers) runs whole on every rank.
//!
//! The all-reduce is a reduce-scatter followed by an all-gather over point-to-point exchanges:
//! rank `j` sums chunk `j` of every rank's partial result in rank order, so every rank gets
//! bit-identical sums. Per rank and all-reduce of `m` elements it sends and receives
//! `(m − |c_me|) + (n − 1)·|c_me|` elements, with `c_j = [j·m/n, (j+1)·m/n)`.

use std::ops::Range;
use std::sync::Arc;

use pcpp_comm::CommKind;
use pcpp_kernels::Tensor;

use crate::layers::{
    AttentionWeights, ChannelSplit, CoreError, FeedForwardLayer, FeedForwardWeights, GatherLayer,
    GroupNormLayer, LayerContext, Result, SelfAttentionLayer, StepCtx,
};
use crate::patch::Shared;

/// Tags of the two phases of an all-reduce on the group transport.
const REDUCE_TAG: u32 = 1;
const GATHER_TAG: u32 = 2;
/// Tag of the CFG-branch exchange on the world transport.
const BRANCH_TAG: u32 = 3;

/// The share `r` of `n` gets of `total` items.
pub fn share(total: usize, n: usize, r: usize) -> Range<usize> {
    total * r / n..total * (r + 1) / n
}

/// Elements one rank sends (and receives) in an all-reduce of `m` elements over `n` ranks.
pub fn all_reduce_elems(m: usize, n: usize, me: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let mine = share(m, n, me).len();
    (m - mine) + (n - 1) * mine
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn f32_from(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Sums `x` over the ranks of the group (in f32).
fn all_reduce(sh: &Shared, id: &str, x: &Tensor) -> Result<Tensor> {
    let g = &sh.group;
    let (n, me) = (g.size(), g.rank());
    if n <= 1 {
        return Ok(x.clone());
    }
    let data = x.to_vec_f32().at(id)?;
    let m = data.len();
    let peers: Vec<usize> = (0..n).filter(|&j| j != me).collect();
    let mine = share(m, n, me);
    let sends = peers
        .iter()
        .map(|&j| (j, f32_bytes(&data[share(m, n, j)])))
        .collect();
    let recvs = peers.iter().map(|&j| (j, mine.len() * 4)).collect();
    let got = sh.wait(
        id,
        sh.post(id, CommKind::Other, REDUCE_TAG, sends, recvs, false)?,
    )?;
    let mut acc = vec![0f32; mine.len()];
    let mut it = got.iter();
    for r in 0..n {
        let part = if r == me {
            data[mine.clone()].to_vec()
        } else {
            f32_from(it.next().ok_or_else(|| {
                CoreError::Config(format!("layer `{id}`: partial sum of rank {r} missing"))
            })?)
        };
        if part.len() != acc.len() {
            return Err(CoreError::Config(format!(
                "layer `{id}`: partial sum of rank {r} has {} values, expected {}",
                part.len(),
                acc.len()
            )));
        }
        for (a, v) in acc.iter_mut().zip(part) {
            *a += v;
        }
    }
    let own = f32_bytes(&acc);
    let sends = peers.iter().map(|&j| (j, own.clone())).collect();
    let recvs = peers
        .iter()
        .map(|&j| (j, share(m, n, j).len() * 4))
        .collect();
    let got = sh.wait(
        id,
        sh.post(id, CommKind::Other, GATHER_TAG, sends, recvs, false)?,
    )?;
    let mut out = Vec::with_capacity(m);
    let mut it = got.iter();
    for r in 0..n {
        if r == me {
            out.extend_from_slice(&acc);
        } else {
            let b = it.next().ok_or_else(|| {
                CoreError::Config(format!("layer `{id}`: sum chunk of rank {r} missing"))
            })?;
            out.extend(f32_from(b));
        }
    }
    Tensor::from_vec(x.shape(), out).at(id)
}

fn rows(id: &str, t: &Tensor, r: &Range<usize>) -> Result<Tensor> {
    t.narrow(0, r.start, r.len()).at(id)
}

fn cols(id: &str, t: &Tensor, r: &Range<usize>) -> Result<Tensor> {
    t.narrow(1, r.start, r.len()).at(id)
}

fn too_few(id: &str, what: &str, have: usize, n: usize) -> CoreError {
    CoreError::Config(format!(
        "layer `{id}`: tensor parallelism over {n} ranks needs at least {n} {what}, the layer has {have}"
    ))
}

struct TpAttention {
    id: String,
    sh: Arc<Shared>,
    w: AttentionWeights,
}

impl SelfAttentionLayer for TpAttention {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor, _spatial: (usize, usize)) -> Result<Tensor> {
        let (q, k, v) = self.w.qkv(x).at(&self.id)?;
        let part = self.w.attend(&q, &k, &v).at(&self.id)?;
        all_reduce(&self.sh, &self.id, &part)
    }
}

/// Self-attention with this rank's heads; the output bias is added by group rank 0 only.
pub(crate) fn attention(
    sh: Arc<Shared>,
    id: &str,
    w: AttentionWeights,
) -> Result<Arc<dyn SelfAttentionLayer>> {
    let (n, me) = (sh.group.size(), sh.group.rank());
    if w.heads < n {
        return Err(too_few(id, "heads", w.heads, n));
    }
    let d = w.to_q.shape()[0] / w.heads;
    let h = share(w.heads, n, me);
    let ch = h.start * d..h.end * d;
    let opt = |b: &Option<Tensor>| b.as_ref().map(|b| rows(id, b, &ch)).transpose();
    let local = AttentionWeights {
        to_q: rows(id, &w.to_q, &ch)?,
        to_k: rows(id, &w.to_k, &ch)?,
        to_v: rows(id, &w.to_v, &ch)?,
        q_bias: opt(&w.q_bias)?,
        k_bias: opt(&w.k_bias)?,
        v_bias: opt(&w.v_bias)?,
        to_out: cols(id, &w.to_out, &ch)?,
        out_bias: if me == 0 { w.out_bias } else { None },
        heads: h.len(),
    };
    Ok(Arc::new(TpAttention {
        id: id.to_string(),
        sh,
        w: local,
    }))
}

struct TpFeedForward {
    id: String,
    sh: Arc<Shared>,
    w: FeedForwardWeights,
}

impl FeedForwardLayer for TpFeedForward {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let part = x
            .linear_geglu(&self.w.proj, self.w.proj_bias.as_ref())
            .and_then(|h| h.linear(&self.w.out, self.w.out_bias.as_ref()))
            .at(id)?;
        all_reduce(&self.sh, id, &part)
    }
}

/// A GEGLU feed-forward with this rank's hidden units (value and gate rows alike).
pub(crate) fn feed_forward(
    sh: Arc<Shared>,
    id: &str,
    w: FeedForwardWeights,
) -> Result<Arc<dyn FeedForwardLayer>> {
    let (n, me) = (sh.group.size(), sh.group.rank());
    let hidden = w.proj.shape()[0] / 2;
    if hidden < n {
        return Err(too_few(id, "hidden units", hidden, n));
    }
    let r = share(hidden, n, me);
    let gate = hidden + r.start..hidden + r.end;
    let both = |t: &Tensor| -> Result<Tensor> {
        Tensor::cat(&[&rows(id, t, &r)?, &rows(id, t, &gate)?], 0).at(id)
    };
    let local = FeedForwardWeights {
        proj: both(&w.proj)?,
        proj_bias: w.proj_bias.as_ref().map(both).transpose()?,
        out: cols(id, &w.out, &r)?,
        out_bias: if me == 0 { w.out_bias } else { None },
    };
    Ok(Arc::new(TpFeedForward {
        id: id.to_string(),
        sh,
        w: local,
    }))
}

/// Tensor parallelism's split of a block's middle channels (see [`ChannelSplit`]): this rank's
/// share of the channels, a group norm whose statistics are all-reduced, and the all-reduce of
/// the partial outputs.
struct TpSplit {
    id: String,
    sh: Arc<Shared>,
    /// This rank's middle channels, the channels per group and the groups of the whole block.
    ch: Range<usize>,
    per_group: usize,
    total_groups: usize,
}

impl ChannelSplit for TpSplit {
    fn share(&self) -> Range<usize> {
        self.ch.clone()
    }

    fn adds_bias(&self) -> bool {
        self.sh.group.rank() == 0
    }

    fn group_norm(
        &self,
        id: &str,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        Ok(Arc::new(TpGroupNorm {
            id: id.to_string(),
            sh: self.sh.clone(),
            ch: self.ch.clone(),
            per_group: self.per_group,
            total_groups: self.total_groups,
            eps,
            gamma,
            beta,
        }))
    }

    fn reduce(&self, _ctx: &StepCtx, partial: &Tensor) -> Result<Tensor> {
        all_reduce(&self.sh, &self.id, partial)
    }
}

/// Group norm of this rank's share of the channels with statistics over all ranks' channels.
struct TpGroupNorm {
    id: String,
    sh: Arc<Shared>,
    ch: Range<usize>,
    per_group: usize,
    total_groups: usize,
    eps: f64,
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
}

impl GroupNormLayer for TpGroupNorm {
    /// Per (batch, group) sums and sums of squares of the own channels, all-reduced.
    fn forward(&self, _ctx: &StepCtx, h: &Tensor, silu_after: bool) -> Result<Tensor> {
        let id = &self.id;
        let shape = h.shape().to_vec();
        let (b, c, px) = (shape[0], shape[1], shape[2] * shape[3]);
        let g = self.total_groups;
        let data = h.to_vec_f32().at(id)?;
        let mut sums = vec![0f32; b * g * 2];
        for bi in 0..b {
            for ci in 0..c {
                let gi = (self.ch.start + ci) / self.per_group;
                let (mut s1, mut s2) = (0f64, 0f64);
                for &v in &data[(bi * c + ci) * px..(bi * c + ci + 1) * px] {
                    s1 += v as f64;
                    s2 += v as f64 * v as f64;
                }
                sums[(bi * g + gi) * 2] += s1 as f32;
                sums[(bi * g + gi) * 2 + 1] += s2 as f32;
            }
        }
        let stats = Tensor::from_vec(&[b * g * 2], sums).at(id)?;
        let stats = all_reduce(&self.sh, id, &stats)?.to_vec_f32().at(id)?;
        let count = (self.per_group * px) as f64;
        let gamma = self
            .gamma
            .as_ref()
            .map(|t| t.to_vec_f32())
            .transpose()
            .at(id)?;
        let beta = self
            .beta
            .as_ref()
            .map(|t| t.to_vec_f32())
            .transpose()
            .at(id)?;
        let mut out = Vec::with_capacity(data.len());
        for bi in 0..b {
            for ci in 0..c {
                let gi = (self.ch.start + ci) / self.per_group;
                let mean = stats[(bi * g + gi) * 2] as f64 / count;
                let var = (stats[(bi * g + gi) * 2 + 1] as f64 / count - mean * mean).max(0.0);
                let inv = 1.0 / (var + self.eps).sqrt();
                let (ga, be) = (
                    gamma.as_ref().map_or(1.0, |v| v[ci] as f64),
                    beta.as_ref().map_or(0.0, |v| v[ci] as f64),
                );
                for &v in &data[(bi * c + ci) * px..(bi * c + ci + 1) * px] {
                    let y = ((v as f64 - mean) * inv * ga + be) as f32;
                    out.push(if silu_after {
                        y / (1.0 + (-y).exp())
                    } else {
                        y
                    });
                }
            }
        }
        Tensor::from_vec(&shape, out).at(id)
    }
}

/// The split of `channels` middle channels in `groups` groups over the group's ranks.
pub(crate) fn channel_split(
    sh: Arc<Shared>,
    id: &str,
    channels: usize,
    groups: usize,
) -> Result<Arc<dyn ChannelSplit>> {
    let (n, me) = (sh.group.size(), sh.group.rank());
    if channels < n {
        return Err(too_few(id, "channels", channels, n));
    }
    if groups == 0 || channels % groups != 0 {
        return Err(CoreError::Config(format!(
            "layer `{id}`: {channels} channels do not split into {groups} groups"
        )));
    }
    Ok(Arc::new(TpSplit {
        id: id.to_string(),
        sh,
        ch: share(channels, n, me),
        per_group: channels / groups,
        total_groups: groups,
    }))
}

struct TpGather {
    id: String,
    sh: Arc<Shared>,
}

impl GatherLayer for TpGather {
    fn forward(&self, _ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let (id, sh) = (&self.id, &self.sh);
        if sh.grid.groups == 1 {
            return Ok(x.clone());
        }
        // Each group's first rank sends its branch to every rank of the other group.
        let g = sh.grid.group;
        let other = 1 - g;
        let members: Vec<usize> = (0..sh.topo.grids.len())
            .filter(|&r| sh.topo.grids[r].group == other)
            .collect();
        let leader = members[0];
        let own = x.to_bytes().at(id)?;
        let sends = if sh.grid.patch() == 0 {
            members.iter().map(|&r| (r, own.clone())).collect()
        } else {
            Vec::new()
        };
        let got = sh.wait(
            id,
            sh.post(
                id,
                CommKind::Gather,
                BRANCH_TAG,
                sends,
                vec![(leader, own.len())],
                true,
            )?,
        )?;
        let theirs = Tensor::from_bytes(x.shape(), x.dtype(), &got[0]).at(id)?;
        let (u, c) = if g == 0 { (x, &theirs) } else { (&theirs, x) };
        Tensor::cat(&[u, c], 0).at(id)
    }
}

/// The gather of tensor parallelism: identity without CFG split; with it, every rank gets the
/// other branch from that group's first rank.
pub(crate) fn gather(sh: Arc<Shared>, id: &str) -> Arc<dyn GatherLayer> {
    Arc::new(TpGather {
        id: id.to_string(),
        sh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (m, n) in [(10, 3), (7, 7), (1000, 8), (5, 4)] {
            let mut next = 0;
            for r in 0..n {
                let s = share(m, n, r);
                assert_eq!(s.start, next);
                next = s.end;
            }
            assert_eq!(next, m);
            let total: usize = (0..n).map(|r| all_reduce_elems(m, n, r)).sum();
            // Every element is sent n − 1 times in each phase.
            assert_eq!(total, 2 * (n - 1) * m);
        }
    }
}
