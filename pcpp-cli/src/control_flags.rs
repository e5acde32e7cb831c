//! The ControlNet flags of `generate` (diffusers' `StableDiffusionXLControlNetPipeline`):
//! `--controlnet DIR` (repeat for several: their residuals sum, as `MultiControlNetModel`),
//! `--control-image PNG`, `--control-scale`, `--control-start`, `--control-end` (one value for all
//! nets or one per net). Validated before any model work; the control images are read here (RGB,
//! resized to the output size as diffusers' control image processor does) and handed to the
//! library as [`ControlInput`]s.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use pcpp_sdxl::{control_image_from_rgb8, ControlGuidance, ControlInput, ControlNetConfig};

/// The ControlNet flags.
#[derive(Debug, Clone, Default, Args)]
pub struct ControlFlags {
    /// A diffusers SDXL ControlNet folder (config.json + diffusion_pytorch_model[.fp16].safetensors);
    /// repeat the flag for several (their residuals sum).
    #[arg(long = "controlnet", value_name = "DIR")]
    pub controlnets: Vec<PathBuf>,
    /// The control image (PNG), converted to RGB and resized to the output size (Lanczos) if it
    /// differs; one for every --controlnet, or one per --controlnet in order.
    #[arg(long = "control-image", value_name = "PNG")]
    pub images: Vec<PathBuf>,
    /// ControlNet conditioning scale (default 1.0): one for all nets or one per net.
    #[arg(long = "control-scale", value_name = "S")]
    pub scales: Vec<f32>,
    /// Fraction of the steps before which a ControlNet does not act (default 0.0): one for all
    /// nets or one per net.
    #[arg(long = "control-start", value_name = "F")]
    pub starts: Vec<f64>,
    /// Fraction of the steps after which a ControlNet does not act (default 1.0): one for all
    /// nets or one per net.
    #[arg(long = "control-end", value_name = "F")]
    pub ends: Vec<f64>,
}

/// Validated ControlNet settings: the folders and one input per folder.
pub struct ControlPlan {
    /// The `--controlnet` folders.
    pub dirs: Vec<PathBuf>,
    /// One control image and guidance per folder.
    pub inputs: Vec<ControlInput>,
}

/// `vals` for `n` nets: one value for all, one per net, or `default` when none is given.
fn per_net<T: Copy + std::fmt::Display>(
    flag: &str,
    vals: &[T],
    n: usize,
    default: T,
) -> Result<Vec<T>> {
    match vals.len() {
        0 => Ok(vec![default; n]),
        1 => Ok(vec![vals[0]; n]),
        k if k == n => Ok(vals.to_vec()),
        k => bail!("{flag} is given {k} times for {n} --controlnet folders: give it once (for all) or once per --controlnet"),
    }
}

/// Reads a control image as RGB, resized to `height × width` (Lanczos) when its size differs.
fn read_image(path: &Path, height: usize, width: usize) -> Result<pcpp_kernels::Tensor> {
    let img = image::open(path)
        .with_context(|| format!("--control-image {}: cannot read image", path.display()))?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    let img = if (h, w) == (height, width) {
        img
    } else {
        eprintln!(
            "note: --control-image {}: {w}×{h} resized to the output size {width}×{height}",
            path.display()
        );
        image::imageops::resize(
            &img,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        )
    };
    Ok(control_image_from_rgb8(img.as_raw(), height, width)?)
}

impl ControlFlags {
    /// Whether any ControlNet flag is given.
    pub fn any(&self) -> bool {
        !(self.controlnets.is_empty()
            && self.images.is_empty()
            && self.scales.is_empty()
            && self.starts.is_empty()
            && self.ends.is_empty())
    }

    /// Checks the flags and reads the control images for an output of `height × width`;
    /// `None` without `--controlnet`.
    pub fn validate(
        &self,
        height: usize,
        width: usize,
        init_image: bool,
    ) -> Result<Option<ControlPlan>> {
        let n = self.controlnets.len();
        if n == 0 {
            for (flag, given) in [
                ("--control-image", !self.images.is_empty()),
                ("--control-scale", !self.scales.is_empty()),
                ("--control-start", !self.starts.is_empty()),
                ("--control-end", !self.ends.is_empty()),
            ] {
                if given {
                    bail!("{flag} needs --controlnet DIR");
                }
            }
            return Ok(None);
        }
        if init_image {
            bail!("--controlnet with --init-image is not supported (text-to-image only)");
        }
        for d in &self.controlnets {
            if !d.is_dir() {
                bail!("--controlnet {}: folder not found", d.display());
            }
            ControlNetConfig::from_file(&d.join("config.json"))
                .with_context(|| format!("--controlnet {}", d.display()))?;
        }
        let images = match self.images.len() {
            0 => bail!("--controlnet needs --control-image PNG"),
            1 => vec![self.images[0].clone(); n],
            k if k == n => self.images.clone(),
            k => bail!("--control-image is given {k} times for {n} --controlnet folders: give one (for all) or one per --controlnet"),
        };
        let scales = per_net("--control-scale", &self.scales, n, 1.0)?;
        let starts = per_net("--control-start", &self.starts, n, 0.0)?;
        let ends = per_net("--control-end", &self.ends, n, 1.0)?;
        let mut inputs = Vec::with_capacity(n);
        for (k, img) in images.iter().enumerate() {
            let guidance = ControlGuidance {
                scale: scales[k],
                start: starts[k],
                end: ends[k],
            };
            guidance.validate().map_err(|e| {
                anyhow::anyhow!(
                    "--control-scale/--control-start/--control-end of --controlnet {}: {e}",
                    self.controlnets[k].display()
                )
            })?;
            inputs.push(ControlInput {
                image: read_image(img, height, width)?,
                guidance,
            });
        }
        Ok(Some(ControlPlan {
            dirs: self.controlnets.clone(),
            inputs,
        }))
    }

    /// The folders' configs and weight-file sizes and the control images' bytes, for the
    /// start-up check that every rank runs the same ControlNets on the same images (the flags
    /// themselves, scales included, are in the arguments' fingerprint).
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for d in &self.controlnets {
            out.extend(std::fs::read(d.join("config.json")).unwrap_or_default());
            let mut sizes: Vec<(String, u64)> = std::fs::read_dir(d)
                .map(|it| {
                    it.flatten()
                        .map(|e| {
                            (
                                e.file_name().to_string_lossy().into_owned(),
                                e.metadata().map(|m| m.len()).unwrap_or(0),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            sizes.sort();
            out.extend(format!("{sizes:?}").into_bytes());
        }
        for i in &self.images {
            out.extend(std::fs::read(i).unwrap_or_default());
        }
        out
    }

    /// The ControlNet part of the PNG's `parameters` text (empty without `--controlnet`).
    pub fn metadata(&self, plan: Option<&ControlPlan>) -> String {
        let Some(plan) = plan else {
            return String::new();
        };
        let mut s = String::new();
        for (k, (dir, input)) in plan.dirs.iter().zip(&plan.inputs).enumerate() {
            let img = self.images.get(k).or(self.images.first());
            let g = input.guidance;
            s.push_str(&format!(
                ", ControlNet: {} (image {}, scale {}, start {}, end {})",
                dir.display(),
                img.map(|p| p.display().to_string()).unwrap_or_default(),
                g.scale,
                g.start,
                g.end
            ));
        }
        s
    }
}
