//! `scheduler_config.json`: parsing, validation, and the noise schedule shared by all schedulers.
//!
//! The arithmetic follows diffusers 0.42 step by step, in the same precision: betas and ᾱ
//! (`alphas_cumprod`) are torch `float32` tensors (torch's `linspace` in `float32`, `cumprod`
//! accumulating in `float64`), timestep grids are numpy `float64`/`int64` computations.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::SchedulerError;

/// How betas are laid out over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// `linear`: betas linear from `beta_start` to `beta_end`.
    Linear,
    /// `scaled_linear`: square roots linear, then squared (Stable Diffusion, SDXL).
    ScaledLinear,
    /// `squaredcos_cap_v2`: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    SquaredCosCapV2,
}

/// How inference timesteps are picked among the training timesteps (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `leading`: `arange(n) * (T // n) + steps_offset`, reversed.
    Leading,
    /// `trailing`: `round(arange(T, 0, -T / n)) - 1`.
    Trailing,
    /// `linspace`: `linspace(0, T - 1, n)`, reversed.
    Linspace,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    /// `epsilon`: the added noise.
    Epsilon,
    /// `v_prediction`: the velocity `√ᾱ·ε − √(1−ᾱ)·x₀`.
    VPrediction,
    /// `sample` (or `original_sample`): the clean sample x₀.
    Sample,
}

/// Last sigma of the Euler schedule (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSigmas {
    /// `zero`: the last step lands on σ = 0.
    Zero,
    /// `sigma_min`: the last step lands on the training schedule's smallest σ.
    SigmaMin,
}

/// A diffusers `scheduler_config.json`.
///
/// Fields absent from the file take diffusers' defaults; where the defaults differ between
/// scheduler classes (`timestep_spacing`, `set_alpha_to_one`, `clip_sample`) the field is an
/// `Option` resolved by the scheduler. Unknown keys are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `EulerDiscreteScheduler`.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Number of training timesteps T.
    #[serde(default = "default_num_train_timesteps")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    /// Explicit betas, overriding `beta_schedule`.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// `leading`, `trailing` or `linspace` (default: `linspace` for Euler, `leading` for DDIM).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Offset added to `leading` timesteps.
    #[serde(default)]
    pub steps_offset: usize,
    /// DDIM: whether the step after the last uses ᾱ = 1 (default true) or ᾱ₀.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// Euler: `linear` interpolation of σ(t) (`log_linear` is not supported).
    #[serde(default = "default_interpolation_type")]
    pub interpolation_type: String,
    /// Euler: Karras sigmas (not supported; true is an error).
    #[serde(default)]
    pub use_karras_sigmas: bool,
    /// Euler: exponential sigmas (not supported; true is an error).
    #[serde(default)]
    pub use_exponential_sigmas: bool,
    /// Euler: beta sigmas (not supported; true is an error).
    #[serde(default)]
    pub use_beta_sigmas: bool,
    /// Euler: `zero` or `sigma_min`.
    #[serde(default = "default_final_sigmas_type")]
    pub final_sigmas_type: String,
    /// Euler: `discrete` or `continuous`.
    #[serde(default = "default_timestep_type")]
    pub timestep_type: String,
    /// DDIM: clamp predicted x₀ to ±`clip_sample_range` (default true).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: clamp range for `clip_sample`.
    #[serde(default = "default_clip_sample_range")]
    pub clip_sample_range: f64,
    /// DDIM: dynamic thresholding (not supported; true is an error).
    #[serde(default)]
    pub thresholding: bool,
    /// Zero-terminal-SNR rescaling (not supported; true is an error).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// DPM-Solver: `midpoint` or `heun` (the second-order update's form).
    #[serde(default = "default_solver_type")]
    pub solver_type: String,
    /// DPM-Solver: first-order last step when there are fewer than 15 steps (default true).
    #[serde(default = "default_true")]
    pub lower_order_final: bool,
    /// DPM-Solver: always a first-order last step.
    #[serde(default)]
    pub euler_at_final: bool,
    /// DPM-Solver: lower bound of λ(t) = log(αₜ/σₜ) that limits the largest timestep; `null` (or
    /// `-Infinity`, as diffusers writes it) is no bound.
    #[serde(default)]
    pub lambda_min_clipped: Option<f64>,
    /// DPM-Solver: `learned` / `learned_range` variance outputs (not supported).
    #[serde(default)]
    pub variance_type: Option<String>,
    /// DPM-Solver: λ-uniform sigmas (not supported; true is an error).
    #[serde(default)]
    pub use_lu_lambdas: bool,
    /// DPM-Solver: flow-matching sigmas (not supported; true is an error).
    #[serde(default)]
    pub use_flow_sigmas: bool,
    /// Karras σ schedule: smallest σ (default: the training schedule's).
    #[serde(default)]
    pub sigma_min: Option<f64>,
    /// Karras σ schedule: largest σ (default: the training schedule's).
    #[serde(default)]
    pub sigma_max: Option<f64>,
    /// File the configuration was read from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn default_num_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".to_string()
}
fn default_prediction_type() -> String {
    "epsilon".to_string()
}
fn default_interpolation_type() -> String {
    "linear".to_string()
}
fn default_final_sigmas_type() -> String {
    "zero".to_string()
}
fn default_timestep_type() -> String {
    "discrete".to_string()
}
fn default_solver_type() -> String {
    "midpoint".to_string()
}
fn default_true() -> bool {
    true
}
fn default_clip_sample_range() -> f64 {
    1.0
}

impl SchedulerConfig {
    /// Reads and validates a `scheduler_config.json`.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SchedulerError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedulerError::Io {
            file: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&text, Some(path))
    }

    /// Parses and validates configuration JSON; `source` names the file in errors.
    pub fn from_json_str(text: &str, source: Option<&Path>) -> Result<Self, SchedulerError> {
        let file = source.map_or_else(
            || "<scheduler config>".to_string(),
            |p| p.display().to_string(),
        );
        // Python's json module writes an unbounded `lambda_min_clipped` as `-Infinity`, which is
        // not JSON; read it as `null` (no bound).
        let parsed = serde_json::from_str(text).or_else(|first| {
            if text.contains("-Infinity") {
                serde_json::from_str(&text.replace("-Infinity", "null")).map_err(|_| first)
            } else {
                Err(first)
            }
        });
        let mut config: Self = parsed.map_err(|source| SchedulerError::Json { file, source })?;
        config.source = source.map(Path::to_path_buf);
        config.validate()?;
        Ok(config)
    }

    /// Checks every key whose value must come from a fixed set, and the numeric ranges.
    pub fn validate(&self) -> Result<(), SchedulerError> {
        self.beta_schedule()?;
        self.prediction()?;
        if let Some(s) = &self.timestep_spacing {
            parse_spacing(s).ok_or_else(|| self.invalid("timestep_spacing", s))?;
        }
        self.final_sigmas()?;
        if !matches!(self.interpolation_type.as_str(), "linear" | "log_linear") {
            return Err(self.invalid("interpolation_type", &self.interpolation_type));
        }
        if !matches!(self.timestep_type.as_str(), "discrete" | "continuous") {
            return Err(self.invalid("timestep_type", &self.timestep_type));
        }
        if !matches!(self.solver_type.as_str(), "midpoint" | "heun") {
            return Err(self.invalid("solver_type", &self.solver_type));
        }
        if self.num_train_timesteps < 2 {
            return Err(self.invalid("num_train_timesteps", &self.num_train_timesteps.to_string()));
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                return Err(self.invalid(
                    "trained_betas",
                    &format!(
                        "{} values for {} timesteps",
                        b.len(),
                        self.num_train_timesteps
                    ),
                ));
            }
        }
        if self.rescale_betas_zero_snr {
            return Err(self.unsupported("rescale_betas_zero_snr", "true"));
        }
        Ok(())
    }

    /// Name of the source file for error messages.
    pub(crate) fn file(&self) -> String {
        self.source.as_ref().map_or_else(
            || "<scheduler config>".to_string(),
            |p| p.display().to_string(),
        )
    }

    /// An error for a key whose value is not recognised.
    pub(crate) fn invalid(&self, key: &str, value: &str) -> SchedulerError {
        SchedulerError::InvalidValue {
            file: self.file(),
            key: key.to_string(),
            value: value.to_string(),
        }
    }

    /// An error for a recognised setting this implementation does not support.
    pub(crate) fn unsupported(&self, key: &str, value: &str) -> SchedulerError {
        SchedulerError::Unsupported {
            file: self.file(),
            key: key.to_string(),
            value: value.to_string(),
        }
    }

    /// The parsed `beta_schedule`.
    pub fn beta_schedule(&self) -> Result<BetaSchedule, SchedulerError> {
        match self.beta_schedule.as_str() {
            "linear" => Ok(BetaSchedule::Linear),
            "scaled_linear" => Ok(BetaSchedule::ScaledLinear),
            "squaredcos_cap_v2" => Ok(BetaSchedule::SquaredCosCapV2),
            other => Err(self.invalid("beta_schedule", other)),
        }
    }

    /// The parsed `prediction_type`.
    pub fn prediction(&self) -> Result<PredictionType, SchedulerError> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" | "original_sample" => Ok(PredictionType::Sample),
            other => Err(self.invalid("prediction_type", other)),
        }
    }

    /// The parsed `timestep_spacing`, or `default` when the key is absent.
    pub fn spacing_or(&self, default: TimestepSpacing) -> Result<TimestepSpacing, SchedulerError> {
        match &self.timestep_spacing {
            None => Ok(default),
            Some(s) => parse_spacing(s).ok_or_else(|| self.invalid("timestep_spacing", s)),
        }
    }

    /// The parsed `final_sigmas_type`.
    pub fn final_sigmas(&self) -> Result<FinalSigmas, SchedulerError> {
        match self.final_sigmas_type.as_str() {
            "zero" => Ok(FinalSigmas::Zero),
            "sigma_min" => Ok(FinalSigmas::SigmaMin),
            other => Err(self.invalid("final_sigmas_type", other)),
        }
    }

    /// The training betas as diffusers' `float32` tensor.
    pub fn betas(&self) -> Result<Vec<f32>, SchedulerError> {
        let n = self.num_train_timesteps;
        if let Some(b) = &self.trained_betas {
            return Ok(b.iter().map(|&x| x as f32).collect());
        }
        Ok(match self.beta_schedule()? {
            BetaSchedule::Linear => torch_linspace_f32(self.beta_start, self.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect()
            }
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                    })
                    .collect()
            }
        })
    }

    /// ᾱ = cumprod(1 − β) as diffusers' `float32` tensor (torch accumulates in `float64`).
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>, SchedulerError> {
        let mut acc = 1.0f64;
        Ok(self
            .betas()?
            .into_iter()
            .map(|b| {
                acc *= f64::from(1.0f32 - b);
                acc as f32
            })
            .collect())
    }
}

fn parse_spacing(s: &str) -> Option<TimestepSpacing> {
    match s {
        "leading" => Some(TimestepSpacing::Leading),
        "trailing" => Some(TimestepSpacing::Trailing),
        "linspace" => Some(TimestepSpacing::Linspace),
        _ => None,
    }
}

/// `torch.linspace(start, end, n, dtype=float32)` as torch's scalar CPU kernel computes it.
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// `np.linspace(0, stop, n)` in `float64`, ascending.
pub(crate) fn np_linspace(stop: f64, n: usize) -> Vec<f64> {
    let mut v = np_linspace_desc(stop, n);
    v.reverse();
    v
}

/// `np.linspace(0, stop, n)` in `float64`, reversed (largest first).
fn np_linspace_desc(stop: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![0.0];
    }
    let step = stop / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step).collect();
    v[n - 1] = stop;
    v.reverse();
    v
}

/// `np.arange(t, 0, -t / n)` in `float64`, as numpy fills it; `None` if numpy would not return
/// exactly `n` values (diffusers then yields a wrong number of timesteps).
pub(crate) fn np_arange_trailing(t: usize, n: usize) -> Option<Vec<f64>> {
    let start = t as f64;
    let step = -(t as f64 / n as f64);
    let len = ((0.0 - start) / step).ceil();
    if len != n as f64 {
        return None;
    }
    let delta = (start + step) - start;
    Some((0..n).map(|i| start + i as f64 * delta).collect())
}

/// The inference timesteps as diffusers' schedulers compute them before their final cast,
/// largest first. `float_grid` selects Euler's `float32` grid (fractional `linspace` values kept)
/// rather than DDIM's rounded `int64` grid.
pub(crate) fn inference_timesteps(
    config: &SchedulerConfig,
    spacing: TimestepSpacing,
    num_steps: usize,
    float_grid: bool,
) -> Result<Vec<f64>, SchedulerError> {
    let t = config.num_train_timesteps;
    if num_steps == 0 {
        return Err(SchedulerError::ZeroSteps);
    }
    if num_steps > t {
        return Err(SchedulerError::TooManySteps {
            num_steps,
            num_train_timesteps: t,
        });
    }
    let steps: Vec<f64> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = t / num_steps;
            (0..num_steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange_trailing(t, num_steps)
            .ok_or_else(|| {
                config.unsupported(
                    "timestep_spacing",
                    &format!(
                        "trailing with {num_steps} steps (diffusers yields a different count)"
                    ),
                )
            })?
            .into_iter()
            .map(|x| x.round_ties_even() - 1.0)
            .collect(),
        TimestepSpacing::Linspace => {
            let grid = np_linspace_desc((t - 1) as f64, num_steps);
            if float_grid {
                grid.into_iter().map(|x| f64::from(x as f32)).collect()
            } else {
                grid.into_iter().map(f64::round_ties_even).collect()
            }
        }
    };
    if let Some(&bad) = steps.iter().find(|&&s| s < 0.0 || s > (t - 1) as f64) {
        return Err(config.invalid(
            "steps_offset",
            &format!("{} (timestep {bad} is outside 0..{t})", config.steps_offset),
        ));
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> SchedulerConfig {
        let text = format!(
            r#"{{"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1 {extra}}}"#
        );
        SchedulerConfig::from_json_str(&text, Some(Path::new("scheduler_config.json")))
            .expect("valid config")
    }

    #[test]
    fn spacings_match_numpy() {
        let c = config("");
        let grid = |s, n, f| inference_timesteps(&c, s, n, f).expect("grid");
        assert_eq!(
            grid(TimestepSpacing::Leading, 4, true),
            [751.0, 501.0, 251.0, 1.0]
        );
        assert_eq!(
            grid(TimestepSpacing::Trailing, 7, false),
            [999.0, 856.0, 713.0, 570.0, 428.0, 285.0, 142.0]
        );
        assert_eq!(
            grid(TimestepSpacing::Trailing, 3, true),
            [999.0, 666.0, 332.0]
        );
        assert_eq!(
            grid(TimestepSpacing::Linspace, 7, false),
            [999.0, 832.0, 666.0, 500.0, 333.0, 166.0, 0.0]
        );
        assert_eq!(
            grid(TimestepSpacing::Linspace, 7, true),
            [999.0, 832.5, 666.0, 499.5, 333.0, 166.5, 0.0]
        );
        assert_eq!(grid(TimestepSpacing::Linspace, 1, true), [0.0]);
    }

    #[test]
    fn trailing_count_mismatch_is_an_error() {
        let c = config("");
        assert!(inference_timesteps(&c, TimestepSpacing::Trailing, 61, true).is_err());
    }

    #[test]
    fn bad_values_name_key_and_file() {
        let err = SchedulerConfig::from_json_str(
            r#"{"beta_schedule": "cubic"}"#,
            Some(Path::new("sched/scheduler_config.json")),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("beta_schedule") && msg.contains("sched/scheduler_config.json"),
            "{msg}"
        );
        for (key, json) in [
            ("prediction_type", r#"{"prediction_type": "x"}"#),
            ("timestep_spacing", r#"{"timestep_spacing": "x"}"#),
            ("final_sigmas_type", r#"{"final_sigmas_type": "x"}"#),
            (
                "rescale_betas_zero_snr",
                r#"{"rescale_betas_zero_snr": true}"#,
            ),
        ] {
            let msg = SchedulerConfig::from_json_str(json, None)
                .unwrap_err()
                .to_string();
            assert!(msg.contains(key), "{msg}");
        }
    }

    #[test]
    fn bad_json_names_the_file() {
        let err =
            SchedulerConfig::from_json_str("{ nope", Some(Path::new("x/scheduler_config.json")))
                .unwrap_err();
        assert!(matches!(err, SchedulerError::Json { .. }));
        assert!(err.to_string().contains("x/scheduler_config.json"), "{err}");
        let err = SchedulerConfig::from_file("/nonexistent/scheduler_config.json").unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/scheduler_config.json"),
            "{err}"
        );
    }

    #[test]
    fn zero_and_too_many_steps_are_errors() {
        let c = config("");
        assert!(matches!(
            inference_timesteps(&c, TimestepSpacing::Leading, 0, true),
            Err(SchedulerError::ZeroSteps)
        ));
        assert!(matches!(
            inference_timesteps(&c, TimestepSpacing::Leading, 1001, true),
            Err(SchedulerError::TooManySteps { .. })
        ));
    }
}
