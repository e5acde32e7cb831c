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
//! Activations may live on a GPU. Layers exchange tensors through [`crate::exchange`]: with a
//! transport that moves device memory (NCCL) the data stays on the GPU, is sent from and received
//! into device buffers on a communication stream, and stale receives land in persistent
//! per-parity buffers of the slot, so a steady step can be captured as a CUDA graph; otherwise it
//! is staged through host memory (MPI, UCX, local).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[cfg(feature = "cuda")]
use pcpp_comm::DeviceP2p;
use pcpp_comm::{CommError, CommKind, Pending, Transport};
use pcpp_kernels::{Conv2dParams, Device, Tensor};

use crate::cache::{CacheCounters, Entry, Slot, StaleCache};
use crate::exchange::{post_host, Inflight, RecvSpec};
use crate::geometry::{BandPlan, HaloPlan};
use crate::grid::ProcessGrid;
use crate::layers::{
    composed_resnet_core, whole_feed_forward, AttentionWeights, Conv2dLayer, CoreError,
    FeedForwardLayer, FeedForwardWeights, GatherLayer, GroupNormLayer, LayerContext, LayerFactory,
    ResnetCoreLayer, ResnetCoreWeights, Result, SelfAttentionLayer, SerialFactory, StepCtx,
    StepDriver,
};
use crate::plan::{band_tokens, kv_recvs, kv_sends};
use crate::report::{ByteCounters, RunReport, StepReport, Traffic};
use crate::schedule::{GnMode, ParallelConfig, ParallelMode, SplitScheme, SyncMode};

/// Tag of the output gather on the world transport.
pub(crate) const GATHER_TAG: u32 = 0;

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
    pub(crate) world: Arc<dyn Transport>,
    pub(crate) group: Arc<dyn Transport>,
    pub(crate) grid: ProcessGrid,
    pub(crate) grids: Vec<ProcessGrid>,
    pub(crate) cfg: ParallelConfig,
    pub(crate) plans: Vec<BandPlan>,
    /// Column bands (a band plan of the transposed image), for naive patch cutting columns.
    cplans: Vec<BandPlan>,
    pub(crate) serial: bool,
    cache: StaleCache,
    bytes: ByteCounters,
    report: Mutex<ReportState>,
    /// Communication-stream state of the device path.
    #[cfg(feature = "cuda")]
    comm: crate::exchange::device::CommState,
    /// The GPU of the device path, once taken.
    #[cfg(feature = "cuda")]
    comm_gpu: std::sync::OnceLock<usize>,
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

    /// The band plan of this rank's group for a grid `2^up` times finer than the latent: the same
    /// bands, every row count times `2^up` (bands are cut at the coarsest level, which the finer
    /// plan shares).
    fn plan_up(&self, up: usize) -> Result<Cow<'_, BandPlan>> {
        let p = self.plan();
        if up == 0 {
            return Ok(Cow::Borrowed(p));
        }
        Ok(Cow::Owned(BandPlan::new(
            p.height << up,
            p.width << up,
            p.levels + up,
            p.ranks(),
        )?))
    }

    /// [`Shared::cplan`] for a grid `2^up` times finer than the latent.
    fn cplan_up(&self, id: &str, up: usize) -> Result<Cow<'_, BandPlan>> {
        let p = self.cplan(id)?;
        if up == 0 {
            return Ok(Cow::Borrowed(p));
        }
        Ok(Cow::Owned(BandPlan::new(
            p.height << up,
            p.width << up,
            p.levels + up,
            p.ranks(),
        )?))
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

    /// The level of a `rows × cols` band in step `ctx`, rows or columns as the step cuts, on the
    /// grid `2^up` times finer than the latent.
    fn level_at(
        &self,
        ctx: &StepCtx,
        id: &str,
        rows: usize,
        cols: usize,
        up: usize,
    ) -> Result<usize> {
        if !self.cols(ctx) {
            return self.level_in(&*self.plan_up(up)?, id, rows, cols);
        }
        let plan = self.cplan_up(id, up)?;
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
    pub(crate) fn level(&self, id: &str, rows: usize, cols: usize) -> Result<usize> {
        self.level_in(self.plan(), id, rows, cols)
    }

    /// The level at which this rank's band of `plan` has `rows` rows and the image `cols` columns.
    fn level_in(&self, plan: &BandPlan, id: &str, rows: usize, cols: usize) -> Result<usize> {
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

    /// The device path for activations on `device` over the group (or world) transport: the
    /// transport's device point-to-point and the GPU ordinal. `None` means the host path.
    #[cfg(feature = "cuda")]
    fn device_p2p(&self, device: Device, on_world: bool) -> Option<(&dyn DeviceP2p, usize)> {
        let t = if on_world { &self.world } else { &self.group };
        match device {
            Device::Cuda(o) => t.device_p2p().map(|d| (d, o)),
            Device::Cpu => None,
        }
    }

    /// Joins the communication stream (device path): everything enqueued on it so far happens
    /// before what the compute stream does next. A no-op on the host path.
    pub(crate) fn join_comm(&self, id: &str) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(o) = self.comm_ordinal() {
            return self.comm.join(o, |m| self.comm_msg(id, m));
        }
        let _ = id;
        Ok(())
    }

    /// The GPU whose communication stream this rank uses, once the device path has been taken.
    #[cfg(feature = "cuda")]
    fn comm_ordinal(&self) -> Option<usize> {
        self.comm_gpu.get().copied()
    }

    fn comm_msg(&self, id: &str, msg: String) -> CoreError {
        CoreError::Comm {
            rank: self.grid.world_rank,
            layer: id.to_string(),
            msg,
        }
    }

    /// Posts tensor sends and receives (of `recvs`' shapes and dtypes, on `device`) on the group
    /// (or world) transport and counts their bytes. On the device path the receives land in
    /// `into` when given (persistent buffers), else in new zeroed device tensors, and the work is
    /// enqueued on the communication stream without joining it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn post_tensors(
        &self,
        id: &str,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<RecvSpec>,
        device: Device,
        on_world: bool,
        into: Option<Vec<Tensor>>,
    ) -> Result<Inflight> {
        let sent: usize = sends.iter().map(|s| s.1.size_in_bytes()).sum();
        let recvd: usize = recvs.iter().map(RecvSpec::bytes).sum();
        if sends.is_empty() && recvs.is_empty() {
            return Ok(Inflight::Done(Vec::new()));
        }
        self.bytes.record(kind, sent as u64, recvd as u64);
        let err = |m: String| self.comm_msg(id, m);
        #[cfg(feature = "cuda")]
        if let Some((dp, ordinal)) = self.device_p2p(device, on_world) {
            let bufs = match into {
                Some(b) => b,
                None => recvs
                    .iter()
                    .map(|r| Tensor::zeros_on(&r.shape, r.dtype, device))
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .at(id)?,
            };
            // The first exchange fixes the GPU (all of a rank's activations live on one).
            let _ = self.comm_gpu.set(ordinal);
            let pairs: Vec<(usize, Tensor)> = recvs
                .iter()
                .zip(&bufs)
                .map(|(r, t)| (r.peer, t.clone()))
                .collect();
            self.comm.enqueue(dp, ordinal, kind, sends, &pairs, err)?;
            return Ok(Inflight::Done(bufs));
        }
        let _ = into;
        let t = if on_world { &self.world } else { &self.group };
        post_host(t.as_ref(), kind, tag, &sends, recvs, device, err)
    }

    /// Posts an exchange and waits for it (device path: joins the communication stream).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn exchange_now(
        &self,
        id: &str,
        kind: CommKind,
        tag: u32,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<RecvSpec>,
        device: Device,
        on_world: bool,
    ) -> Result<Vec<Tensor>> {
        let p = self.post_tensors(id, kind, tag, sends, recvs, device, on_world, None)?;
        self.join_comm(id)?;
        p.wait(|m| self.comm_msg(id, m))
    }

    /// Whether tensors on `device` take the device path on the group transport.
    fn on_device_path(&self, device: Device) -> bool {
        #[cfg(feature = "cuda")]
        return self.device_p2p(device, false).is_some();
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            false
        }
    }

    /// Synchronous exchange; `keep` picks what a stale step that follows reads (received parts
    /// and a local part), which is stored in the slot (on the device path copied into the slot's
    /// persistent buffers, so that stale steps always read the same memory).
    #[allow(clippy::too_many_arguments)]
    fn sync_exchange(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<RecvSpec>,
        device: Device,
        keep: impl FnOnce(&[Tensor]) -> Result<Option<(Vec<Tensor>, Option<Tensor>)>>,
    ) -> Result<Vec<Tensor>> {
        let got = self.exchange_now(id, slot.kind, slot.index, sends, recvs, device, false)?;
        if self.next_is_stale(ctx.step) {
            if let Some((recvd, local)) = keep(&got)? {
                let (recvd, local) = self.persist(id, slot, ctx.step, recvd, local, device)?;
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

    /// On the device path, copies `recvd` and `local` into the slot's persistent buffers of
    /// `step`'s parity and returns those; on the host path returns them as they are.
    fn persist(
        &self,
        id: &str,
        slot: &Slot,
        step: usize,
        recvd: Vec<Tensor>,
        local: Option<Tensor>,
        device: Device,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        if !self.on_device_path(device) {
            return Ok((recvd, local));
        }
        let specs = recvd.iter().map(|t| RecvSpec::of(0, t)).collect();
        let (bufs, local) = self.slot_buffers(id, slot, step, specs, local.as_ref(), device)?;
        for (src, dst) in recvd.iter().zip(&bufs) {
            device_copy(id, src, dst)?;
        }
        Ok((bufs, local))
    }

    /// The slot's persistent device buffers of `step`'s parity: one per receive of `specs`, and,
    /// when `local` is given, one more holding a copy of it.
    fn slot_buffers(
        &self,
        id: &str,
        slot: &Slot,
        step: usize,
        mut specs: Vec<RecvSpec>,
        local: Option<&Tensor>,
        device: Device,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        specs.extend(local.map(|t| RecvSpec::of(0, t)));
        let mut bufs = slot.persistent(step, &specs, device)?;
        let kept = match local {
            Some(src) => {
                let dst = bufs.pop();
                if let Some(d) = &dst {
                    device_copy(id, src, d)?;
                }
                dst
            }
            None => None,
        };
        Ok((bufs, kept))
    }

    /// Posts this step's exchange for the next step, then returns what the previous step posted
    /// (waiting for it if it is still in flight), and the local part stored with it.
    #[allow(clippy::too_many_arguments)]
    fn stale_exchange(
        &self,
        id: &str,
        slot: &Slot,
        ctx: &StepCtx,
        sends: Vec<(usize, Tensor)>,
        recvs: Vec<RecvSpec>,
        local: Option<Tensor>,
        device: Device,
    ) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        if self.cfg.sync_mode == SyncMode::None {
            // No exchange after the warm-up: the last warm-up step's context, frozen.
            return self
                .cache
                .read_frozen(slot, self.cfg.last_warmup_step(), ctx.step);
        }
        let (pending, local) = if self.on_device_path(device) {
            // Receives land in the persistent buffers of this step's parity.
            let (bufs, kept) =
                self.slot_buffers(id, slot, ctx.step, recvs.clone(), local.as_ref(), device)?;
            let p = self.post_tensors(
                id,
                slot.kind,
                slot.index,
                sends,
                recvs,
                device,
                false,
                Some(bufs),
            )?;
            (p, kept)
        } else {
            let p =
                self.post_tensors(id, slot.kind, slot.index, sends, recvs, device, false, None)?;
            (p, local)
        };
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

/// Copies `src` into `dst` (same shape, dtype and GPU): the device path's stores into persistent
/// buffers. Never reached without the `cuda` feature (there is no device path then).
fn device_copy(id: &str, src: &Tensor, dst: &Tensor) -> Result<()> {
    #[cfg(feature = "cuda")]
    return pcpp_kernels::cuda::copy_into(src, dst).at(id);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (src, dst);
        Err(CoreError::Config(format!(
            "layer `{id}`: device copies need the `cuda` feature"
        )))
    }
}

fn dims4(id: &str, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match x.shape() {
        &[b, c, h, w] => Ok((b, c, h, w)),
        s => Err(CoreError::Config(format!(
            "layer `{id}`: expected a [b, c, rows, w] band, got {s:?}"
        ))),
    }
}

/// The patch-parallel runtime of one rank: the layer factory, the step driver, the stale cache and
/// the byte counters. Build one per rank (collectively: it splits the world into CFG groups), build
/// the model through it (`&runtime` is a [`LayerFactory`]) and drive the denoising loop through it
/// (`&runtime` is a [`StepDriver`]).
///
/// With one rank, or [`ParallelMode::Serial`], it behaves exactly like [`SerialFactory`] and
/// [`crate::SerialDriver`].
pub struct PatchRuntime {
    pub(crate) sh: Arc<Shared>,
    /// Aborts the job when a generation on the device path stops making progress.
    watchdog: Mutex<Option<crate::watchdog::Watchdog>>,
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
        Self::build(world, None, cfg_split, cfg, height, width, levels)
    }

    /// The runtime of a model that runs once per image (one pass, no denoising steps) over the
    /// whole `world`: one band per rank (no CFG groups; uneven bands allowed), every exchange
    /// synchronous with full context ([`ParallelConfig::one_pass`]), so the model's output equals
    /// its serial output up to float rounding. `height × width` is its finest grid, which it
    /// halves `levels` times (bands are cut at the coarsest level). Collective over `world`.
    pub fn one_pass(
        world: Arc<dyn Transport>,
        height: usize,
        width: usize,
        levels: usize,
    ) -> Result<PatchRuntime> {
        Self::new(
            world,
            false,
            ParallelConfig::one_pass(),
            height,
            width,
            levels,
        )
    }

    /// Like [`PatchRuntime::new`], with the transport of this rank's CFG group given instead of
    /// split from `world` (for transports that cannot split, such as
    /// [`pcpp_comm::SoloTransport`] when one rank's compute is measured alone). `group` must have
    /// this rank's place in its group (checked).
    pub fn with_group(
        world: Arc<dyn Transport>,
        group: Arc<dyn Transport>,
        cfg_split: bool,
        cfg: ParallelConfig,
        height: usize,
        width: usize,
        levels: usize,
    ) -> Result<PatchRuntime> {
        Self::build(world, Some(group), cfg_split, cfg, height, width, levels)
    }

    fn build(
        world: Arc<dyn Transport>,
        given_group: Option<Arc<dyn Transport>>,
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
            let g = match given_group {
                Some(g) => g,
                None => world
                    .split(grid.group as u32, grid.patch() as u32)
                    .map_err(|e| CoreError::Comm {
                        rank: grid.world_rank,
                        layer: "process grid".into(),
                        msg: e.to_string(),
                    })?,
            };
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
            watchdog: Mutex::new(None),
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
                #[cfg(feature = "cuda")]
                comm: Default::default(),
                #[cfg(feature = "cuda")]
                comm_gpu: std::sync::OnceLock::new(),
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
            decode: None,
            decode_seconds: None,
        }
    }

    fn beat(&self) {
        if let Ok(g) = self.watchdog.lock() {
            if let Some(w) = g.as_ref() {
                w.beat();
            }
        }
    }

    /// The stale-cache slot of layer `id` when the scheme communicates (none for naive patch).
    fn slot_for(&self, id: &str, kind: CommKind) -> Result<Option<Arc<Slot>>> {
        if self.sh.communicates() {
            self.sh.cache.register(id, kind).map(Some)
        } else {
            Ok(None)
        }
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
        // Whatever the previous step left on the communication stream is ordered before this
        // step (normally the output gather joined it already). A failure here is a broken
        // device context, which the step's first operation reports.
        let _ = self.sh.join_comm("step start");
        self.beat();
        self.sh.open_step(ctx);
        ctx
    }

    fn end_step(&self, _step: usize) -> Result<()> {
        self.sh.join_comm("step end")
    }

    fn repeats(&self, ctx: &StepCtx) -> bool {
        // Host-staged exchanges (MPI, UCX, local, tensor parallelism's all-reduces) read device
        // data back to the host inside the step, which a graph cannot capture.
        let device_path = self.sh.world.device_p2p().is_some()
            && self.sh.group.device_p2p().is_some()
            && self.sh.cfg.mode != ParallelMode::Tensor;
        self.sh.serial || (!ctx.sync && device_path)
    }

    fn step_done(&self, step: usize) -> Result<()> {
        self.beat();
        #[cfg(feature = "cuda")]
        if let Some(o) = self.sh.comm_ordinal() {
            let timeout = self.sh.world.options().timeout;
            let done = pcpp_kernels::cuda::gpu(o)
                .and_then(|g| g.wait_idle(timeout))
                .map_err(|e| self.sh.comm_msg("step end", e.to_string()))?;
            if !done {
                return Err(self.sh.comm_msg(
                    &format!("step {step}"),
                    format!(
                        "the step's GPU work (with its NCCL communication) did not finish within {timeout:?}; is a peer gone?"
                    ),
                ));
            }
        }
        let _ = step;
        Ok(())
    }

    /// Counts step `captured`'s traffic again for the step now open, which replays the CUDA graph
    /// captured at `captured` (a replay moves the same bytes but runs no host code that could
    /// count them). Errors if `captured` has no report.
    fn replayed(&self, captured: usize) -> Result<()> {
        let of_step = captured;
        let t = self
            .sh
            .report
            .lock()
            .ok()
            .and_then(|r| {
                r.steps
                    .iter()
                    .find(|s| s.step == of_step)
                    .map(|s| s.traffic)
            })
            .ok_or_else(|| {
                CoreError::Config(format!("no report of step {of_step} to count a replay of"))
            })?;
        for kind in [
            CommKind::Halo,
            CommKind::GroupNorm,
            CommKind::Attention,
            CommKind::Gather,
            CommKind::Other,
        ] {
            self.sh
                .bytes
                .record(kind, t.sent.get(kind), t.recvd.get(kind));
        }
        Ok(())
    }

    fn begin_generation(&self) -> Result<()> {
        self.sh.cache.clear()?;
        if let Ok(mut r) = self.sh.report.lock() {
            *r = ReportState::default();
        }
        // Device-path transports move data the host never waits for: watch for progress.
        let device = self.sh.world.device_p2p().is_some() || self.sh.group.device_p2p().is_some();
        if device && !self.sh.serial {
            let world = self.sh.world.clone();
            let rank = self.sh.grid.world_rank;
            let timeout = world.options().timeout;
            let w = crate::watchdog::Watchdog::start(timeout, move |idle| {
                world.abort(&format!(
                    "rank {rank}: no denoising progress for {:.1} s (--timeout {} s): the GPU communication of a step did not complete; is a peer gone?",
                    idle.as_secs_f64(),
                    timeout.as_secs()
                ));
            });
            if let Ok(mut g) = self.watchdog.lock() {
                *g = Some(w);
            }
        }
        Ok(())
    }

    fn end_generation(&self) -> Result<()> {
        if let Ok(mut g) = self.watchdog.lock() {
            g.take();
        }
        self.sh.join_comm("end of generation")?;
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
    /// The input is `2^up` times finer than the latent.
    up: usize,
}

impl Conv2dLayer for InputConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = dims4(&self.id, x)?;
        let plan = self.sh.plan_up(self.up)?;
        if h != plan.height || w != plan.width {
            let what = if self.up == 0 {
                "latent".to_string()
            } else {
                format!("input ({}× the latent)", 1 << self.up)
            };
            return Err(CoreError::Config(format!(
                "layer `{}`: {what} is {h}×{w} but the patch-parallel runtime was built for {}×{}",
                self.id, plan.height, plan.width
            )));
        }
        let band = plan.band(0, self.sh.me());
        let k = self.weight.shape()[2];
        let p = self.pad;
        if self.sh.cols(ctx) {
            // Naive patch cutting columns: the column band alone, zero-padded.
            let cb = self.sh.cplan_up(&self.id, self.up)?.band(0, self.sh.me());
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
    /// The input is `2^up` times finer than the latent.
    up: usize,
}

impl Conv2dLayer for HaloConv {
    fn forward(&self, ctx: &StepCtx, x: &Tensor) -> Result<Tensor> {
        let id = &self.id;
        let sh = &self.sh;
        let (b, c, rows, w) = dims4(id, x)?;
        let k = self.weight.shape()[2];
        if sh.cols(ctx) {
            // Naive patch cutting columns: zero columns where other bands would be.
            let level = sh.level_at(ctx, id, rows, w, self.up)?;
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
            return x.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
        }
        let plan = sh.plan_up(self.up)?;
        let level = sh.level_in(&plan, id, rows, w)?;
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
                return x.conv2d(&self.weight, self.bias.as_ref(), params).at(id);
            }
        };
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
        let dev = x.device();
        let got = if ctx.sync {
            sh.sync_exchange(id, slot, ctx, sends, recvs, dev, |g| {
                Ok(Some((g.to_vec(), None)))
            })?
        } else {
            sh.stale_exchange(id, slot, ctx, sends, recvs, None, dev)?.0
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
        xin.conv2d(&self.weight, self.bias.as_ref(), params).at(id)
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
        let (_, c, rows, w) = dims4(id, x)?;
        let level = sh.level_at(ctx, id, rows, w, 0)?;
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
            }
        };
        let plan = sh.plan();
        let me = sh.me();
        // Mean and centred sum of squares per (batch, group), f32 on the wire, merged with each
        // band's element count (uneven bands are exact).
        let own = x.group_moments(g).at(id)?;
        let counts: Vec<f64> = (0..plan.ranks())
            .map(|j| ((c / g.max(1)) * plan.band(level, j).len() * plan.width_at(level)) as f64)
            .collect();
        let peers = sh.peers();
        let sends = peers.iter().map(|&p| (p, own.clone())).collect();
        let recvs = peers.iter().map(|&p| RecvSpec::of(p, &own)).collect();
        let dev = x.device();
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
        };
        if ctx.sync || mode == GnMode::Sync {
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
        let level = sh.level_at(ctx, id, rows, cols, 0)?;
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
        let portion = sh.cfg.portion_at(level);
        let dev = x.device();
        let spec = |peer: usize, n: usize| RecvSpec {
            peer,
            shape: vec![b, n, 2 * c],
            dtype: x.dtype(),
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
        let level = sh.level_at(ctx, id, rows, w, 0)?;
        let me = sh.grid.world_rank;
        // Bands are rows (or, for naive patch cutting columns, columns) of the image.
        let cols = sh.cols(ctx);
        let axis = if cols { 3 } else { 2 };
        let plans = if cols { &sh.cplans } else { &sh.plans };
        let len_of = |r: usize| {
            let g = &sh.grids[r];
            plans[g.group].band(level, g.patch()).len()
        };
        let shape_of = |r: usize| {
            if cols {
                vec![b, c, rows, len_of(r)]
            } else {
                vec![b, c, len_of(r), w]
            }
        };
        let others: Vec<usize> = (0..sh.grids.len()).filter(|&r| r != me).collect();
        let sends = others.iter().map(|&r| (r, x.clone())).collect();
        let recvs = others
            .iter()
            .map(|&r| RecvSpec {
                peer: r,
                shape: shape_of(r),
                dtype: x.dtype(),
            })
            .collect();
        let got = sh.exchange_now(
            id,
            CommKind::Gather,
            GATHER_TAG,
            sends,
            recvs,
            x.device(),
            true,
        )?;
        stitch_bands(sh, id, me, x, got, axis)
    }
}

/// The whole image from every rank's band: `own` (this rank's, world rank `me`) and `got` (the
/// others', in world-rank order), joined along `axis` within each CFG group, the groups' images
/// along the batch. The one stitching of the output gather and of the gather to one rank.
pub(crate) fn stitch_bands(
    sh: &Shared,
    id: &str,
    me: usize,
    own: &Tensor,
    got: Vec<Tensor>,
    axis: usize,
) -> Result<Tensor> {
    let n = sh.grids.len();
    if got.len() + 1 != n {
        return Err(CoreError::Config(format!(
            "layer `{id}`: {} bands received, {} expected",
            got.len(),
            n - 1
        )));
    }
    let mut it = got.into_iter();
    let bands: Vec<Tensor> = (0..n)
        .map(|r| {
            if r == me {
                Some(own.clone())
            } else {
                it.next()
            }
        })
        .collect::<Option<_>>()
        .ok_or_else(|| CoreError::Config(format!("layer `{id}`: a band is missing")))?;
    let mut images = (0..sh.grid.groups)
        .map(|g| {
            let members: Vec<&Tensor> = (0..n)
                .filter(|&r| sh.grids[r].group == g)
                .map(|r| &bands[r])
                .collect();
            Tensor::cat(&members, axis).at(id)
        })
        .collect::<Result<Vec<_>>>()?;
    if images.len() == 1 {
        Ok(images.remove(0))
    } else {
        let refs: Vec<&Tensor> = images.iter().collect();
        Tensor::cat(&refs, 0).at(id)
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
        self.fine_conv2d(id, weight, bias, stride, padding, 0)
    }

    fn fine_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        let k = weight.shape().get(2).copied().unwrap_or(1);
        if self.sh.serial || self.sh.tensor() || (k == 1 && padding == 0) {
            return SerialFactory.conv2d(id, weight, bias, stride, padding);
        }
        let slot = self.slot_for(id, CommKind::Halo)?;
        Ok(Arc::new(HaloConv {
            id: id.to_string(),
            sh: self.sh.clone(),
            weight,
            bias,
            stride,
            pad: padding,
            slot,
            up,
        }))
    }

    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.fine_input_conv2d(id, weight, bias, padding, 0)
    }

    fn fine_input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        padding: usize,
        up: usize,
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
            up,
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
        let slot = self.slot_for(id, CommKind::GroupNorm)?;
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
        let slot = self.slot_for(id, CommKind::Attention)?;
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
    use pcpp_comm::{LocalTransport, SoloTransport, TransportOptions};

    fn runtime(
        world: Arc<dyn Transport>,
        group: Arc<dyn Transport>,
        mode: ParallelMode,
    ) -> PatchRuntime {
        let cfg = ParallelConfig::preset(mode, &[0.3], Some(2), 10);
        PatchRuntime::with_group(world, group, false, cfg, 16, 16, 2).expect("runtime")
    }

    #[test]
    fn only_device_resident_steady_steps_repeat_for_graphs() {
        let opts = TransportOptions::default;
        let solo = |r, n| -> Arc<dyn Transport> { SoloTransport::new(r, n, opts()).unwrap() };
        let stale = StepCtx {
            step: 5,
            sync: false,
        };
        let sync = StepCtx {
            step: 0,
            sync: true,
        };
        // A device-memory transport: steady steps repeat, warm-up steps do not.
        let rt = runtime(solo(1, 2), solo(1, 2), ParallelMode::Pcpp);
        assert!(rt.repeats(&stale));
        assert!(!rt.repeats(&sync));
        // Tensor parallelism all-reduces through host memory: never.
        let rt = runtime(solo(1, 2), solo(1, 2), ParallelMode::Tensor);
        assert!(!rt.repeats(&stale));
        // Serial: every step.
        let rt = PatchRuntime::new(solo(0, 1), false, ParallelConfig::serial(), 16, 16, 2).unwrap();
        assert!(rt.repeats(&sync) && rt.repeats(&stale));
        // A host-staged transport (threads): never, the exchanges read device data back.
        let out = LocalTransport::run(2, opts(), |t| {
            let rt = runtime(t.clone(), t, ParallelMode::Pcpp);
            Ok::<_, CoreError>(rt.repeats(&stale))
        })
        .unwrap();
        assert_eq!(out, vec![false, false]);
    }
}
