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
}

impl ParallelMode {
    /// Command-line name.
    pub fn name(self) -> &'static str {
        match self {
            ParallelMode::Serial => "serial",
            ParallelMode::NaivePatch => "naive-patch",
            ParallelMode::DistriFusion => "distrifusion",
            ParallelMode::Pcpp => "pcpp",
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
            _ => {
                return Err(format!(
                "unknown parallel mode `{s}` (expected pcpp, distrifusion, naive-patch or serial)"
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
            ParallelMode::NaivePatch => 0.0,
            ParallelMode::Pcpp => *self
                .portion
                .get(level)
                .or(self.portion.last())
                .unwrap_or(&0.0),
        }
    }

    /// Whether step `step` exchanges fresh context synchronously.
    pub fn is_sync(&self, step: usize) -> bool {
        step < self.warmup_steps.max(1)
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
