//! Diffusion schedulers: the denoising loop's bookkeeping between UNet calls.
//!
//! A [`Scheduler`] is built for a fixed number of inference steps. Its updates are element-wise
//! linear combinations of tensors of the latent's shape, computed with tensor ops in `f32` on the
//! tensors' device, so on a GPU the latents never leave it (no host round trip per step). The
//! pipeline does:
//!
//! ```text
//! latents = noise * init_noise_sigma()
//! for i in 0..timesteps().len():
//!     model_in = model_input(latents, i)
//!     model_out = unet(model_in, timesteps()[i])        // plus classifier-free guidance
//!     latents = advance(model_out, i, latents, noise_for_step_if(needs_noise()))
//! ```
//!
//! The slice methods ([`Scheduler::scale_model_input`], [`Scheduler::step`],
//! [`Scheduler::add_noise`]) run the same code on flat host `f32` data. Each scheduler reproduces
//! its diffusers 0.42 counterpart: schedules in diffusers' own precision (`float32` where diffusers
//! uses torch `float32`, `float64` where it uses numpy), updates in `float32` within a few ulps. Samplers: Euler discrete, DDIM,
//! DPM-Solver++ 2M (plain and Karras σ) and Euler ancestral (stochastic: it takes one unit
//! Gaussian noise sample per step from the caller). Image-to-image starts the loop at a later step
//! from [`Scheduler::add_noise`] of the encoded image.

mod config;
mod ddim;
mod dpmpp;
mod euler;
mod euler_ancestral;

mod lincomb;

use std::str::FromStr;

use pcpp_kernels::{KernelError, Tensor};

pub(crate) use lincomb::lin;

pub use config::{BetaSchedule, FinalSigmas, PredictionType, SchedulerConfig, TimestepSpacing};
pub use ddim::DdimScheduler;
pub use dpmpp::DpmSolverPp2MScheduler;
pub use euler::EulerDiscreteScheduler;
pub use euler_ancestral::EulerAncestralScheduler;

/// Errors from scheduler configuration, construction and stepping.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The configuration file could not be read.
    #[error("cannot read {file}: {source}")]
    Io {
        /// The file.
        file: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is not valid JSON (or a key has the wrong JSON type).
    #[error("invalid scheduler config {file}: {source}")]
    Json {
        /// The file.
        file: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A configuration key holds an unknown value.
    #[error("{file}: key `{key}` has invalid value {value:?}")]
    InvalidValue {
        /// The configuration file.
        file: String,
        /// The key at fault.
        key: String,
        /// The offending value.
        value: String,
    },
    /// A configuration key selects a feature this implementation does not support.
    #[error("{file}: key `{key}` = {value} is not supported")]
    Unsupported {
        /// The configuration file.
        file: String,
        /// The key at fault.
        key: String,
        /// The offending value.
        value: String,
    },
    /// An unknown scheduler name was given to [`SchedulerKind::from_str`].
    #[error(
        "unknown scheduler {0:?} (expected one of: euler, ddim, dpmpp-2m, dpmpp-2m-karras, euler-a)"
    )]
    UnknownKind(String),
    /// Zero inference steps were requested.
    #[error("the number of inference steps must be at least 1")]
    ZeroSteps,
    /// More inference steps than training timesteps were requested.
    #[error("{num_steps} inference steps exceed the {num_train_timesteps} training timesteps")]
    TooManySteps {
        /// Requested steps.
        num_steps: usize,
        /// `num_train_timesteps` of the config.
        num_train_timesteps: usize,
    },
    /// A step index past the last step.
    #[error("step {step} is out of range for {num_steps} steps")]
    StepOutOfRange {
        /// The step index given.
        step: usize,
        /// Number of steps of the schedule.
        num_steps: usize,
    },
    /// Two slices that must have the same length do not.
    #[error("{what} has {actual} elements, expected {expected}")]
    LengthMismatch {
        /// Which argument.
        what: &'static str,
        /// Its length.
        actual: usize,
        /// The sample's length.
        expected: usize,
    },
    /// A stochastic scheduler's `step` was called without noise.
    #[error("this scheduler needs a noise sample for every step")]
    MissingNoise,
    /// A tensor op of an update failed (e.g. operands on different devices).
    #[error("{0}")]
    Tensor(#[from] KernelError),
}

/// One diffusion sampler, set up for a fixed number of inference steps.
///
/// Steps are indexed `0..timesteps().len()` and must be taken in order (multistep samplers keep
/// state between calls). Tensors passed to one call have the same shape and device; results are
/// `f32` on that device.
pub trait Scheduler: Send {
    /// The timestep passed to the UNet at each step (integers for discrete schedules, stored as
    /// `f64`; Euler's are `float32` values in diffusers).
    fn timesteps(&self) -> &[f64];

    /// Factor that turns unit Gaussian noise into the initial latents (1 unless the schedule
    /// works in σ units, like Euler).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// The UNet input for step `step`: the sample itself unless the schedule scales it (Euler
    /// divides by √(σ² + 1)).
    fn model_input(&self, sample: &Tensor, step: usize) -> Result<Tensor, SchedulerError> {
        check_shapes(step, self.num_steps(), sample, sample, "sample")?;
        Ok(sample.to_dtype(pcpp_kernels::DType::F32)?)
    }

    /// Advances `sample` by step `step` given the (guided) model output; returns the new sample.
    /// `noise` is a unit Gaussian sample of the same shape, required when [`Self::needs_noise`]
    /// is true and ignored otherwise.
    fn advance(
        &mut self,
        model_output: &Tensor,
        step: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor, SchedulerError>;

    /// Noises clean latents `original` to the noise level of step `step`, where an image-to-image
    /// loop starts (diffusers' `add_noise` with the begin index set to `step`). `noise` is unit
    /// Gaussian of the same shape.
    fn noised(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step: usize,
    ) -> Result<Tensor, SchedulerError>;

    /// Whether [`Self::advance`] needs fresh noise (ancestral / stochastic samplers).
    fn needs_noise(&self) -> bool {
        false
    }

    /// Number of inference steps.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// [`Self::model_input`] on flat host data.
    fn scale_model_input(&self, sample: &[f32], step: usize) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), sample, sample, "sample")?;
        Ok(self.model_input(&flat(sample)?, step)?.to_vec_f32()?)
    }

    /// [`Self::advance`] on flat host data.
    fn step(
        &mut self,
        model_output: &[f32],
        step: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), sample, model_output, "model_output")?;
        if let Some(n) = noise {
            check_step(step, self.num_steps(), sample, n, "noise")?;
        }
        let noise = noise.map(flat).transpose()?;
        Ok(self
            .advance(&flat(model_output)?, step, &flat(sample)?, noise.as_ref())?
            .to_vec_f32()?)
    }

    /// [`Self::noised`] on flat host data.
    fn add_noise(
        &self,
        original: &[f32],
        noise: &[f32],
        step: usize,
    ) -> Result<Vec<f32>, SchedulerError> {
        check_step(step, self.num_steps(), original, noise, "noise")?;
        Ok(self
            .noised(&flat(original)?, &flat(noise)?, step)?
            .to_vec_f32()?)
    }
}

/// A 1-d host tensor of `v`.
fn flat(v: &[f32]) -> Result<Tensor, SchedulerError> {
    Ok(Tensor::from_vec(&[v.len()], v.to_vec())?)
}

/// The schedulers that can be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// Euler discrete (`EulerDiscreteScheduler`, SDXL's default).
    Euler,
    /// DDIM with η = 0 (`DDIMScheduler`).
    Ddim,
    /// DPM-Solver++ 2M (`DPMSolverMultistepScheduler`, `dpmsolver++`, order 2).
    DpmPp2M,
    /// DPM-Solver++ 2M on the Karras σ schedule (`use_karras_sigmas = true`).
    DpmPp2MKarras,
    /// Euler ancestral (`EulerAncestralDiscreteScheduler`); needs noise at every step.
    EulerAncestral,
}

impl SchedulerKind {
    /// The kind matching a diffusers `_class_name`, if supported.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "EulerDiscreteScheduler" => Some(Self::Euler),
            "DDIMScheduler" => Some(Self::Ddim),
            "DPMSolverMultistepScheduler" => Some(Self::DpmPp2M),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            _ => None,
        }
    }

    /// The kind a folder's scheduler config names, taking `use_karras_sigmas` into account for
    /// DPM-Solver (a folder saved with Karras DPM-Solver++ gets [`Self::DpmPp2MKarras`]).
    pub fn from_config(config: &SchedulerConfig) -> Option<Self> {
        match Self::from_class_name(config.class_name.as_deref()?)? {
            Self::DpmPp2M if config.use_karras_sigmas => Some(Self::DpmPp2MKarras),
            kind => Some(kind),
        }
    }

    /// The command-line name (`euler`, `ddim`, `dpmpp-2m`, `dpmpp-2m-karras`, `euler-a`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::Ddim => "ddim",
            Self::DpmPp2M => "dpmpp-2m",
            Self::DpmPp2MKarras => "dpmpp-2m-karras",
            Self::EulerAncestral => "euler-a",
        }
    }

    /// The sampler's usual display name (`Euler`, `DDIM`, `DPM++ 2M`, `DPM++ 2M Karras`,
    /// `Euler a`), as written into image metadata.
    pub fn label(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::Ddim => "DDIM",
            Self::DpmPp2M => "DPM++ 2M",
            Self::DpmPp2MKarras => "DPM++ 2M Karras",
            Self::EulerAncestral => "Euler a",
        }
    }

    /// Whether the sampler draws fresh noise at every step.
    pub fn is_stochastic(self) -> bool {
        self == Self::EulerAncestral
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// Parses a command-line name (case-insensitive; `_` may stand for `-`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "euler" => Ok(Self::Euler),
            "ddim" => Ok(Self::Ddim),
            "dpmpp-2m" => Ok(Self::DpmPp2M),
            "dpmpp-2m-karras" => Ok(Self::DpmPp2MKarras),
            "euler-a" | "euler-ancestral" => Ok(Self::EulerAncestral),
            _ => Err(SchedulerError::UnknownKind(s.to_string())),
        }
    }
}

/// Builds a scheduler of `kind` from `config` for `num_steps` inference steps.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    num_steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    Ok(match kind {
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config, num_steps)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, num_steps)?),
        SchedulerKind::DpmPp2M => Box::new(DpmSolverPp2MScheduler::new(config, num_steps, false)?),
        SchedulerKind::DpmPp2MKarras => {
            Box::new(DpmSolverPp2MScheduler::new(config, num_steps, true)?)
        }
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::new(config, num_steps)?),
    })
}

/// Checks a step index and that `other` has as many elements as `sample`.
pub(crate) fn check_step(
    step: usize,
    num_steps: usize,
    sample: &[f32],
    other: &[f32],
    what: &'static str,
) -> Result<(), SchedulerError> {
    if step >= num_steps {
        return Err(SchedulerError::StepOutOfRange { step, num_steps });
    }
    if other.len() != sample.len() {
        return Err(SchedulerError::LengthMismatch {
            what,
            actual: other.len(),
            expected: sample.len(),
        });
    }
    Ok(())
}

/// Checks a step index and that `other` has the shape of `sample`.
pub(crate) fn check_shapes(
    step: usize,
    num_steps: usize,
    sample: &Tensor,
    other: &Tensor,
    what: &'static str,
) -> Result<(), SchedulerError> {
    if step >= num_steps {
        return Err(SchedulerError::StepOutOfRange { step, num_steps });
    }
    if other.shape() != sample.shape() {
        return Err(SchedulerError::LengthMismatch {
            what,
            actual: other.numel(),
            expected: sample.numel(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [SchedulerKind; 5] = [
        SchedulerKind::Euler,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2M,
        SchedulerKind::DpmPp2MKarras,
        SchedulerKind::EulerAncestral,
    ];

    #[test]
    fn names_round_trip() {
        for kind in ALL {
            assert_eq!(kind.name().parse::<SchedulerKind>().ok(), Some(kind));
        }
        assert_eq!(
            "euler_a".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::EulerAncestral)
        );
    }

    #[test]
    fn euler_ancestral_needs_noise() {
        let config = SchedulerConfig::from_json_str("{}", None).expect("default config");
        let mut s = build(SchedulerKind::EulerAncestral, &config, 3).expect("build");
        assert!(s.needs_noise());
        assert!(matches!(
            s.step(&[0.0; 4], 0, &[0.0; 4], None),
            Err(SchedulerError::MissingNoise)
        ));
        assert!(s.step(&[0.0; 4], 0, &[0.0; 4], Some(&[0.0; 3])).is_err());
        assert!(s.step(&[0.0; 4], 0, &[0.0; 4], Some(&[0.0; 4])).is_ok());
    }

    #[test]
    fn dpm_config_with_infinity_parses() {
        let config = SchedulerConfig::from_json_str(
            r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                "use_karras_sigmas": true}"#,
            None,
        )
        .expect("parses");
        assert_eq!(config.lambda_min_clipped, None);
        assert_eq!(
            SchedulerKind::from_config(&config),
            Some(SchedulerKind::DpmPp2MKarras)
        );
        assert!(build(SchedulerKind::DpmPp2M, &config, 5).is_ok());
    }

    #[test]
    fn kind_parses() {
        assert_eq!(
            "euler".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::Euler)
        );
        assert_eq!(
            "DDIM".parse::<SchedulerKind>().ok(),
            Some(SchedulerKind::Ddim)
        );
        assert!(matches!(
            "dpm".parse::<SchedulerKind>(),
            Err(SchedulerError::UnknownKind(_))
        ));
    }

    #[test]
    fn build_rejects_zero_steps_and_bad_input() {
        let config = SchedulerConfig::from_json_str("{}", None).expect("default config");
        for kind in ALL {
            assert!(matches!(
                build(kind, &config, 0),
                Err(SchedulerError::ZeroSteps)
            ));
            let mut s = build(kind, &config, 2).expect("build");
            assert!(s.scale_model_input(&[0.0; 4], 2).is_err());
            assert!(s.step(&[0.0; 3], 0, &[0.0; 4], None).is_err());
            assert!(s.step(&[0.0; 4], 5, &[0.0; 4], None).is_err());
        }
    }

    #[test]
    fn euler_rejects_unsupported_sigmas() {
        let config = SchedulerConfig::from_json_str(
            r#"{"use_karras_sigmas": true}"#,
            Some(std::path::Path::new("scheduler_config.json")),
        )
        .expect("parses");
        let err = build(SchedulerKind::Euler, &config, 4)
            .err()
            .expect("error");
        assert!(err.to_string().contains("use_karras_sigmas"), "{err}");
    }
}
