//! The patch-parallel runtime of one rank ([`PatchRuntime`]): built collectively over the world
//! (CFG groups, PCPP §1.4), it is the [`LayerFactory`] the model is built through (see
//! `factory.rs`) and the [`StepDriver`] the denoising loop runs (which steps are synchronous, §4;
//! the per-step report; the watchdog of the device path).

use std::sync::{Arc, Mutex};

use pcpp_comm::{CommKind, Transport};

use super::shared::ReportState;
use super::Shared;
use crate::cache::{CacheCounters, Slot, StaleCache};
use crate::geometry::BandPlan;
use crate::grid::ProcessGrid;
use crate::layers::{CoreError, LayerFactory, Result, StepCtx, StepDriver};
use crate::report::{ByteCounters, RunReport, Traffic};
use crate::schedule::{ParallelConfig, ParallelMode};
use crate::topology::Topology;

///
/// With one rank, or [`ParallelMode::Serial`], it behaves exactly like [`crate::SerialFactory`] and
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
        let topo = Topology::new(world.size(), cfg_split, &cfg, height, width, levels)?;
        let grid = topo.grids[world.rank()];
        let serial = topo.serial;
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
                topo,
                cfg,
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
        self.sh.topo.serial
    }

    /// The band layout of the world (the value [`crate::plan::plan`] plans with).
    pub fn topology(&self) -> &Topology {
        &self.sh.topo
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
            group_size: if sh.topo.serial {
                1
            } else {
                sh.grid.group_size
            },
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
    pub(super) fn slot_for(&self, id: &str, kind: CommKind) -> Result<Option<Arc<Slot>>> {
        if self.sh.communicates() {
            self.sh.cache.register(id, kind).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl StepDriver for PatchRuntime {
    fn cfg_branch(&self) -> Option<usize> {
        (!self.sh.topo.serial && self.sh.grid.groups == 2).then_some(self.sh.grid.group)
    }

    fn step_ctx(&self, step: usize) -> StepCtx {
        let ctx = if self.sh.topo.serial {
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
        self.sh.topo.serial || (!ctx.sync && device_path)
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
        if device && !self.sh.topo.serial {
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
