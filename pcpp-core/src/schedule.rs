//! Parallel schemes and the step schedule (PCPP §2.1, §4, §5): which mode each layer kind runs in,
//! the partial-conditioning `portion` (per level), the group-norm statistics mode, and which steps
//! are synchronous warm-up steps.

use std::fmt;
use std::str::FromStr;

use crate::layers::{CoreError, Result, StepCtx};

/// The parallel scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum ParallelMode {
    /// One rank computes the whole image with plain layers.
    #[default]
    #[serde(rename = "serial")]
    Serial,
    /// Each rank denoises its band alone: no communication between layers (zero padding at band
    /// edges, local statistics, attention over own tokens).
    #[serde(rename = "naive-patch")]
    NaivePatch,
    /// DistriFusion: stale halos, statistics and the K/V of every other band.
    #[serde(rename = "distrifusion")]
    DistriFusion,
    /// PCPP: as DistriFusion, but self-attention sees only `portion` of the neighbouring bands.
    #[serde(rename = "pcpp")]
    Pcpp,
    /// Tensor parallelism (the baseline of §5 `parallelism = tensor`): every rank holds the whole
    /// image; attention heads, feed-forward hidden units and ResNet channels are split over the
    /// ranks of a group, with an all-reduce after each split block.
    #[serde(rename = "tensor")]
    Tensor,
}

impl ParallelMode {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            ParallelMode::Serial => "serial",
            ParallelMode::NaivePatch => "naive-patch",
            ParallelMode::DistriFusion => "distrifusion",
            ParallelMode::Pcpp => "pcpp",
            ParallelMode::Tensor => "tensor",
        }
    }
}

impl fmt::Display for ParallelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ParallelMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "serial" => ParallelMode::Serial,
            "naive-patch" | "naive_patch" => ParallelMode::NaivePatch,
            "distrifusion" => ParallelMode::DistriFusion,
            "pcpp" => ParallelMode::Pcpp,
            "tensor" => ParallelMode::Tensor,
            _ => {
                return Err(format!(
                "unknown parallel mode `{s}` (expected pcpp, distrifusion, naive-patch, tensor or serial)"
            ))
            }
        })
    }
}

/// How group norm gets its statistics in stale steps (PCPP §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GnMode {
    /// Blocking exchange at every step (exact).
    Sync,
    /// Other bands' statistics from the previous step plus own fresh ones.
    Stale,
    /// Previous step's total plus the change of own statistics (DistriFusion's default).
    #[default]
    Corrected,
    /// Own band's statistics only.
    Separate,
}

impl GnMode {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            GnMode::Sync => "sync",
            GnMode::Stale => "stale",
            GnMode::Corrected => "corrected",
            GnMode::Separate => "separate",
        }
    }
}

impl fmt::Display for GnMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GnMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "sync" => GnMode::Sync,
            "stale" => GnMode::Stale,
            "corrected" | "corrected-async" => GnMode::Corrected,
            "separate" => GnMode::Separate,
            _ => {
                return Err(format!(
                    "unknown group-norm mode `{s}` (expected sync, stale, corrected or separate)"
                ))
            }
        })
    }
}

/// Whether layers exchange context after the warm-up (PCPP §2.1, `--sync_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Synchronous warm-up, then one-step-stale context exchanged asynchronously (the default).
    #[default]
    Async,
    /// Every layer synchronous at every step (`full_sync`): exact, no overlap.
    Full,
    /// No exchange after the warm-up (`no_sync`): halos and attention context stay frozen at the
    /// last warm-up step, group norms use their own band's statistics. Only the output gather
    /// still moves bytes.
    None,
}

impl SyncMode {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            SyncMode::Async => "async",
            SyncMode::Full => "full",
            SyncMode::None => "none",
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "async" | "stale" => SyncMode::Async,
            "full" | "full-sync" => SyncMode::Full,
            "none" | "no-sync" => SyncMode::None,
            _ => {
                return Err(format!(
                    "unknown sync mode `{s}` (expected async, full or none)"
                ))
            }
        })
    }
}

/// How `naive-patch` cuts the image (PCPP §5 `split_scheme`; patch parallelism always cuts rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SplitScheme {
    /// Horizontal bands of rows.
    #[default]
    Rows,
    /// Vertical bands of columns.
    Cols,
    /// Rows on even steps, columns on odd steps.
    Alternate,
}

impl SplitScheme {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            SplitScheme::Rows => "rows",
            SplitScheme::Cols => "cols",
            SplitScheme::Alternate => "alternate",
        }
    }

    /// Whether step `step` cuts columns.
    pub fn cols_at(self, step: usize) -> bool {
        match self {
            SplitScheme::Rows => false,
            SplitScheme::Cols => true,
            SplitScheme::Alternate => step % 2 == 1,
        }
    }
}

impl fmt::Display for SplitScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SplitScheme {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "rows" | "row" => SplitScheme::Rows,
            "cols" | "col" | "columns" => SplitScheme::Cols,
            "alternate" => SplitScheme::Alternate,
            _ => {
                return Err(format!(
                    "unknown split scheme `{s}` (expected rows, cols or alternate)"
                ))
            }
        })
    }
}

/// Everything that selects a parallel scheme.
#[derive(Debug, Clone, PartialEq)]
pub struct ParallelConfig {
    pub mode: ParallelMode,
    /// `portion` per resolution level (the last entry repeats for deeper levels). `≥ n − 1` is
    /// DistriFusion's full context.
    pub portion: Vec<f64>,
    pub gn_mode: GnMode,
    /// Number of synchronous steps at the start (at least the first step is always synchronous).
    pub warmup_steps: usize,
    /// What happens after the warm-up.
    pub sync_mode: SyncMode,
    /// How `naive-patch` cuts the image.
    pub split_scheme: SplitScheme,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        ParallelConfig::pcpp(0.3)
    }
}

impl ParallelConfig {
    /// PCPP with one `portion` for every level, 4 warm-up steps, corrected asynchronous GN.
    pub fn pcpp(portion: f64) -> Self {
        ParallelConfig {
            mode: ParallelMode::Pcpp,
            portion: vec![portion],
            gn_mode: GnMode::Corrected,
            warmup_steps: 4,
            sync_mode: SyncMode::Async,
            split_scheme: SplitScheme::Rows,
        }
    }

    /// DistriFusion: full stale context.
    pub fn distrifusion() -> Self {
        ParallelConfig {
            mode: ParallelMode::DistriFusion,
            portion: vec![f64::INFINITY],
            ..ParallelConfig::pcpp(0.0)
        }
    }

    /// Naive patch parallelism.
    pub fn naive_patch() -> Self {
        ParallelConfig {
            mode: ParallelMode::NaivePatch,
            portion: vec![0.0],
            gn_mode: GnMode::Separate,
            warmup_steps: 0,
            sync_mode: SyncMode::Async,
            split_scheme: SplitScheme::Rows,
        }
    }

    /// The preset of `mode`, with `portions` (one per level, the last repeating) for PCPP and, for
    /// the schemes that have warm-up steps (PCPP, DistriFusion), `warmup` of them (default 4),
    /// capped at `steps`.
    pub fn preset(
        mode: ParallelMode,
        portions: &[f64],
        warmup: Option<usize>,
        steps: usize,
    ) -> Self {
        let mut cfg = match mode {
            ParallelMode::Pcpp => ParallelConfig {
                portion: portions.to_vec(),
                ..ParallelConfig::pcpp(0.0)
            },
            ParallelMode::DistriFusion => ParallelConfig::distrifusion(),
            ParallelMode::NaivePatch => ParallelConfig::naive_patch(),
            ParallelMode::Tensor => ParallelConfig::tensor(),
            ParallelMode::Serial => ParallelConfig::serial(),
        };
        if matches!(mode, ParallelMode::Pcpp | ParallelMode::DistriFusion) {
            cfg.warmup_steps = warmup.unwrap_or(cfg.warmup_steps).min(steps);
        }
        cfg
    }

    /// Every layer exchanges fresh, full context synchronously at every step (DistriFusion's
    /// context with [`SyncMode::Full`] and synchronous group norm): each layer's output equals the
    /// serial one up to float rounding. For a model that runs once per image, where there is no
    /// previous step to take stale context from.
    pub fn one_pass() -> Self {
        ParallelConfig {
            gn_mode: GnMode::Sync,
            warmup_steps: 1,
            sync_mode: SyncMode::Full,
            ..ParallelConfig::distrifusion()
        }
    }

    /// Tensor parallelism.
    pub fn tensor() -> Self {
        ParallelConfig {
            mode: ParallelMode::Tensor,
            ..ParallelConfig::naive_patch()
        }
    }

    /// Plain single-rank execution.
    pub fn serial() -> Self {
        ParallelConfig {
            mode: ParallelMode::Serial,
            ..ParallelConfig::naive_patch()
        }
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.portion.is_empty() {
            return Err(CoreError::Config(
                "portion: at least one value is needed".into(),
            ));
        }
        if let Some(p) = self.portion.iter().find(|p| p.is_nan() || **p < 0.0) {
            return Err(CoreError::Config(format!("portion {p} must be ≥ 0")));
        }
        Ok(())
    }

    /// `portion` at `level`.
    pub fn portion_at(&self, level: usize) -> f64 {
        match self.mode {
            ParallelMode::DistriFusion | ParallelMode::Serial => f64::INFINITY,
            ParallelMode::NaivePatch | ParallelMode::Tensor => 0.0,
            ParallelMode::Pcpp => *self
                .portion
                .get(level)
                .or(self.portion.last())
                .unwrap_or(&0.0),
        }
    }

    /// Whether step `step` exchanges fresh context synchronously.
    pub fn is_sync(&self, step: usize) -> bool {
        self.sync_mode == SyncMode::Full || step < self.warmup_steps.max(1)
    }

    /// The last synchronous step before stale steps begin (the context `SyncMode::None` freezes).
    pub fn last_warmup_step(&self) -> usize {
        self.warmup_steps.max(1) - 1
    }

    /// The group-norm mode in effect in stale steps: `SyncMode::None` makes it `Separate`.
    pub fn stale_gn_mode(&self) -> GnMode {
        match self.sync_mode {
            SyncMode::None => GnMode::Separate,
            SyncMode::Full => GnMode::Sync,
            SyncMode::Async => self.gn_mode,
        }
    }

    /// The layer context of step `step`.
    pub fn ctx(&self, step: usize) -> StepCtx {
        StepCtx {
            step,
            sync: self.is_sync(step),
        }
    }

    /// Whether layers communicate at all.
    pub fn communicates(&self) -> bool {
        matches!(self.mode, ParallelMode::DistriFusion | ParallelMode::Pcpp)
    }
}
