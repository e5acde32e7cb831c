//! The state every patch-parallel layer of one rank shares with its runtime: the world and CFG
//! group transports, this rank's place in the [`Topology`], the configuration, the stale cache
//! (PCPP §7.1), the per-kind byte counters and the per-step report, and the posting of exchanges
//! through [`crate::exchange`] (host or device path, bytes counted when posted, §7.4).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[cfg(feature = "cuda")]
use pcpp_comm::DeviceP2p;
use pcpp_comm::{CommError, CommKind, Pending, Transport};
use pcpp_kernels::{Device, Tensor};

use crate::cache::{CacheCounters, StaleCache};
use crate::exchange::{post_host, Inflight, Part, RecvSpec};
use crate::geometry::BandPlan;
use crate::grid::ProcessGrid;
#[cfg(feature = "cuda")]
use crate::layers::LayerContext;
use crate::layers::{CoreError, Result, StepCtx};
use crate::report::{ByteCounters, StepReport, Traffic};
use crate::schedule::{ParallelConfig, ParallelMode};
use crate::topology::Topology;

/// Tag of the output gather on the world transport.
pub(crate) const GATHER_TAG: u32 = 0;

/// The step being measured: its start, and the counters when it started.
pub(crate) struct OpenStep {
    step: usize,
    sync: bool,
    start: Instant,
    traffic: Traffic,
    cache: CacheCounters,
}

/// The per-step reports of the current generation.
#[derive(Default)]
pub(crate) struct ReportState {
    open: Option<OpenStep>,
    pub(crate) steps: Vec<StepReport>,
    pub(crate) ages: (u64, u64),
}

/// State shared by the runtime and every layer it built.
pub(crate) struct Shared {
    pub(crate) world: Arc<dyn Transport>,
    pub(crate) group: Arc<dyn Transport>,
    /// This rank's place.
    pub(crate) grid: ProcessGrid,
    /// The band layout of the world (the same value [`crate::plan::plan`] computes with).
    pub(crate) topo: Topology,
    pub(crate) cfg: ParallelConfig,
    pub(crate) cache: StaleCache,
    pub(crate) bytes: ByteCounters,
    pub(crate) report: Mutex<ReportState>,
    /// Communication-stream state of the device path.
    #[cfg(feature = "cuda")]
    pub(crate) comm: crate::exchange::device::CommState,
    /// The GPU of the device path, once taken.
    #[cfg(feature = "cuda")]
    pub(crate) comm_gpu: std::sync::OnceLock<usize>,
}

impl Shared {
    /// The row-band plan of this rank's group.
    pub(crate) fn plan(&self) -> &BandPlan {
        self.topo.plan(self.grid.world_rank)
    }

    /// Whether step `ctx` cuts columns (naive patch with `cols` or `alternate`).
    pub(crate) fn cols(&self, ctx: &StepCtx) -> bool {
        self.topo.cols_at(ctx.step)
    }

    /// The column-band plan of this rank's group.
    pub(crate) fn cplan(&self, id: &str) -> Result<&BandPlan> {
        self.topo.cplan(self.grid.world_rank).ok_or_else(|| {
            CoreError::Config(format!(
                "layer `{id}`: no column bands (split scheme {})",
                self.cfg.split_scheme
            ))
        })
    }

    /// The level of a `rows × cols` band in step `ctx`, rows or columns as the step cuts.
    pub(crate) fn level_at(
        &self,
        ctx: &StepCtx,
        id: &str,
        rows: usize,
        cols: usize,
    ) -> Result<usize> {
        self.level_at_up(ctx, id, rows, cols, 0)
    }

    /// [`Shared::level_at`] on the grid `2^up` times finer than the level-0 grid.
    pub(crate) fn level_at_up(
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

    /// The band plan of this rank's group for a grid `2^up` times finer than the level-0 grid
    /// (an input at a finer resolution than the model's grid, e.g. a conditioning image at pixel
    /// resolution): the same bands, every row count times `2^up` (bands are cut at the coarsest
    /// level, which the finer plan shares).
    pub(crate) fn plan_up(&self, up: usize) -> Result<Cow<'_, BandPlan>> {
        finer(self.plan(), up)
    }

    /// [`Shared::cplan`] for a grid `2^up` times finer than the level-0 grid.
    pub(crate) fn cplan_up(&self, id: &str, up: usize) -> Result<Cow<'_, BandPlan>> {
        finer(self.cplan(id)?, up)
    }

    /// This rank's band index (0 when serial).
    pub(crate) fn me(&self) -> usize {
        self.topo.patch(self.grid.world_rank)
    }

    pub(crate) fn communicates(&self) -> bool {
        !self.topo.serial && self.cfg.communicates()
    }

    pub(crate) fn next_is_stale(&self, step: usize) -> bool {
        !self.cfg.is_sync(step + 1)
    }

    pub(crate) fn comm_err(&self, id: &str, e: CommError) -> CoreError {
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
    pub(crate) fn tensor(&self) -> bool {
        !self.topo.serial && self.cfg.mode == ParallelMode::Tensor
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
    pub(crate) fn device_p2p(
        &self,
        device: Device,
        on_world: bool,
    ) -> Option<(&dyn DeviceP2p, usize)> {
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
    pub(crate) fn comm_ordinal(&self) -> Option<usize> {
        self.comm_gpu.get().copied()
    }

    pub(crate) fn comm_msg(&self, id: &str, msg: String) -> CoreError {
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
            let parts: Vec<Part> = recvs
                .iter()
                .zip(&bufs)
                .map(|(r, t)| Part::whole(r.peer, t.clone()))
                .collect();
            let sends = sends.into_iter().map(|(p, t)| Part::whole(p, t)).collect();
            self.comm.enqueue(dp, ordinal, kind, sends, &parts, err)?;
            return Ok(Inflight::Done(bufs));
        }
        let _ = into;
        let t = if on_world { &self.world } else { &self.group };
        post_host(t.as_ref(), kind, tag, &sends, recvs, device, err)
    }

    /// Posts device-path messages (byte ranges of device tensors, e.g. rows of a persistent
    /// window) on the group transport, counts their bytes, and enqueues them on the
    /// communication stream without joining it. An error on the host path.
    pub(crate) fn post_parts(
        &self,
        id: &str,
        kind: CommKind,
        sends: Vec<Part>,
        recvs: Vec<Part>,
        device: Device,
    ) -> Result<()> {
        if sends.is_empty() && recvs.is_empty() {
            return Ok(());
        }
        let sent: usize = sends.iter().map(|p| p.bytes.len()).sum();
        let recvd: usize = recvs.iter().map(|p| p.bytes.len()).sum();
        #[cfg(feature = "cuda")]
        if let Some((dp, ordinal)) = self.device_p2p(device, false) {
            self.bytes.record(kind, sent as u64, recvd as u64);
            let _ = self.comm_gpu.set(ordinal);
            return self
                .comm
                .enqueue(dp, ordinal, kind, sends, &recvs, |m| self.comm_msg(id, m));
        }
        let _ = kind;
        let first = sends.iter().chain(&recvs).next();
        Err(self.comm_msg(
            id,
            format!(
                "byte-range messages ({sent} bytes out, {recvd} in, peer {:?}, a tensor on {:?}) need the device path (activations on {device})",
                first.map(|p| p.peer),
                first.map(|p| p.tensor.device()),
            ),
        ))
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
    pub(crate) fn on_device_path(&self, device: Device) -> bool {
        #[cfg(feature = "cuda")]
        return self.device_p2p(device, false).is_some();
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            false
        }
    }

    pub(crate) fn peers(&self) -> Vec<usize> {
        let me = self.me();
        (0..self.plan().ranks()).filter(|&j| j != me).collect()
    }

    pub(crate) fn open_step(&self, ctx: StepCtx) {
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

    pub(crate) fn close_step(&self, r: &mut ReportState) {
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

/// `plan` on a grid `2^up` times finer: the same bands with every row count times `2^up`, and
/// `up` more levels.
fn finer(plan: &BandPlan, up: usize) -> Result<Cow<'_, BandPlan>> {
    if up == 0 {
        return Ok(Cow::Borrowed(plan));
    }
    Ok(Cow::Owned(BandPlan::new(
        plan.height << up,
        plan.width << up,
        plan.levels + up,
        plan.ranks(),
    )?))
}
