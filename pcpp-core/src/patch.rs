//! The patch-parallel runtime (PCPP §1–§4 with the fixes of §7): a [`LayerFactory`] whose layers
//! work on one horizontal band of rows per rank, and the [`StepDriver`] that tells them which
//! steps are synchronous.
//!
//! - input convolution: whole latent in, own band out, no communication (§2.2);
//! - `k×k` convolutions: halo rows point-to-point from the bands that hold them (normally the two
//!   neighbours), zero rows at the image border; fresh in synchronous steps, the previous step's
//!   rows afterwards (§2.2, §7.3); `1×1` convolutions are local;
//! - group norm: f32 statistics (mean and centred sum of squares per group), merged with element
//!   counts so uneven bands are exact, biased variance; modes sync / stale / corrected / separate
//!   (§2.6, §7.10);
//! - self-attention: own K/V fresh; in stale steps only the partial-conditioning window of the
//!   other bands is sent and used, one step old (§2.4, §7.2, §7.5); synchronous steps attend over
//!   all bands' fresh K/V (exact);
//! - output gather: every rank gets every band, CFG branches stacked `[uncond; cond]` (§1.4).
//!
//! With [`ParallelMode::Tensor`] it builds the tensor-parallel layers of [`crate::tensor`] instead.
//!
//! Stale data of step `t` is posted right after it is produced and waited for only when the same
//! layer needs it at step `t + 1` (§7.4), through the double-buffered [`StaleCache`] (§7.1).
//! Bytes are counted per kind when an exchange is posted.
//!
//! Activations may live on a GPU: what is sent is copied to host memory (`Tensor::to_bytes`), what
//! arrives is turned back into tensors on the activation's device, so host-staged transports (MPI,
//! UCX, local, NCCL through host buffers) carry GPU runs unchanged.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use pcpp_comm::{CommError, CommKind, Pending, Transport};
use pcpp_kernels::{Conv2dParams, GroupStats, Tensor};

use crate::cache::{CacheCounters, Entry, Slot, StaleCache};
use crate::geometry::{BandPlan, HaloPlan};
use crate::grid::ProcessGrid;
use crate::layers::{
    composed_resnet_core, whole_feed_forward, AttentionWeights, Conv2dLayer, CoreError,
    FeedForwardLayer, FeedForwardWeights, GatherLayer, GroupNormLayer, LayerContext, LayerFactory,
    ResnetCoreLayer, ResnetCoreWeights, Result, SelfAttentionLayer, SerialFactory, StepCtx,
    StepDriver,
};
use crate::plan::{band_tokens, kv_recvs, kv_sends, GN_STATS_PER_GROUP, GN_STAT_BYTES};
use crate::report::{ByteCounters, RunReport, StepReport, Traffic};
use crate::schedule::{GnMode, ParallelConfig, ParallelMode, SplitScheme, SyncMode};

/// Tag of the output gather on the world transport.
const GATHER_TAG: u32 = 0;

struct OpenStep {
    step: usize,
    sync: bool,
    start: Instant,
    traffic: Traffic,
    cache: CacheCounters,
}

#[derive(Default)]
struct ReportState {
    open: Option<OpenStep>,
    steps: Vec<StepReport>,
    ages: (u64, u64),
}

/// State shared by the runtime and every layer it built.
pub(crate) struct Shared {
    world: Arc<dyn Transport>,
    pub(crate) group: Arc<dyn Transport>,
    pub(crate) grid: ProcessGrid,
    pub(crate) grids: Vec<ProcessGrid>,
    cfg: ParallelConfig,
    plans: Vec<BandPlan>,
    /// Column bands (a band plan of the transposed image), for naive patch cutting columns.
    cplans: Vec<BandPlan>,
    serial: bool,
    cache: StaleCache,
    bytes: ByteCounters,
    report: Mutex<ReportState>,
}

impl Shared {
    fn plan(&self) -> &BandPlan {
        &self.plans[if self.serial { 0 } else { self.grid.group }]
    }

    /// Whether step `ctx` cuts columns (naive patch with `cols` or `alternate`).
    fn cols(&self, ctx: &StepCtx) -> bool {
        !self.serial
            && self.cfg.mode == ParallelMode::NaivePatch
            && self.cfg.split_scheme.cols_at(ctx.step)
    }

    /// The column-band plan of this rank's group.
    fn cplan(&self, id: &str) -> Result<&BandPlan> {
        self.cplans.get(self.grid.group).ok_or_else(|| {
            CoreError::Config(format!(
                "layer `{id}`: no column bands (split scheme {})",
                self.cfg.split_scheme
            ))
        })
    }

    /// The level of a `rows × cols` band in step `ctx`, rows or columns as the step cuts.
    fn level_at(&self, ctx: &StepCtx, id: &str, rows: usize, cols: usize) -> Result<usize> {
        if !self.cols(ctx) {
            return self.level(id, rows, cols);
        }
        let plan = self.cplan(id)?;
        plan.level_of(self.me(), cols)
            .filter(|&l| plan.width_at(l) == rows)
            .ok_or_else(|| {
                CoreError::Config(format!(
                    "layer `{id}`, rank {}: a band of {rows}×{cols} is not on this rank's column plan (latent {}×{} cut into {} column bands)",
                    self.grid.world_rank,
                    plan.width,
                    plan.height,
                    plan.ranks()
                ))
            })
    }

    fn me(&self) -> usize {
        if self.serial {
            0
        } else {
            self.grid.patch()
        }
    }

    fn communicates(&self) -> bool {
        !self.serial && self.cfg.communicates()
    }

    fn next_is_stale(&self, step: usize) -> bool {
        !self.cfg.is_sync(step + 1)
    }

    fn comm_err(&self, id: &str, e: CommError) -> CoreError {
        CoreError::Comm {
            rank: self.grid.world_rank,
            layer: id.to_string(),
            msg: e.to_string(),
        }
    }

    /// The level at which this rank's band has `rows` rows and the image `cols` columns.
    fn level(&self, id: &str, rows: usize, cols: usize) -> Result<usize> {
        let plan = self.plan();
        plan.level_of(self.me(), rows)
            .filter(|&l| plan.width_at(l) == cols)
            .ok_or_else(|| {
                CoreError::Config(format!(
                    "layer `{id}`, rank {}: a band of {rows}×{cols} is not on this rank's band plan (latent {}×{} cut into {} bands, {} levels); was the runtime built for this image size?",
                    self.grid.world_rank,
                    plan.height,
                    plan.width,
                    plan.ranks(),
                    plan.levels
                ))
            })
    }

    /// Whether layers are tensor parallel.
    fn tensor(&self) -> bool {
        !self.serial && self.cfg.mode == ParallelMode::Tensor
    }

    /// Posts an exchange on the group (or world) transport and counts its bytes.
    pub(crate) fn post(
        &self,
        id: &str,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
        on_world: bool,
    ) -> Result<Pending> {
        if sends.is_empty() && recvs.is_empty() {
            return Ok(Pending::ready(Ok(Vec::new())));
        }
        let sent: usize = sends.iter().map(|s| s.1.len()).sum();
        let recvd: usize = recvs.iter().map(|r| r.1).sum();
        self.bytes.record(kind, sent as u64, recvd as u64);
        let t = if on_world { &self.world } else { &self.group };
        t.exchange(kind, tag, sends, recvs)
            .map_err(|e| self.comm_err(id, e))
    }

    pub(crate) fn wait(&self, id: &str, p: Pending) -> Result<Vec<Vec<u8>>> {
        p.wait().map_err(|e| self.comm_err(id, e))
    }

    /// Synchronous exchange; stores what arrived (and `local`) for a stale step that follows.
    #[allow(clippy::too_many_arguments)]
    fn sync_exchange(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
        keep: impl FnOnce(&[Vec<u8>]) -> Result<Option<(Vec<Vec<u8>>, Vec<u8>)>>,
    ) -> Result<Vec<Vec<u8>>> {
        let got = self.wait(
            id,
            self.post(id, slot.kind, slot.index, sends, recvs, false)?,
        )?;
        if self.next_is_stale(ctx.step) {
            if let Some((recvd, local)) = keep(&got)? {
                self.cache.publish(slot, ctx.step, || {
                    Ok(Entry::Ready {
                        step: ctx.step,
                        recvd,
                        local,
                    })
                })?;
            }
        }
        Ok(got)
    }

    /// Posts this step's exchange for the next step, then returns what the previous step posted
    /// (waiting for it if it is still in flight), and the local part stored with it.
    fn stale_exchange(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<(usize, Vec<u8>)>,
        recvs: Vec<(usize, usize)>,
        local: Vec<u8>,
    ) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
        if self.cfg.sync_mode == SyncMode::None {
            // No exchange after the warm-up: the last warm-up step's context, frozen.
            return self
                .cache
                .read_frozen(slot, self.cfg.last_warmup_step(), ctx.step);
        }
        let pending = self.post(id, slot.kind, slot.index, sends, recvs, false)?;
        self.cache.publish(slot, ctx.step, || {
            Ok(Entry::InFlight {
                step: ctx.step,
                pending,
                local,
            })
        })?;
        self.cache
            .read_previous(slot, ctx.step, self.grid.world_rank)
    }

    fn peers(&self) -> Vec<usize> {
        let me = self.me();
        (0..self.plan().ranks()).filter(|&j| j != me).collect()
    }

    fn open_step(&self, ctx: StepCtx) {
        let Ok(mut r) = self.report.lock() else {
            return;
        };
        if r.open.as_ref().is_some_and(|o| o.step == ctx.step) {
            return;
        }
        self.close_step(&mut r);
        r.open = Some(OpenStep {
            step: ctx.step,
            sync: ctx.sync,
            start: Instant::now(),
            traffic: self.bytes.snapshot(),
            cache: self.cache.counters(),
        });
    }

    fn close_step(&self, r: &mut ReportState) {
        if let Some(o) = r.open.take() {
            let now = self.bytes.snapshot();
            let c = self.cache.counters();
            r.steps.push(StepReport {
                step: o.step,
                sync: o.sync,
                seconds: o.start.elapsed().as_secs_f64(),
                traffic: Traffic {
                    sent: now.sent.since(&o.traffic.sent),
                    recvd: now.recvd.since(&o.traffic.recvd),
                },
                stale_reads: c.reads - o.cache.reads,
                waits: c.waits - o.cache.waits,
                wait_seconds: (c.wait - o.cache.wait).as_secs_f64(),
            });
            if c.reads > 0 {
                r.ages = (c.min_age, c.max_age);
            }
        }
    }
}

/// Column bands for groups of `group_sizes` ranks: the band plans of the transposed latent.
pub(crate) fn column_plans(
    group_sizes: &[usize],
    height: usize,
    width: usize,
    levels: usize,
) -> Result<Vec<BandPlan>> {
    group_sizes
        .iter()
        .map(|&n| {
            BandPlan::new(width, height, levels, n)
                .map_err(|e| CoreError::Config(format!("cutting columns (transposed latent): {e}")))
        })
        .collect()
}

fn dims4(id: &str, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match x.shape() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        s => Err(CoreError::Config(format!(
            "layer `{id}`: expected a [b, c, rows, w] band, got {s:?}"
        ))),
    }
}

/// A tensor of `shape` from received bytes, in `like`'s dtype and on `like`'s device: bytes that
/// came through host memory go back to the GPU the activations live on (a no-op copy-free path on
/// the CPU).
fn tensor_from(id: &str, shape: &[usize], like: &Tensor, bytes: &[u8]) -> Result<Tensor> {
    Tensor::from_bytes(shape, like.dtype(), bytes)
        .and_then(|t| t.to_device(like.device()))
        .at(id)
}

/// Zero rows (image-border padding) in `like`'s dtype, on `like`'s device.
fn zeros_like(id: &str, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::zeros(shape, like.dtype())
        .to_device(like.device())
        .at(id)
}

/// The patch-parallel runtime of one rank: the layer factory, the step driver, the stale cache and
/// the byte counters. Build one per rank (collectively: it splits the world into CFG groups), build
/// the model through it (`&runtime` is a [`LayerFactory`]) and drive the denoising loop through it
/// (`&runtime` is a [`StepDriver`]).
///
/// With one rank, or [`ParallelMode::Serial`], it behaves exactly like [`SerialFactory`] and
/// [`crate::SerialDriver`].
pub struct PatchRuntime {
    sh: Arc<Shared>,
}

impl PatchRuntime {
    /// The runtime of rank `world.rank()` for a `height × width` latent that the model halves
    /// `levels` times. Collective over `world` (it splits it into CFG groups when `cfg_split`).
    /// Errors if a band would be empty or the configuration is invalid.
    pub fn new(
        world: Arc<dyn Transport>,
        cfg_split: bool,
        cfg: ParallelConfig,
        height: usize,
        width: usize,
        levels: usize,
    ) -> Result<PatchRuntime> {
        cfg.validate()?;
        let size = world.size();
        let serial = size <= 1 || cfg.mode == ParallelMode::Serial;
        let split = cfg_split && !serial;
        let grid = ProcessGrid::new(world.rank(), size, split)?;
        let grids = (0..size)
            .map(|r| ProcessGrid::new(r, size, split))
            .collect::<Result<Vec<_>>>()?;
        let group_sizes = if serial {
            vec![1]
        } else {
            ProcessGrid::group_sizes(size, grid.groups)
        };
        // Tensor parallelism keeps the whole image on every rank: one band.
        let tensor = cfg.mode == ParallelMode::Tensor;
        let plans = group_sizes
            .iter()
            .map(|&n| BandPlan::new(height, width, levels, if tensor { 1 } else { n }))
            .collect::<Result<Vec<_>>>()?;
        let cplans = if !serial
            && cfg.mode == ParallelMode::NaivePatch
            && cfg.split_scheme != SplitScheme::Rows
        {
            column_plans(&group_sizes, height, width, levels)?
        } else {
            Vec::new()
        };
        let group = if serial {
            world.clone()
        } else {
            let g = world
                .split(grid.group as u32, grid.patch() as u32)
                .map_err(|e| CoreError::Comm {
                    rank: grid.world_rank,
                    layer: "process grid".into(),
                    msg: e.to_string(),
                })?;
            if g.rank() != grid.patch() || g.size() != grid.group_size {
                return Err(CoreError::Config(format!(
                    "rank {}: CFG group transport has rank {} of {}, expected {} of {}",
                    grid.world_rank,
                    g.rank(),
                    g.size(),
                    grid.patch(),
                    grid.group_size
                )));
            }
            g
        };
        Ok(PatchRuntime {
            sh: Arc::new(Shared {
                world,
                group,
                grid,
                grids,
                cfg,
                plans,
                cplans,
                serial,
                cache: StaleCache::new(),
                bytes: ByteCounters::default(),
                report: Mutex::new(ReportState::default()),
            }),
        })
    }

    /// The layer factory to build the model through.
    pub fn factory(&self) -> &dyn LayerFactory {
        self
    }

    /// The step driver for the denoising loop.
    pub fn driver(&self) -> &dyn StepDriver {
        self
    }

    /// Where this rank sits.
    pub fn grid(&self) -> ProcessGrid {
        self.sh.grid
    }

    /// The configuration.
    pub fn config(&self) -> &ParallelConfig {
        &self.sh.cfg
    }

    /// Whether layers are plain serial ones (one rank, or serial mode).
    pub fn is_serial(&self) -> bool {
        self.sh.serial
    }

    /// The band plan of this rank's CFG group.
    pub fn band_plan(&self) -> &BandPlan {
        self.sh.plan()
    }

    /// The transport of this rank's CFG group (the world when there is no split).
    pub fn group_transport(&self) -> &Arc<dyn Transport> {
        &self.sh.group
    }

    /// The world transport (output gather).
    pub fn world_transport(&self) -> &Arc<dyn Transport> {
        &self.sh.world
    }

    /// Ids of the registered stale-cache slots, in registration order.
    pub fn slot_ids(&self) -> Vec<String> {
        self.sh.cache.ids()
    }

    /// Stale-cache counters since the generation began.
    pub fn cache_counters(&self) -> CacheCounters {
        self.sh.cache.counters()
    }

    /// Bytes posted since the runtime was built, per kind.
    pub fn traffic(&self) -> Traffic {
        self.sh.bytes.snapshot()
    }

    /// The report of the current (or last) generation.
    pub fn report(&self) -> RunReport {
        let sh = &self.sh;
        let (steps, ages) = match sh.report.lock() {
            Ok(r) => (r.steps.clone(), r.ages),
            Err(_) => (Vec::new(), (0, 0)),
        };
        let total = steps
            .iter()
            .fold(Traffic::default(), |a, s| a.plus(&s.traffic));
        RunReport {
            world_rank: sh.grid.world_rank,
            world_size: sh.grid.world_size,
            group: sh.grid.group,
            group_size: if sh.serial { 1 } else { sh.grid.group_size },
            patch: sh.me(),
            mode: sh.cfg.mode,
            portion: sh.cfg.portion.clone(),
            gn_mode: sh.cfg.gn_mode,
            warmup_steps: sh.cfg.warmup_steps,
            sync_mode: sh.cfg.sync_mode,
            split_scheme: sh.cfg.split_scheme,
            steps,
            total,
            min_stale_age: ages.0,
            max_stale_age: ages.1,
        }
    }

    fn register(&self, id: &str, kind: CommKind) -> Result<Arc<Slot>> {
        self.sh.cache.register(id, kind)
    }
}

impl StepDriver for PatchRuntime {
    fn cfg_branch(&self) -> Option<usize> {
        (!self.sh.serial && self.sh.grid.groups == 2).then_some(self.sh.grid.group)
    }

    fn step_ctx(&self, step: usize) -> StepCtx {
        let ctx = if self.sh.serial {
            StepCtx { step, sync: true }
        } else {
            self.sh.cfg.ctx(step)
        };
        self.sh.open_step(ctx);
        ctx
    }

    fn begin_generation(&self) -> Result<()> {
        self.sh.cache.clear()?;
        if let Ok(mut r) = self.sh.report.lock() {
            *r = ReportState::default();
        }
        Ok(())
    }

    fn end_generation(&self) -> Result<()> {
        if let Ok(mut r) = self.sh.report.lock() {
            self.sh.close_step(&mut r);
        }
        self.sh.cache.clear()
    }
}

// ---------------------------------------------------------------------------------------------
// Layers.

struct InputConv {
    id: String,
    sh: Arc<Shared>,
    weight: Tensor,
    bias: Option<Tensor>,
    pad: usize,
}

impl Conv2dLayer for InputConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = dims4(&self.id, x)?;
        let plan = self.sh.plan();
        if h != plan.height || w != plan.width {
            return Err(CoreError::Config(format!(
                "layer `{}`: latent is {h}×{w} but the patch-parallel runtime was built for {}×{}",
                self.id, plan.height, plan.width
            )));
        }
        let band = plan.band(0, self.sh.me());
        let k = self.weight.shape()[2];
        let p = self.pad;
        if self.sh.cols(ctx) {
            // Naive patch cutting columns: the column band alone, zero-padded.
            let cb = self.sh.cplan(&self.id)?.band(0, self.sh.me());
            let xs = x.narrow(3, cb.start, cb.len()).at(&self.id)?;
            return xs
                .conv2d(&self.weight, self.bias.as_ref(), Conv2dParams::new(1, p))
                .at(&self.id);
        }
        if !self.sh.communicates() {
            // Naive patch parallelism: the band alone, zero-padded like a separate image.
            let xs = x.narrow(2, band.start, band.len()).at(&self.id)?;
            return xs
                .conv2d(&self.weight, self.bias.as_ref(), Conv2dParams::new(1, p))
                .at(&self.id);
        }
        // Input rows that the band's outputs read, clamped to the image; zeros outside it.
        let lo = band.start as isize - p as isize;
        let hi = (band.end + k) as isize - p as isize - 1;
        let (s0, s1) = (lo.max(0) as usize, (hi.min(h as isize)).max(0) as usize);
        let xs = x.narrow(2, s0, s1 - s0).at(&self.id)?;
        let params = Conv2dParams {
            stride: 1,
            pad_top: (-lo).max(0) as usize,
            pad_bottom: (hi - h as isize).max(0) as usize,
            pad_left: p,
            pad_right: p,
        };
        xs.conv2d(&self.weight, self.bias.as_ref(), params)
            .at(&self.id)
    }
}

struct HaloConv {
    id: String,
    sh: Arc<Shared>,
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    pad: usize,
    slot: Option<Arc<Slot>>,
}

impl Conv2dLayer for HaloConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (b, c, rows, w) = dims4(id, x)?;
        let k = self.weight.shape()[2];
        if sh.cols(ctx) {
            // Naive patch cutting columns: zero columns where other bands would be.
            let level = sh.level_at(ctx, id, rows, w)?;
            let hp = HaloPlan::new(sh.cplan(id)?, level, sh.me(), k, self.stride, self.pad);
            let left: usize = hp.recv_above.iter().map(|r| r.1).sum();
            let right: usize = hp.recv_below.iter().map(|r| r.1).sum();
            let params = Conv2dParams {
                stride: self.stride,
                pad_top: self.pad,
                pad_bottom: self.pad,
                pad_left: hp.pad_top + left,
                pad_right: hp.pad_bottom + right,
            };
            return x.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        let level = sh.level(id, rows, w)?;
        let hp = HaloPlan::new(sh.plan(), level, sh.me(), k, self.stride, self.pad);
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
                return x.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
            }
        };
        let row = b * c * w * x.dtype().size();
        let sends = hp
            .send
            .iter()
            .map(|(p, r)| {
                let part = x.narrow(2, r.start, r.len()).at(id)?;
                Ok((*p, part.to_bytes().at(id)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let recv_rows: Vec<(usize, usize)> = hp
            .recv_above
            .iter()
            .chain(&hp.recv_below)
            .copied()
            .collect();
        let recvs = recv_rows.iter().map(|&(p, n)| (p, n * row)).collect();
        let got = if ctx.sync {
            sh.sync_exchange(id, slot, ctx, sends, recvs, |g| {
                Ok(Some((g.to_vec(), Vec::new())))
            })?
        } else {
            sh.stale_exchange(id, slot, ctx, sends, recvs, Vec::new())?
                .0
        };
        if got.len() != recv_rows.len() {
            return Err(CoreError::Config(format!(
                "layer `{id}`: {} halo parts stored, {} expected",
                got.len(),
                recv_rows.len()
            )));
        }
        let mut parts = Vec::with_capacity(got.len() + 3);
        if hp.pad_top > 0 {
            parts.push(zeros_like(id, &[b, c, hp.pad_top, w], x)?);
        }
        let n_above = hp.recv_above.len();
        for (&(_, n), bytes) in recv_rows.iter().zip(&got).take(n_above) {
            parts.push(tensor_from(id, &[b, c, n, w], x, bytes)?);
        }
        parts.push(x.clone());
        for (&(_, n), bytes) in recv_rows.iter().zip(&got).skip(n_above) {
            parts.push(tensor_from(id, &[b, c, n, w], x, bytes)?);
        }
        if hp.pad_bottom > 0 {
            parts.push(zeros_like(id, &[b, c, hp.pad_bottom, w], x)?);
        }
        let refs: Vec<&Tensor> = parts.iter().collect();
        let xin = Tensor::cat(&refs, 2).at(id)?;
        let params = Conv2dParams {
            stride: self.stride,
            pad_top: 0,
            pad_bottom: 0,
            pad_left: self.pad,
            pad_right: self.pad,
        };
        xin.conv2d(&self.weight, self.bias.as_ref(), params).at(id)
    }
}

/// Count, mean and centred sum of squares of one (batch, group).
#[derive(Debug, Clone, Copy, Default)]
struct Moments {
    n: f64,
    mean: f64,
    m2: f64,
}

impl Moments {
    fn from_sums(s: &[f64; 3]) -> Moments {
        let n = s[2];
        let mean = if n > 0.0 { s[0] / n } else { 0.0 };
        Moments {
            n,
            mean,
            m2: (s[1] - s[0] * mean).max(0.0),
        }
    }

    /// Chan et al.'s pairwise merge (no cancellation).
    fn merge(self, o: Moments) -> Moments {
        let n = self.n + o.n;
        if n == 0.0 {
            return self;
        }
        let d = o.mean - self.mean;
        Moments {
            n,
            mean: self.mean + d * o.n / n,
            m2: self.m2 + o.m2 + d * d * self.n * o.n / n,
        }
    }

    /// The f32 round trip of the wire format.
    fn rounded(self) -> Moments {
        Moments {
            n: self.n,
            mean: self.mean as f32 as f64,
            m2: self.m2 as f32 as f64,
        }
    }

    fn var(&self) -> f64 {
        if self.n > 0.0 {
            self.m2 / self.n
        } else {
            0.0
        }
    }

    /// `E[x²]`.
    fn ex2(&self) -> f64 {
        self.var() + self.mean * self.mean
    }
}

fn encode_moments(m: &[Moments]) -> Vec<u8> {
    m.iter()
        .flat_map(|m| [m.mean as f32, m.m2 as f32])
        .flat_map(f32::to_le_bytes)
        .collect()
}

fn decode_moments(id: &str, bytes: &[u8], n: f64, count: usize) -> Result<Vec<Moments>> {
    let per = GN_STATS_PER_GROUP * GN_STAT_BYTES;
    if bytes.len() != count * per {
        return Err(CoreError::Config(format!(
            "layer `{id}`: group-norm statistics of {} bytes, expected {}",
            bytes.len(),
            count * per
        )));
    }
    Ok(bytes
        .chunks_exact(per)
        .map(|c| Moments {
            n,
            mean: f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64,
            m2: f32::from_le_bytes([c[4], c[5], c[6], c[7]]) as f64,
        })
        .collect())
}

/// Statistics that make `group_norm_with_stats` use exactly `mean` and `var` per (batch, group).
fn stats_from(batch: usize, groups: usize, mv: &[(f64, f64)]) -> GroupStats {
    GroupStats {
        batch,
        groups,
        sums: mv
            .iter()
            .map(|&(mean, var)| [mean, var + mean * mean, 1.0])
            .collect(),
    }
}

struct PatchGroupNorm {
    id: String,
    sh: Arc<Shared>,
    groups: usize,
    eps: f64,
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
    slot: Option<Arc<Slot>>,
}

impl GroupNormLayer for PatchGroupNorm {
    fn forward(&self, ctx: &StepCtx, x: &Tensor, silu_after: bool) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (b, c, rows, w) = dims4(id, x)?;
        let level = sh.level_at(ctx, id, rows, w)?;
        let g = self.groups;
        let local = x.group_stats(g).at(id)?;
        let mode = sh.cfg.stale_gn_mode();
        let apply = |s: &GroupStats| {
            x.group_norm_with_stats(
                s,
                self.gamma.as_ref(),
                self.beta.as_ref(),
                self.eps,
                silu_after,
            )
            .at(id)
        };
        let slot = match (&self.slot, sh.communicates()) {
            (Some(s), true) if ctx.sync || mode != GnMode::Separate => s,
            _ => return apply(&local),
        };
        let plan = sh.plan();
        let me = sh.me();
        let count =
            |j: usize| ((c / g.max(1)) * plan.band(level, j).len() * plan.width_at(level)) as f64;
        let own: Vec<Moments> = local.sums.iter().map(Moments::from_sums).collect();
        let payload = encode_moments(&own);
        let peers = sh.peers();
        let sends = peers.iter().map(|&p| (p, payload.clone())).collect();
        let recvs = peers.iter().map(|&p| (p, payload.len())).collect();
        let decode_peers = |got: &[Vec<u8>]| -> Result<Vec<(usize, Vec<Moments>)>> {
            if got.len() != peers.len() {
                return Err(CoreError::Config(format!(
                    "layer `{id}`: statistics of {} peers, expected {}",
                    got.len(),
                    peers.len()
                )));
            }
            peers
                .iter()
                .zip(got)
                .map(|(&j, bytes)| Ok((j, decode_moments(id, bytes, count(j), own.len())?)))
                .collect()
        };
        let mv: Vec<(f64, f64)> = if ctx.sync || mode == GnMode::Sync {
            let keep_local = payload.clone();
            let got = sh.sync_exchange(id, slot, ctx, sends, recvs, |got| {
                Ok(matches!(mode, GnMode::Stale | GnMode::Corrected)
                    .then(|| (got.to_vec(), keep_local)))
            })?;
            let others = decode_peers(&got)?;
            // Merge all bands in rank order (own statistics rounded as the peers see them), so
            // every rank gets the same numbers.
            (0..own.len())
                .map(|i| {
                    let mut acc = Moments::default();
                    let mut it = others.iter().peekable();
                    for j in 0..plan.ranks() {
                        let m = if j == me {
                            own[i].rounded()
                        } else {
                            match it.next() {
                                Some((_, ms)) => ms[i],
                                None => Moments::default(),
                            }
                        };
                        acc = acc.merge(m);
                    }
                    (acc.mean, acc.var())
                })
                .collect()
        } else {
            let (prev, own_prev) =
                sh.stale_exchange(id, slot, ctx, sends, recvs, payload.clone())?;
            let others = decode_peers(&prev)?;
            match mode {
                GnMode::Stale => (0..own.len())
                    .map(|i| {
                        let acc = others.iter().fold(own[i], |a, (_, ms)| a.merge(ms[i]));
                        (acc.mean, acc.var())
                    })
                    .collect(),
                _ => {
                    // Corrected: the previous step's global moments plus the change of own
                    // moments (PCPP §2.6), with the local variance where the estimate is negative.
                    let own_prev = decode_moments(id, &own_prev, count(me), own.len())?;
                    (0..own.len())
                        .map(|i| {
                            let total =
                                others.iter().fold(own_prev[i], |a, (_, ms)| a.merge(ms[i]));
                            let m1 = total.mean + (own[i].mean - own_prev[i].mean);
                            let m2 = total.ex2() + (own[i].ex2() - own_prev[i].ex2());
                            let var = m2 - m1 * m1;
                            (m1, if var < 0.0 { own[i].var() } else { var })
                        })
                        .collect()
                }
            }
        };
        apply(&stats_from(b, g, &mv))
    }
}

struct PatchAttention {
    id: String,
    sh: Arc<Shared>,
    w: AttentionWeights,
    slot: Option<Arc<Slot>>,
}

impl SelfAttentionLayer for PatchAttention {
    fn forward(&self, ctx: &StepCtx, x: &Tensor, spatial: (usize, usize)) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (rows, cols) = spatial;
        let level = sh.level_at(ctx, id, rows, cols)?;
        let (q, k, v) = self.w.qkv(x).at(id)?;
        let slot = match (&self.slot, sh.communicates()) {
            (Some(s), true) => s,
            _ => return self.w.attend(&q, &k, &v).at(id),
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
                "layer `{id}`: {l} tokens but the band has {rows}×{cols}"
            )));
        }
        let kv = Tensor::cat(&[&k, &v], 2).at(id)?;
        let per_tok = b * 2 * c * x.dtype().size();
        let portion = sh.cfg.portion_at(level);
        // Other bands' K/V, top to bottom, with the band they come from.
        let mut others: Vec<(usize, Tensor)> = Vec::new();
        if ctx.sync {
            // Exact: every band's fresh K/V.
            let bytes = kv.to_bytes().at(id)?;
            let peers = sh.peers();
            let sends = peers.iter().map(|&p| (p, bytes.clone())).collect();
            let recvs = peers.iter().map(|&p| (p, tokens[p] * per_tok)).collect();
            let keep = kv_recvs(&tokens, me, portion);
            let got = sh.sync_exchange(id, slot, ctx, sends, recvs, |got| {
                let mut out = Vec::with_capacity(keep.len());
                for (j, r) in &keep {
                    let i = peers.iter().position(|p| p == j).ok_or_else(|| {
                        CoreError::Config(format!("layer `{id}`: no K/V from band {j}"))
                    })?;
                    // Cut on the host: the kept window goes straight back into host memory.
                    let t =
                        Tensor::from_bytes(&[b, tokens[*j], 2 * c], x.dtype(), &got[i]).at(id)?;
                    out.push(t.narrow(1, r.start, r.len()).at(id)?.to_bytes().at(id)?);
                }
                Ok(Some((out, Vec::new())))
            })?;
            for (&j, bytes) in peers.iter().zip(&got) {
                others.push((j, tensor_from(id, &[b, tokens[j], 2 * c], x, bytes)?));
            }
        } else {
            let sends = kv_sends(&tokens, me, portion)
                .into_iter()
                .map(|(j, r)| {
                    let part = kv.narrow(1, r.start, r.len()).at(id)?;
                    Ok((j, part.to_bytes().at(id)?))
                })
                .collect::<Result<Vec<_>>>()?;
            let want = kv_recvs(&tokens, me, portion);
            let recvs = want.iter().map(|(j, r)| (*j, r.len() * per_tok)).collect();
            let (got, _) = sh.stale_exchange(id, slot, ctx, sends, recvs, Vec::new())?;
            if got.len() != want.len() {
                return Err(CoreError::Config(format!(
                    "layer `{id}`: {} K/V parts stored, {} expected",
                    got.len(),
                    want.len()
                )));
            }
            for ((j, r), bytes) in want.iter().zip(&got) {
                others.push((*j, tensor_from(id, &[b, r.len(), 2 * c], x, bytes)?));
            }
        }
        let mut parts: Vec<&Tensor> = others.iter().filter(|o| o.0 < me).map(|o| &o.1).collect();
        parts.push(&kv);
        parts.extend(others.iter().filter(|o| o.0 > me).map(|o| &o.1));
        let win = Tensor::cat(&parts, 1).at(id)?;
        let kw = win.narrow(2, 0, c).at(id)?;
        let vw = win.narrow(2, c, c).at(id)?;
        self.w.attend(&q, &kw, &vw).at(id)
    }
}

struct PatchGather {
    id: String,
    sh: Arc<Shared>,
}

impl GatherLayer for PatchGather {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (b, c, rows, w) = dims4(id, x)?;
        let level = sh.level_at(ctx, id, rows, w)?;
        let me = sh.grid.world_rank;
        // Bands are rows (or, for naive patch cutting columns, columns) of the image.
        let cols = sh.cols(ctx);
        let (axis, line) = if cols {
            (3, b * c * rows * x.dtype().size())
        } else {
            (2, b * c * w * x.dtype().size())
        };
        let plans = if cols { &sh.cplans } else { &sh.plans };
        let len_of = |r: usize| {
            let g = &sh.grids[r];
            plans[g.group].band(level, g.patch()).len()
        };
        let shape_of = |r: usize| {
            if cols {
                [b, c, rows, len_of(r)]
            } else {
                [b, c, len_of(r), w]
            }
        };
        let others: Vec<usize> = (0..sh.grids.len()).filter(|&r| r != me).collect();
        let own = x.to_bytes().at(id)?;
        let sends = others.iter().map(|&r| (r, own.clone())).collect();
        let recvs = others.iter().map(|&r| (r, len_of(r) * line)).collect();
        let got = sh.wait(
            id,
            sh.post(id, CommKind::Gather, GATHER_TAG, sends, recvs, true)?,
        )?;
        let mut bands: Vec<Tensor> = Vec::with_capacity(sh.grids.len());
        let mut it = got.iter();
        for r in 0..sh.grids.len() {
            if r == me {
                bands.push(x.clone());
            } else {
                let bytes = it.next().ok_or_else(|| {
                    CoreError::Config(format!("layer `{id}`: band of rank {r} missing"))
                })?;
                bands.push(tensor_from(id, &shape_of(r), x, bytes)?);
            }
        }
        let mut images = Vec::with_capacity(sh.grid.groups);
        for g in 0..sh.grid.groups {
            let members: Vec<&Tensor> = (0..sh.grids.len())
                .filter(|&r| sh.grids[r].group == g)
                .map(|r| &bands[r])
                .collect();
            images.push(Tensor::cat(&members, axis).at(id)?);
        }
        if images.len() == 1 {
            Ok(images.remove(0))
        } else {
            let refs: Vec<&Tensor> = images.iter().collect();
            Tensor::cat(&refs, 0).at(id)
        }
    }
}

impl LayerFactory for PatchRuntime {
    fn conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        let k = weight.shape().get(2).copied().unwrap_or(1);
        if self.sh.serial || self.sh.tensor() || (k == 1 && padding == 0) {
            return SerialFactory.conv2d(id, weight, bias, stride, padding);
        }
        let slot = if self.sh.communicates() {
            Some(self.register(id, CommKind::Halo)?)
        } else {
            None
        };
        Ok(Arc::new(HaloConv {
            id: id.to_string(),
            sh: self.sh.clone(),
            weight,
            bias,
            stride,
            pad: padding,
            slot,
        }))
    }

    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        if self.sh.serial || self.sh.tensor() {
            return SerialFactory.input_conv2d(id, weight, bias, padding);
        }
        Ok(Arc::new(InputConv {
            id: id.to_string(),
            sh: self.sh.clone(),
            weight,
            bias,
            pad: padding,
        }))
    }

    fn group_norm(
        &self,
        id: &str,
        groups: usize,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        if self.sh.serial || self.sh.tensor() {
            return SerialFactory.group_norm(id, groups, eps, gamma, beta);
        }
        let slot = if self.sh.communicates() {
            Some(self.register(id, CommKind::GroupNorm)?)
        } else {
            None
        };
        Ok(Arc::new(PatchGroupNorm {
            id: id.to_string(),
            sh: self.sh.clone(),
            groups,
            eps,
            gamma,
            beta,
            slot,
        }))
    }

    fn self_attention(
        &self,
        id: &str,
        weights: AttentionWeights,
    ) -> Result<Arc<dyn SelfAttentionLayer>> {
        if self.sh.serial {
            return SerialFactory.self_attention(id, weights);
        }
        if self.sh.tensor() {
            return crate::tensor::attention(self.sh.clone(), id, weights);
        }
        let slot = if self.sh.communicates() {
            Some(self.register(id, CommKind::Attention)?)
        } else {
            None
        };
        Ok(Arc::new(PatchAttention {
            id: id.to_string(),
            sh: self.sh.clone(),
            w: weights,
            slot,
        }))
    }

    fn gather(&self, id: &str) -> Result<Arc<dyn GatherLayer>> {
        if self.sh.serial {
            return SerialFactory.gather(id);
        }
        if self.sh.tensor() {
            return Ok(crate::tensor::gather(self.sh.clone(), id));
        }
        Ok(Arc::new(PatchGather {
            id: id.to_string(),
            sh: self.sh.clone(),
        }))
    }

    fn feed_forward(
        &self,
        id: &str,
        weights: FeedForwardWeights,
    ) -> Result<Arc<dyn FeedForwardLayer>> {
        if self.sh.tensor() {
            return crate::tensor::feed_forward(self.sh.clone(), id, weights);
        }
        Ok(whole_feed_forward(id, weights))
    }

    fn resnet_core(&self, id: &str, w: ResnetCoreWeights) -> Result<Arc<dyn ResnetCoreLayer>> {
        if self.sh.tensor() {
            return crate::tensor::resnet_core(self.sh.clone(), id, w);
        }
        composed_resnet_core(self, id, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_merge_equals_the_whole() {
        let x: Vec<f64> = (0..37)
            .map(|i| 100.0 + ((i * 7) % 11) as f64 * 0.37)
            .collect();
        let sums = |v: &[f64]| {
            [
                v.iter().sum(),
                v.iter().map(|a| a * a).sum(),
                v.len() as f64,
            ]
        };
        let whole = Moments::from_sums(&sums(&x));
        let merged = Moments::from_sums(&sums(&x[..10]))
            .merge(Moments::from_sums(&sums(&x[10..29])))
            .merge(Moments::from_sums(&sums(&x[29..])));
        assert!((whole.mean - merged.mean).abs() < 1e-12);
        assert!((whole.var() - merged.var()).abs() < 1e-9 * whole.var());
        let bytes = encode_moments(&[merged]);
        let back = decode_moments("t", &bytes, merged.n, 1).unwrap()[0];
        assert!((back.mean - merged.mean).abs() <= 1e-6 * merged.mean.abs());
    }
}
