//! pcpp-core: Partially Conditioned Patch Parallelism (PCPP, arXiv 2412.02962) and DistriFusion
//! (arXiv 2402.19481), independent of any model.
//!
//! Model code builds its spatially coupled layers (3×3 convolutions, group norms, self-attention
//! with its own projections or over q/k/v the model projected, the strided input layer and the
//! output gather) through a [`LayerFactory`]. The serial factory returns plain layers; the
//! patch-parallel factory returns layers that work on one horizontal band of rows per rank and
//! exchange halos, statistics and attention context with their neighbours, fresh in warm-up steps
//! and one step stale afterwards. Everything else in a model is per-pixel or per-token and runs
//! unchanged on a band. The denoising loop of every model ([`denoise_loop`]) drives the layers
//! through a [`StepDriver`].

pub mod cache;
pub mod denoise;
mod exchange;
pub mod geometry;
pub mod graph;
pub mod grid;
pub mod layers;
pub mod patch;
pub mod plan;
pub mod prefixed;
pub mod report;
mod root_gather;
pub mod schedule;
mod serial;
pub mod tensor;
pub mod topology;
mod watchdog;

pub use cache::{CacheCounters, StaleCache};
pub use denoise::{denoise_loop, DenoiseModel, LoopOptions, LoopOutput, Sampler};
pub use geometry::{window_part, BandPlan, HaloPlan};
pub use graph::StepGraphs;
pub use grid::ProcessGrid;
pub use layers::{
    AttentionWeights, BandLocator, BandRect, ChannelSplit, Conv2dLayer, CoreError,
    FeedForwardLayer, FeedForwardWeights, GatherLayer, GroupNormLayer, LayerFactory,
    ProjectedAttentionLayer, Result, SelfAttentionLayer, SerialDriver, SerialFactory,
    StackedProjection, StepCtx, StepDriver,
};
pub use patch::{device_windows, set_device_windows, PatchRuntime};
pub use plan::{plan, Inventory, LayerKind, LayerSpec, Plan, PlanSetup, RankPlan};
pub use prefixed::PrefixedFactory;
pub use report::{KindBytes, RunReport, StepReport, Traffic};
pub use schedule::{GnMode, ParallelConfig, ParallelMode, SplitScheme, SyncMode};
pub use topology::Topology;
