//! CUDA graphs of the denoising step (PCPP §7.1): the steady model step (any [`DenoiseModel`])
//! captured once per step parity and kind of step ([`DenoiseModel::graph_key`]) and replayed.
//!
//! The patch-parallel runtime keeps every stale buffer a step reads or writes in persistent
//! per-parity device memory, so a step captured at parity `p` stays valid for every later step of
//! parity `p` (this is the fix of the reference code's graphs, whose receive buffers were allocated
//! during capture and froze the neighbours' context). Inputs are copied into fixed device buffers
//! before each replay and the output is read from a fixed buffer; the step's communication is
//! captured on the communication stream and joined by [`StepDriver::end_step`] inside the capture.

use pcpp_kernels::Tensor;

use crate::denoise::DenoiseModel;
#[cfg(feature = "cuda")]
use crate::layers::LayerContext;
use crate::layers::{CoreError, StepCtx, StepDriver};

/// The graphs of one kind of step, with the count of its eager steady steps.
#[derive(Default)]
struct Kind {
    key: Vec<u64>,
    steady_eager: usize,
    #[cfg(feature = "cuda")]
    graphs: [Option<(usize, pcpp_kernels::cuda::CudaGraphStep)>; 2],
}

/// The steady step as CUDA graphs, one per step parity (the stale cache's buffer of step `t` is
/// `t mod 2`) and per kind of step (steps whose [`DenoiseModel::graph_key`]s differ run different
/// device work: a kind that appears mid-run runs two eager steady steps before its capture), with
/// the input and output buffers they read and write.
#[derive(Default)]
pub struct StepGraphs {
    enabled: bool,
    kinds: Vec<Kind>,
    #[cfg(feature = "cuda")]
    io: Option<(Tensor, Tensor, Tensor)>,
}

impl StepGraphs {
    /// Graphs replace eager steps only when `enabled` (a run on a GPU that asked for them).
    pub fn new(enabled: bool) -> StepGraphs {
        StepGraphs {
            enabled,
            ..StepGraphs::default()
        }
    }

    /// The index of the kind of step with `key`, added on first use.
    fn kind(&mut self, key: Vec<u64>) -> usize {
        match self.kinds.iter().position(|k| k.key == key) {
            Some(i) => i,
            None => {
                self.kinds.push(Kind {
                    key,
                    ..Kind::default()
                });
                self.kinds.len() - 1
            }
        }
    }

    /// One denoising step of the loop, opened with `driver.step_ctx`: eager (the model forward,
    /// then [`StepDriver::end_step`]) until two steps of its kind that [`StepDriver::repeats`]
    /// have run, then replayed from the graph of the step's kind and parity (so the runtime's
    /// persistent buffers of both parities exist before any capture). Ends with
    /// [`StepDriver::step_done`], outside any capture.
    pub fn run<M: DenoiseModel>(
        &mut self,
        model: &M,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &M::Cond,
    ) -> Result<Tensor, M::Error> {
        let kind = self.kind(model.graph_key(ctx));
        let repeats = driver.repeats(ctx);
        let out = if self.enabled && repeats && self.kinds[kind].steady_eager >= 2 {
            self.replay(kind, model, driver, ctx, x, ts, cond)?
        } else {
            let out = model.forward(ctx, x, ts, cond)?;
            driver.end_step(ctx.step)?;
            if repeats {
                self.kinds[kind].steady_eager += 1;
            }
            out
        };
        driver.step_done(ctx.step)?;
        Ok(out)
    }

    /// The model output of step `ctx.step` (opened with `driver.step_ctx`), from the graph of its
    /// kind and parity, which is captured on first use. `x` and `ts` (on the model's GPU) are copied into
    /// the graph's input buffers; `cond` must already be on that GPU (a capture cannot upload host
    /// data). The returned tensor is the graph's output buffer: read it before the next step.
    ///
    /// Call it only for steps whose schedule repeats (steady steps, after two of them ran eagerly
    /// so that the runtime's persistent buffers of both parities exist); [`StepGraphs::run`]
    /// decides that for a denoising loop.
    pub fn step<M: DenoiseModel>(
        &mut self,
        model: &M,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &M::Cond,
    ) -> Result<Tensor, M::Error> {
        let kind = self.kind(model.graph_key(ctx));
        self.replay(kind, model, driver, ctx, x, ts, cond)
    }

    /// Every captured graph, of every kind and parity.
    #[cfg(feature = "cuda")]
    fn captured(&self) -> impl Iterator<Item = &pcpp_kernels::cuda::CudaGraphStep> {
        self.kinds
            .iter()
            .flat_map(|k| k.graphs.iter().flatten())
            .map(|(_, g)| g)
    }

    /// The kinds of node in the captured graphs (kernel names, memcpy, memset) with how many
    /// nodes of each one replayed step runs (the largest count among the graphs), for a bench
    /// that attributes the step's time to them ([`StepGraphs::set_kinds_enabled`]).
    #[cfg(feature = "cuda")]
    pub fn node_kinds(&self) -> Result<std::collections::BTreeMap<String, usize>, CoreError> {
        let mut all = std::collections::BTreeMap::new();
        for g in self.captured() {
            for (kind, n) in g.node_kinds().at("step graph")? {
                let e = all.entry(kind).or_insert(0);
                *e = n.max(*e);
            }
        }
        Ok(all)
    }

    /// Switches the nodes whose kind `pick` accepts off or back on in every captured graph, for
    /// the replays that follow. A step replayed with nodes off computes nonsense: this is for
    /// timing what they cost inside the graph. Returns how many nodes of one replayed step the
    /// driver would not switch (left as they were; the largest count among the graphs).
    #[cfg(feature = "cuda")]
    pub fn set_kinds_enabled(
        &self,
        pick: &dyn Fn(&str) -> bool,
        on: bool,
    ) -> Result<usize, CoreError> {
        let mut refused = 0;
        for g in self.captured() {
            let (_, r) = g.set_kinds_enabled(pick, on).at("step graph")?;
            refused = refused.max(r);
        }
        Ok(refused)
    }

    /// [`StepGraphs::step`] from the graphs of kind `kind`.
    #[allow(clippy::too_many_arguments)]
    fn replay<M: DenoiseModel>(
        &mut self,
        kind: usize,
        model: &M,
        driver: &dyn StepDriver,
        ctx: &StepCtx,
        x: &Tensor,
        ts: &Tensor,
        cond: &M::Cond,
    ) -> Result<Tensor, M::Error> {
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (kind, model, driver, ctx, x, ts, cond);
            Err(CoreError::Config("CUDA graphs need a build with the `cuda` feature".into()).into())
        }
        #[cfg(feature = "cuda")]
        {
            use pcpp_kernels::cuda::{capture_graph, copy_into};
            use pcpp_kernels::{Device, KernelError};
            let Device::Cuda(ordinal) = x.device() else {
                return Err(CoreError::Config(format!(
                    "CUDA graphs need the step's input on a GPU, it is on {}",
                    x.device()
                ))
                .into());
            };
            if self.io.is_none() {
                // The gathered noise prediction has the input's shape, with both CFG branches when
                // the ranks are split by branch.
                let mut oshape = x.shape().to_vec();
                if driver.cfg_branch().is_some() {
                    oshape[0] *= 2;
                }
                self.io = Some((
                    Tensor::zeros_on(x.shape(), x.dtype(), x.device())?,
                    Tensor::zeros_on(ts.shape(), ts.dtype(), ts.device())?,
                    Tensor::zeros_on(&oshape, x.dtype(), x.device())?,
                ));
            }
            let Some((xb, tb, ob)) = &self.io else {
                return Err(CoreError::Config("graph buffers missing".into()).into());
            };
            copy_into(x, xb)?;
            copy_into(ts, tb)?;
            let p = ctx.step % 2;
            match &self.kinds[kind].graphs[p] {
                Some((captured, g)) => {
                    driver.replayed(*captured)?;
                    g.replay()?;
                }
                None => {
                    let fail = |op: &'static str, e: String| KernelError::Invalid { op, msg: e };
                    let g = capture_graph(ordinal, || {
                        let o = model
                            .forward(ctx, xb, tb, cond)
                            .map_err(|e| fail("model step under graph capture", e.to_string()))?;
                        driver
                            .end_step(ctx.step)
                            .map_err(|e| fail("end of step under graph capture", e.to_string()))?;
                        copy_into(&o, ob)
                    })?;
                    g.replay()?;
                    self.kinds[kind].graphs[p] = Some((ctx.step, g));
                }
            }
            Ok(ob.clone())
        }
    }
}
