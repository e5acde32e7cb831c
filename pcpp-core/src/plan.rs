//! Communication and memory plan without weights (PCPP §3.3–3.4, with the §7 fixes): from a
//! model-independent inventory of the layers that couple rows, the latent geometry and a
//! [`ParallelConfig`], the bytes every rank sends and receives per warm-up and per steady step, by
//! layer kind, and its stale-context memory. The formulas are written out in `docs/parallelism.md`;
//! the runtime's counters must equal them exactly (tested).

use serde::{Deserialize, Serialize};

use crate::geometry::{window_part, BandPlan, HaloPlan};
use crate::grid::ProcessGrid;
use crate::layers::{CoreError, Result};
use crate::report::Traffic;
use crate::schedule::{GnMode, ParallelConfig, ParallelMode, SplitScheme, SyncMode};
use crate::topology::Topology;
use pcpp_comm::CommKind;

/// Bytes of one group-norm statistic on the wire: statistics always travel as f32.
pub const GN_STAT_BYTES: usize = 4;

/// Values per (batch, group) of the group-norm statistics message: mean and centred sum of squares.
pub const GN_STATS_PER_GROUP: usize = 2;

/// What a layer of the inventory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// The input layer (whole latent in, own band of the level-0 grid out; no communication).
    InputConv {
        /// Square kernel size.
        kernel: usize,
        /// Stride (a DiT's patch size; 1 for a UNet).
        #[serde(default = "one")]
        stride: usize,
        /// Zero padding.
        padding: usize,
    },
    /// A convolution that needs rows of other bands (`kernel > 1`).
    Conv {
        /// Square kernel size.
        kernel: usize,
        /// Stride (1 or 2).
        stride: usize,
        /// Zero padding.
        padding: usize,
    },
    /// Group normalisation.
    GroupNorm {
        /// Number of groups.
        groups: usize,
    },
    /// Self-attention over the image tokens.
    SelfAttention {
        /// Number of heads.
        heads: usize,
    },
    /// Attention over q/k/v the model projected ([`crate::ProjectedAttentionLayer`]): the
    /// image tokens' K/V travel like self-attention's; extra (text) tokens never do. Tensor
    /// parallelism runs it whole. `channels` is the token width.
    ProjectedAttention {
        /// Number of heads.
        heads: usize,
    },
    /// Gather of the output bands.
    Gather,
    /// Gather of the output bands to one world rank only (the others receive nothing).
    GatherTo {
        /// The world rank that receives the image.
        root: usize,
    },
    /// A feed-forward (per token; split by tensor parallelism). `channels` is the token width.
    FeedForward,
    /// A block whose middle channels tensor parallelism splits ([`crate::ChannelSplit`]; in
    /// SDXL the core of a ResNet block: conv1, norm2, conv2). Its layers are listed on their own
    /// as well; this entry carries only tensor parallelism's all-reduces. `channels` is its
    /// output channels.
    ChannelSplit {
        /// Groups of its group norm.
        groups: usize,
    },
}

fn one() -> usize {
    1
}

/// One layer that couples rows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Stable path (the weight prefix), the stale-cache key.
    pub id: String,
    /// What it is.
    pub kind: LayerKind,
    /// Input channels (self-attention: the token width).
    pub channels: usize,
    /// Resolution level of its input (0 = the latent's; each level halves the rows).
    pub level: usize,
}

/// Every layer of a model that couples rows, in construction order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// The model family, for display.
    pub model: String,
    /// Number of halvings between the latent and the coarsest level.
    pub levels: usize,
    /// The layers.
    pub layers: Vec<LayerSpec>,
}

impl Inventory {
    /// Ids of the layers that own a stale-cache slot (all but the input conv and the gather), in
    /// the order a patch-parallel factory registers them.
    pub fn slot_ids(&self) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| {
                matches!(
                    l.kind,
                    LayerKind::Conv { .. }
                        | LayerKind::GroupNorm { .. }
                        | LayerKind::SelfAttention { .. }
                        | LayerKind::ProjectedAttention { .. }
                )
            })
            .map(|l| l.id.clone())
            .collect()
    }
}

/// The run a plan is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSetup {
    /// Latent height and width.
    pub height: usize,
    pub width: usize,
    /// Number of ranks.
    pub world_size: usize,
    /// Whether the two CFG branches run on separate halves of the world.
    pub cfg_split: bool,
    /// Model batch on each rank (1 with CFG split, 2 without, times images per prompt).
    pub batch: usize,
    /// Bytes per exchanged activation element (2 for f16 on GPUs, 4 for the f32 CPU twin).
    pub elem_size: usize,
}

/// The plan of one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankPlan {
    /// World rank, CFG group and band index.
    pub world_rank: usize,
    pub group: usize,
    pub patch: usize,
    /// Latent rows of this rank's band.
    pub rows: usize,
    /// Bytes per synchronous (warm-up) step.
    pub warmup: Traffic,
    /// Bytes per stale (steady) step.
    pub steady: Traffic,
    /// Stale context held between steps: what a steady step receives, double-buffered, plus own
    /// group-norm statistics kept for the correction.
    pub cache_bytes: u64,
    /// The largest single band activation that enters a communicating layer.
    pub largest_activation_bytes: u64,
    /// The largest K/V that one self-attention layer attends over in a steady step.
    pub largest_kv_window_bytes: u64,
    /// Bytes of odd steps when they differ from the others (naive patch with the `alternate`
    /// split scheme cuts columns on odd steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub odd_steps: Option<Traffic>,
}

/// The plan of a whole run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The configuration planned for.
    pub mode: ParallelMode,
    #[serde(with = "crate::report::portions_serde")]
    pub portion: Vec<f64>,
    pub gn_mode: GnMode,
    pub warmup_steps: usize,
    #[serde(default)]
    pub sync_mode: SyncMode,
    #[serde(default)]
    pub split_scheme: SplitScheme,
    pub setup: Option<PlanSetup>,
    /// Ranks sharing each CFG branch.
    pub group_sizes: Vec<usize>,
    /// Bytes received per rank per steady step, all kinds, averaged over ranks (the §3.4 figure).
    pub bytes_per_step: f64,
    /// The same for a warm-up step.
    pub bytes_per_warmup_step: f64,
    /// The most any rank receives in a steady step.
    pub max_bytes_per_step: u64,
    /// Per world rank.
    pub ranks: Vec<RankPlan>,
    /// The plan of a one-pass decode that follows the generation (see [`plan_one_pass`]), when
    /// the caller adds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode: Option<Box<Plan>>,
}

/// Bytes of the message a group norm sends to each peer.
pub fn gn_message_bytes(batch: usize, groups: usize) -> usize {
    batch * groups * GN_STATS_PER_GROUP * GN_STAT_BYTES
}

/// Tokens of every band at `level` (rows × width).
pub fn band_tokens(plan: &BandPlan, level: usize) -> Vec<usize> {
    (0..plan.ranks())
        .map(|j| plan.band(level, j).len() * plan.width_at(level))
        .collect()
}

/// `(peer, tokens)` of the K/V this rank (`me`) sends in a steady step: its tokens inside each
/// peer's window.
pub fn kv_sends(tokens: &[usize], me: usize, portion: f64) -> Vec<(usize, std::ops::Range<usize>)> {
    (0..tokens.len())
        .filter(|&j| j != me)
        .map(|j| (j, window_part(tokens, j, me, portion)))
        .filter(|(_, r)| !r.is_empty())
        .collect()
}

/// `(peer, tokens)` of the K/V this rank receives in a steady step: each peer's tokens inside its
/// own window, top to bottom.
pub fn kv_recvs(tokens: &[usize], me: usize, portion: f64) -> Vec<(usize, std::ops::Range<usize>)> {
    (0..tokens.len())
        .filter(|&j| j != me)
        .map(|j| (j, window_part(tokens, me, j, portion)))
        .filter(|(_, r)| !r.is_empty())
        .collect()
}

/// Computes the plan. Errors when a band would be empty or the geometry does not fit.
pub fn plan(inv: &Inventory, setup: &PlanSetup, cfg: &ParallelConfig) -> Result<Plan> {
    cfg.validate()?;
    let topo = Topology::new(
        setup.world_size,
        setup.cfg_split,
        cfg,
        setup.height,
        setup.width,
        inv.levels,
    )?;
    let serial = topo.serial;
    let (group_sizes, plans, grids) = (topo.group_sizes.clone(), &topo.plans, &topo.grids);
    let split = topo.split;
    let cplans = &topo.cplans;
    let (b, e) = (setup.batch as u64, setup.elem_size as u64);
    let communicates = cfg.communicates() && !serial;
    // What a steady step does: exchange stale context (async), everything synchronous (full), or
    // nothing but the gather, reading the frozen warm-up context (none).
    let sync_mode = cfg.sync_mode;
    let stale_gn = cfg.stale_gn_mode();
    let mut ranks = Vec::with_capacity(setup.world_size);
    if cfg.mode == ParallelMode::Tensor && !serial {
        return Ok(finish(
            cfg,
            setup,
            group_sizes,
            tensor_ranks(inv, setup, grids)?,
        ));
    }
    for g in grids {
        let bp = &plans[if serial { 0 } else { g.group }];
        let me = if serial { 0 } else { g.patch() };
        let mut odd_total = Traffic::default();
        let mut rp = RankPlan {
            world_rank: g.world_rank,
            group: g.group,
            patch: me,
            rows: bp.band(0, me).len(),
            ..RankPlan::default()
        };
        for l in &inv.layers {
            if l.level > inv.levels {
                return Err(CoreError::Config(format!(
                    "inventory layer `{}` is at level {} but the model has {} levels",
                    l.id, l.level, inv.levels
                )));
            }
            let wl = bp.width_at(l.level) as u64;
            let c = l.channels as u64;
            let rows_me = bp.band(l.level, me).len() as u64;
            rp.largest_activation_bytes = rp.largest_activation_bytes.max(b * c * rows_me * wl * e);
            let (mut warm, mut steady) = (Traffic::default(), Traffic::default());
            let mut odd = None;
            match l.kind {
                LayerKind::InputConv { .. }
                | LayerKind::FeedForward
                | LayerKind::ChannelSplit { .. } => {}
                LayerKind::Conv {
                    kernel,
                    stride,
                    padding,
                } => {
                    if communicates {
                        let hp = HaloPlan::new(bp, l.level, me, kernel, stride, padding);
                        let row = b * c * wl * e;
                        let sent: u64 = hp.send.iter().map(|(_, r)| r.len() as u64 * row).sum();
                        let recvd: u64 = hp
                            .recv_above
                            .iter()
                            .chain(&hp.recv_below)
                            .map(|&(_, n)| n as u64 * row)
                            .sum();
                        warm.sent.add(CommKind::Halo, sent);
                        warm.recvd.add(CommKind::Halo, recvd);
                        match sync_mode {
                            SyncMode::Async => {
                                steady.sent.add(CommKind::Halo, sent);
                                steady.recvd.add(CommKind::Halo, recvd);
                                rp.cache_bytes += 2 * recvd;
                            }
                            SyncMode::Full => {
                                steady.sent.add(CommKind::Halo, sent);
                                steady.recvd.add(CommKind::Halo, recvd);
                            }
                            SyncMode::None => rp.cache_bytes += recvd,
                        }
                    }
                }
                LayerKind::GroupNorm { groups } => {
                    if communicates {
                        let peers = (bp.ranks() - 1) as u64;
                        let m = gn_message_bytes(setup.batch, groups) as u64;
                        warm.sent.add(CommKind::GroupNorm, peers * m);
                        warm.recvd.add(CommKind::GroupNorm, peers * m);
                        if stale_gn != GnMode::Separate {
                            steady.sent.add(CommKind::GroupNorm, peers * m);
                            steady.recvd.add(CommKind::GroupNorm, peers * m);
                        }
                        if matches!(stale_gn, GnMode::Stale | GnMode::Corrected) {
                            rp.cache_bytes += 2 * (peers * m + m);
                        }
                    }
                }
                LayerKind::SelfAttention { .. } | LayerKind::ProjectedAttention { .. } => {
                    let tokens = band_tokens(bp, l.level);
                    let per_tok = b * 2 * c * e;
                    let own = tokens[me] as u64 * per_tok;
                    if communicates {
                        let others: u64 = tokens
                            .iter()
                            .enumerate()
                            .filter(|&(j, _)| j != me)
                            .map(|(_, &t)| t as u64 * per_tok)
                            .sum();
                        warm.sent
                            .add(CommKind::Attention, (bp.ranks() - 1) as u64 * own);
                        warm.recvd.add(CommKind::Attention, others);
                        let p = cfg.portion_at(l.level);
                        let sent: u64 = kv_sends(&tokens, me, p)
                            .iter()
                            .map(|(_, r)| r.len() as u64 * per_tok)
                            .sum();
                        let recvd: u64 = kv_recvs(&tokens, me, p)
                            .iter()
                            .map(|(_, r)| r.len() as u64 * per_tok)
                            .sum();
                        match sync_mode {
                            SyncMode::Async => {
                                steady.sent.add(CommKind::Attention, sent);
                                steady.recvd.add(CommKind::Attention, recvd);
                                rp.cache_bytes += 2 * recvd;
                                rp.largest_kv_window_bytes =
                                    rp.largest_kv_window_bytes.max(own + recvd);
                            }
                            SyncMode::Full => {
                                steady
                                    .sent
                                    .add(CommKind::Attention, (bp.ranks() - 1) as u64 * own);
                                steady.recvd.add(CommKind::Attention, others);
                                rp.largest_kv_window_bytes =
                                    rp.largest_kv_window_bytes.max(own + others);
                            }
                            SyncMode::None => {
                                rp.cache_bytes += recvd;
                                rp.largest_kv_window_bytes =
                                    rp.largest_kv_window_bytes.max(own + recvd);
                            }
                        }
                    } else {
                        rp.largest_kv_window_bytes = rp.largest_kv_window_bytes.max(own);
                    }
                }
                LayerKind::GatherTo { root } => {
                    if root >= grids.len() {
                        return Err(CoreError::Config(format!(
                            "inventory layer `{}` gathers to rank {root} of a world of {}",
                            l.id,
                            grids.len()
                        )));
                    }
                    if !serial {
                        let line = b * c * wl * e;
                        let rows_of = |r: usize| -> u64 {
                            let gr = &grids[r];
                            plans[gr.group].band(l.level, gr.patch()).len() as u64
                        };
                        let mut t = Traffic::default();
                        if g.world_rank == root {
                            let others: u64 = (0..grids.len())
                                .filter(|&r| r != root)
                                .map(|r| rows_of(r) * line)
                                .sum();
                            t.recvd.add(CommKind::Gather, others);
                        } else {
                            t.sent.add(CommKind::Gather, rows_of(g.world_rank) * line);
                        }
                        warm = warm.plus(&t);
                        steady = steady.plus(&t);
                    }
                }
                LayerKind::Gather => {
                    if !serial {
                        // Bytes of the gather when bands are rows (or columns) of the image.
                        let gather = |cols: bool| -> Traffic {
                            let (plans, line) = if cols {
                                (cplans, b * c * bp.height_at(l.level) as u64 * e)
                            } else {
                                (plans, b * c * wl * e)
                            };
                            let len_of = |r: usize| -> u64 {
                                let gr = &grids[r];
                                plans[gr.group].band(l.level, gr.patch()).len() as u64
                            };
                            let others = grids.len() as u64 - 1;
                            let mut t = Traffic::default();
                            t.sent
                                .add(CommKind::Gather, others * len_of(g.world_rank) * line);
                            t.recvd.add(
                                CommKind::Gather,
                                (0..grids.len())
                                    .filter(|&r| r != g.world_rank)
                                    .map(|r| len_of(r) * line)
                                    .sum(),
                            );
                            t
                        };
                        let first = gather(split == SplitScheme::Cols);
                        warm = warm.plus(&first);
                        steady = steady.plus(&first);
                        if split == SplitScheme::Alternate {
                            odd = Some(gather(true));
                        }
                    }
                }
            }
            odd_total = odd_total.plus(odd.as_ref().unwrap_or(&steady));
            rp.warmup = rp.warmup.plus(&warm);
            rp.steady = rp.steady.plus(&steady);
        }
        if split == SplitScheme::Alternate {
            rp.odd_steps = Some(odd_total);
        }
        ranks.push(rp);
    }
    Ok(finish(cfg, setup, group_sizes, ranks))
}

fn finish(
    cfg: &ParallelConfig,
    setup: &PlanSetup,
    group_sizes: Vec<usize>,
    ranks: Vec<RankPlan>,
) -> Plan {
    let n = ranks.len().max(1) as f64;
    let mean = |f: &dyn Fn(&RankPlan) -> u64| ranks.iter().map(f).sum::<u64>() as f64 / n;
    Plan {
        mode: cfg.mode,
        portion: cfg.portion.clone(),
        gn_mode: cfg.gn_mode,
        warmup_steps: cfg.warmup_steps,
        sync_mode: cfg.sync_mode,
        split_scheme: cfg.split_scheme,
        setup: Some(*setup),
        group_sizes,
        bytes_per_step: mean(&|r| r.steady.recvd.total()),
        bytes_per_warmup_step: mean(&|r| r.warmup.recvd.total()),
        max_bytes_per_step: ranks
            .iter()
            .map(|r| r.steady.recvd.total())
            .max()
            .unwrap_or(0),
        ranks,
        decode: None,
    }
}

/// The plan of a model that runs once per image over the whole world
/// ([`crate::PatchRuntime::one_pass`], [`ParallelConfig::one_pass`]): one band per rank, every
/// exchange synchronous with full context. `setup.height × setup.width` is the inventory's
/// level-0 (finest) grid and `setup.cfg_split` is ignored (the world is one group). The pass is
/// one synchronous step: each rank's bytes are its `warmup` traffic (equal to `steady`).
pub fn plan_one_pass(inv: &Inventory, setup: &PlanSetup) -> Result<Plan> {
    let setup = PlanSetup {
        cfg_split: false,
        ..*setup
    };
    plan(inv, &setup, &ParallelConfig::one_pass())
}

/// Tensor parallelism: every step moves the same bytes. Each self-attention, feed-forward and
/// channel-split block all-reduces its whole output (`b·tokens·C` or `b·C·H·W` values) over the
/// group, and each channel-split block also its group-norm statistics (`2·b·G` f32 values);
/// with CFG split, each group's first rank sends its output to every rank of the other group.
fn tensor_ranks(
    inv: &Inventory,
    setup: &PlanSetup,
    grids: &[ProcessGrid],
) -> Result<Vec<RankPlan>> {
    let (b, e) = (setup.batch as u64, setup.elem_size as u64);
    let mut ranks = Vec::with_capacity(grids.len());
    for g in grids {
        let (n, me) = (g.group_size, g.patch());
        let mut t = Traffic::default();
        let mut largest = 0u64;
        for l in &inv.layers {
            if l.level > inv.levels {
                return Err(CoreError::Config(format!(
                    "inventory layer `{}` is at level {} but the model has {} levels",
                    l.id, l.level, inv.levels
                )));
            }
            let px = ((setup.height >> l.level) * (setup.width >> l.level)) as u64;
            let m = b * l.channels as u64 * px;
            largest = largest.max(m * e);
            match l.kind {
                LayerKind::SelfAttention { .. } | LayerKind::FeedForward => {
                    let v = crate::tensor::all_reduce_elems(m as usize, n, me) as u64 * e;
                    t.sent.add(CommKind::Other, v);
                    t.recvd.add(CommKind::Other, v);
                }
                LayerKind::ChannelSplit { groups } => {
                    // The output, and the norm2 statistics (always f32).
                    let stats = setup.batch * groups * 2;
                    let v = crate::tensor::all_reduce_elems(m as usize, n, me) as u64 * e
                        + crate::tensor::all_reduce_elems(stats, n, me) as u64 * 4;
                    t.sent.add(CommKind::Other, v);
                    t.recvd.add(CommKind::Other, v);
                }
                LayerKind::Gather if g.groups == 2 => {
                    let other = grids.iter().filter(|o| o.group != g.group).count() as u64;
                    if me == 0 {
                        t.sent.add(CommKind::Gather, other * m * e);
                    }
                    t.recvd.add(CommKind::Gather, m * e);
                }
                _ => {}
            }
        }
        ranks.push(RankPlan {
            world_rank: g.world_rank,
            group: g.group,
            patch: me,
            rows: setup.height,
            warmup: t,
            steady: t,
            largest_activation_bytes: largest,
            ..RankPlan::default()
        });
    }
    Ok(ranks)
}

/// Bytes per kind that `rank` moves at step `step` under this plan.
pub fn step_traffic(plan: &Plan, rank: usize, step: usize) -> Traffic {
    let rp = &plan.ranks[rank];
    let sync = plan.sync_mode == SyncMode::Full || step < plan.warmup_steps.max(1);
    match (&rp.odd_steps, step % 2 == 1) {
        (Some(odd), true) => *odd,
        _ if sync => rp.warmup,
        _ => rp.steady,
    }
}

/// Bytes per kind summed over `steps` steps of a generation with this plan for `rank`.
pub fn generation_traffic(plan: &Plan, rank: usize, steps: usize) -> Traffic {
    (0..steps).fold(Traffic::default(), |t, s| {
        t.plus(&step_traffic(plan, rank, s))
    })
}
