//! The product path of one rank: an SDXL pipeline folder loaded once (every model straight to the
//! rank's device, in the compute dtype), then any number of images, each from prompt to decoded
//! image with [`Generator::generate`].
//!
//! Rank 0 runs the text encoders (and, for image-to-image, the VAE encoder) and broadcasts the
//! conditioning to every rank (PCPP algorithm §7.11, §7.14: all ranks start from bit-identical
//! inputs); every rank runs the denoising loop ([`crate::denoise_with`]) on its band; rank 0
//! decodes the final latents. Non-finite values are caught where they first appear: in the
//! prompt embeddings, in the latents (by step) and in the decoded image.

use std::path::{Path, PathBuf};
use std::time::Instant;

use std::sync::Arc;

use pcpp_comm::{CommKind, Transport};
use pcpp_core::{LayerFactory, PatchRuntime, StepDriver};
use pcpp_kernels::{DType, Device, Tensor};

use crate::controlnet::{Control, ControlInput, ControlNet, ControlUnit};
use crate::denoise::{
    denoise_with, overflow_hint, DenoiseParams, DenoiseStart, Progress, StepNoise,
};
use crate::error::{Result, SdxlError};
use crate::lora::{ComponentLora, LoraComponent, LoraSet};
use crate::pipeline::{ModelIndex, Pipeline, PromptEmbeds, TextEncoders};
use crate::scheduler::SchedulerConfig;
use crate::unet::UNet;
use crate::unet_config::UNetConfig;
use crate::vae::{VaeConfig, VaeDecoder};
use crate::vae_encoder::VaeEncoder;
use crate::vae_parallel::{decode_runtime, decode_to_root};
use crate::wire;

/// Sizes of a pipeline folder read from its UNet and VAE configs, without weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelGeometry {
    /// The UNet's native latent size (`sample_size`).
    pub sample_size: usize,
    /// Latent channels the UNet takes.
    pub latent_channels: usize,
    /// Image pixels per latent pixel (`2^(len(vae.block_out_channels) − 1)`).
    pub vae_scale_factor: usize,
    /// The latent's height and width must be multiples of this (the UNet's down-sampling).
    pub latent_multiple: usize,
}

impl ModelGeometry {
    /// Reads `unet/config.json` and `vae/config.json` of a pipeline folder.
    pub fn load(dir: &Path) -> Result<ModelGeometry> {
        let unet = UNetConfig::from_file(&dir.join("unet").join("config.json"))?;
        let vae_path = dir.join("vae").join("config.json");
        let vae = VaeConfig::from_file(&vae_path)?;
        Ok(ModelGeometry {
            sample_size: unet.sample_size,
            latent_channels: unet.in_channels,
            vae_scale_factor: vae.scale_factor(),
            latent_multiple: unet.downsample_factor(),
        })
    }

    /// diffusers' default image size (`sample_size · vae_scale_factor`).
    pub fn default_size(&self) -> usize {
        self.sample_size * self.vae_scale_factor
    }

    /// Image sides must be multiples of this many pixels.
    pub fn pixel_multiple(&self) -> usize {
        self.vae_scale_factor * self.latent_multiple
    }

    /// The latent shape `[1, c, h/f, w/f]` of an `height × width` image.
    pub fn latent_shape(&self, height: usize, width: usize) -> [usize; 4] {
        [
            1,
            self.latent_channels,
            height / self.vae_scale_factor,
            width / self.vae_scale_factor,
        ]
    }
}

/// How a rank loads the pipeline.
#[derive(Clone, Copy)]
pub struct LoadOptions<'a> {
    /// Compute dtype of the UNet and the text encoders.
    pub dtype: DType,
    /// Where every model lives.
    pub device: Device,
    /// Load the text encoders (rank 0; other ranks receive the embeddings).
    pub encoders: bool,
    /// Load the serial VAE decoder (rank 0 of a run that decodes on one rank; a parallel decode
    /// loads its decoder with [`Generator::decode_in_parallel`] instead).
    pub decoder: bool,
    /// Also load the VAE encoder (image-to-image, rank 0).
    pub vae_encoder: bool,
    /// The VAE's dtype (`None`: [`vae_dtype`] of the config and `dtype`).
    pub vae_dtype: Option<DType>,
    /// LoRA adapters merged into the UNet's and the text encoders' weights as they load.
    pub lora: Option<&'a LoraSet>,
    /// ControlNet folders (diffusers `ControlNetModel`), loaded in `dtype` on `device` through
    /// the UNet's factory; each must fit the UNet. Several act together (their residuals sum).
    pub controlnets: &'a [PathBuf],
}

/// The dtype the VAE runs in for a run in `dtype`: a VAE whose config says `force_upcast` (SDXL's
/// overflows in f16) decodes in f32, as diffusers' SDXL pipelines do when they upcast it;
/// otherwise the run's dtype. An upcast VAE on a GPU lets its f32 convolutions use TF32 tensor
/// cores, as PyTorch (and so diffusers) does by default.
pub fn vae_dtype(config: &VaeConfig, dtype: DType) -> DType {
    if config.force_upcast && dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// The result of a loading thread; a panic becomes an error naming what was loading.
fn joined<T>(r: std::thread::Result<Result<Option<T>>>, what: &str) -> Result<Option<T>> {
    r.map_err(|_| SdxlError::Input(format!("internal: loading the {what} panicked")))?
}

/// `e` with the stage it happened in (e.g. a GPU out-of-memory error, which names the bytes asked
/// for, then also names the stage); non-finite errors already name theirs.
fn at_stage(stage: &str, e: SdxlError) -> SdxlError {
    match e {
        SdxlError::NonFinite { .. } => e,
        other => SdxlError::Input(format!("{stage}: {other}")),
    }
}

/// One rank's loaded pipeline.
pub struct Generator {
    /// The folder.
    pub dir: PathBuf,
    /// `model_index.json`.
    pub index: ModelIndex,
    /// Both text encoders (rank 0).
    pub text: Option<TextEncoders>,
    /// The UNet, built through the caller's layer factory.
    pub unet: UNet,
    /// The VAE decoder (rank 0).
    pub vae: Option<VaeDecoder>,
    /// The VAE encoder (rank 0, image-to-image).
    pub vae_encoder: Option<VaeEncoder>,
    /// The ControlNets, in the order of [`LoadOptions::controlnets`].
    pub controlnets: Vec<ControlNet>,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: SchedulerConfig,
    /// The dtype the UNet and text encoders compute in.
    pub dtype: DType,
    /// The VAE's dtype.
    pub vae_dtype: DType,
    /// Where the models live.
    pub device: Device,
    /// The runtime of a patch-parallel decode over every rank ([`Generator::decode_in_parallel`]).
    pub decode_runtime: Option<PatchRuntime>,
    /// Seconds of this rank's part of the last decode (`None` before the first, or on a rank that
    /// does not decode).
    last_decode_seconds: std::sync::Mutex<Option<f64>>,
}

/// One image to make.
pub struct ImageJob<'a> {
    /// The prompt.
    pub prompt: &'a str,
    /// The negative prompt (`None` or empty: none).
    pub negative: Option<&'a str>,
    /// Steps, guidance, sampler, micro-conditioning, graphs.
    pub params: &'a DenoiseParams,
    /// Unit Gaussian noise `[1, c, h, w]` (rank 0's is used; other ranks may pass any tensor of
    /// the same shape).
    pub noise: &'a Tensor,
    /// Image-to-image: the init image `[1, 3, H, W]` in `[-1, 1]` and the strength.
    pub init: Option<(&'a Tensor, f32)>,
    /// One control image and guidance per loaded ControlNet (none: the ControlNets are not used).
    pub control: &'a [ControlInput],
}

/// What rank 0 gets back from [`Generator::generate`].
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Final latents `[1, c, h, w]`, `f32` on the host.
    pub latents: Tensor,
    /// The decoded image `[1, 3, H, W]` in about `[-1, 1]`, `f32` on the host.
    pub image: Tensor,
    /// Whether the prompt or the negative prompt was cut to 77 tokens.
    pub truncated: bool,
    /// Seconds spent encoding the prompt (and init image), denoising and decoding, each ending
    /// with the device idle.
    pub seconds: StageSeconds,
    /// Host time of each denoising step.
    pub step_seconds: Vec<f64>,
}

/// Wall time per stage of one image.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct StageSeconds {
    /// Prompt encoding (and init-image encoding) plus the broadcast.
    pub encode: f64,
    /// The denoising loop.
    pub denoise: f64,
    /// The VAE decode and the copy of the image to the host.
    pub decode: f64,
}

impl Generator {
    /// Loads the folder's scheduler config, the UNet (through `factory`) and, as `opts` asks, the
    /// text encoders and the VAE, each straight to `opts.device`.
    pub fn load(
        dir: &Path,
        opts: &LoadOptions<'_>,
        factory: &dyn LayerFactory,
    ) -> Result<Generator> {
        let index = ModelIndex::load(dir)?;
        let scheduler = Pipeline::load_scheduler_config(dir)?;
        let vae_dir = dir.join("vae");
        let vae_config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let vae_dt = opts.vae_dtype.unwrap_or(vae_dtype(&vae_config, opts.dtype));
        if vae_dt == DType::F32 && opts.dtype != DType::F32 {
            pcpp_kernels::set_tf32(opts.device, true)?;
        }
        let (encoders, decoder) = (opts.encoders, opts.decoder);
        // The components load side by side: host reads and conversions overlap, uploads share
        // the device's stream.
        let (text, unet, vae, vae_encoder) = std::thread::scope(|s| {
            let text = s.spawn(|| {
                encoders
                    .then(|| TextEncoders::load_with_lora(dir, opts.dtype, opts.device, opts.lora))
                    .transpose()
            });
            let vae = s.spawn(|| {
                decoder
                    .then(|| VaeDecoder::load_on(&vae_dir, vae_dt, opts.device))
                    .transpose()
            });
            let enc = s.spawn(|| {
                (encoders && opts.vae_encoder)
                    .then(|| VaeEncoder::load_on(&vae_dir, vae_dt, opts.device))
                    .transpose()
            });
            let lora = opts
                .lora
                .map_or(ComponentLora::empty(LoraComponent::Unet), |l| {
                    l.for_component(LoraComponent::Unet)
                });
            let unet =
                UNet::load_with_lora(&dir.join("unet"), opts.dtype, opts.device, factory, lora);
            (
                joined(text.join(), "text encoders"),
                unet,
                joined(vae.join(), "VAE decoder"),
                joined(enc.join(), "VAE encoder"),
            )
        });
        let (text, unet, vae, vae_encoder) = (text?, unet?, vae?, vae_encoder?);
        let controlnets = opts
            .controlnets
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let net = ControlNet::load(d, opts.dtype, opts.device, factory, k)?;
                net.check_fits(&unet)?;
                let (cf, vf) = (1usize << net.config().up(), vae_config.scale_factor());
                if cf != vf {
                    return Err(SdxlError::config(
                        d.join("config.json"),
                        format!("the conditioning embedding (`conditioning_embedding_out_channels`) scales the control image down by {cf}, the VAE by {vf}: this ControlNet was not made for this model"),
                    ));
                }
                Ok(net)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Generator {
            dir: dir.to_path_buf(),
            index,
            text,
            unet,
            vae,
            vae_encoder,
            controlnets,
            scheduler,
            dtype: opts.dtype,
            vae_dtype: vae_dt,
            device: opts.device,
            decode_runtime: None,
            last_decode_seconds: std::sync::Mutex::new(None),
        })
    }

    /// Makes every rank of `world` decode its band of the final latents (an exact decode: every
    /// exchange synchronous, see [`crate::vae_parallel`]) and rank 0 gather the image: each rank loads the VAE decoder through the decode runtime of `latent_h × latent_w`
    /// latents. Collective over `world`.
    pub fn decode_in_parallel(
        &mut self,
        world: Arc<dyn Transport>,
        latent_h: usize,
        latent_w: usize,
    ) -> Result<()> {
        let vae_dir = self.dir.join("vae");
        let config = VaeConfig::from_file(&vae_dir.join("config.json"))?;
        let rt = decode_runtime(world, &config, latent_h, latent_w)?;
        self.vae = Some(VaeDecoder::load_with(
            &vae_dir,
            self.vae_dtype,
            self.device,
            rt.factory(),
        )?);
        self.decode_runtime = Some(rt);
        Ok(())
    }

    /// The bytes of the last parallel decode by kind (`None` for a decode on one rank).
    pub fn decode_traffic(&self) -> Option<pcpp_core::Traffic> {
        self.decode_runtime.as_ref().map(|rt| rt.report().total)
    }

    /// Seconds of this rank's part of the last decode (`None` on a rank that did not decode).
    pub fn decode_seconds(&self) -> Option<f64> {
        self.last_decode_seconds.lock().ok().and_then(|s| *s)
    }

    /// One image on every rank of `world` (all ranks call this together, with the same job
    /// settings): rank 0 encodes and broadcasts the conditioning, every rank denoises through
    /// `driver`, rank 0 decodes. Returns the image on rank 0 and `None` elsewhere.
    pub fn generate(
        &self,
        world: &dyn Transport,
        driver: &dyn StepDriver,
        job: &ImageJob<'_>,
        progress: Progress<'_>,
    ) -> Result<Option<GeneratedImage>> {
        let rank0 = world.rank() == 0;
        let t0 = Instant::now();
        let (embeds, noise, init_latents, truncated) = if rank0 {
            let (e, l) = self
                .encode(job)
                .map_err(|e| at_stage("prompt encoding", e))?;
            let truncated = e.truncated;
            (e, job.noise.clone(), l, truncated)
        } else {
            let n = job.noise.clone();
            (PromptEmbeds::empty(), n, None, false)
        };
        let (embeds, noise, init_latents) = if world.size() > 1 {
            broadcast_conditioning(world, embeds, noise, init_latents, job.init.is_some())?
        } else {
            (embeds, noise, init_latents)
        };
        let encode = t0.elapsed().as_secs_f64();

        let t1 = Instant::now();
        let start = match (&init_latents, job.init) {
            (Some(latents), Some((_, strength))) => DenoiseStart::Image {
                latents,
                noise: &noise,
                strength,
            },
            _ => DenoiseStart::Noise(&noise),
        };
        if !job.control.is_empty() && job.control.len() != self.controlnets.len() {
            return Err(SdxlError::Input(format!(
                "{} control images for {} ControlNets",
                job.control.len(),
                self.controlnets.len()
            )));
        }
        let control = Control {
            units: self
                .controlnets
                .iter()
                .zip(job.control)
                .map(|(net, c)| ControlUnit {
                    net,
                    image: &c.image,
                    guidance: c.guidance,
                })
                .collect(),
        };
        let out = denoise_with(
            &self.unet,
            Some(&control),
            driver,
            &self.scheduler,
            job.params,
            &embeds,
            &start,
            &StepNoise::Derived,
            progress,
        )
        .map_err(|e| at_stage("denoising", e))?;
        let denoise = t1.elapsed().as_secs_f64();
        let t2 = Instant::now();
        let decoded = match (&self.decode_runtime, &self.vae) {
            (Some(rt), Some(vae)) => decode_to_root(vae, rt, &vae.unscale_latents(&out.latents)?)
                .map_err(|e| at_stage("VAE decode", e))?,
            (None, Some(vae)) if rank0 => Some(
                vae.decode(&vae.unscale_latents(&out.latents)?)
                    .map_err(|e| at_stage("VAE decode", e))?,
            ),
            (_, None) if rank0 => {
                return Err(SdxlError::Input(
                    "internal: rank 0 has no VAE decoder loaded".into(),
                ))
            }
            _ => None,
        };
        if self.vae.is_some() {
            // This rank's part, with its device work done (the image is on rank 0 only).
            pcpp_kernels::synchronize(self.device)?;
            if let Ok(mut s) = self.last_decode_seconds.lock() {
                *s = Some(t2.elapsed().as_secs_f64());
            }
        }
        let (Some(image), true) = (decoded, rank0) else {
            return Ok(None);
        };
        let vae_dt = self.vae_dtype;
        let flag = image.nonfinite_flag(&Tensor::finite_flag(image.device())?, 0.0)?;
        if flag.flag_code()?.is_some() {
            return Err(SdxlError::NonFinite {
                stage: "the decoded image".into(),
                at: format!(" (VAE decode in {vae_dt})"),
                hint: overflow_hint(vae_dt),
            });
        }
        let image = image.to_device(Device::Cpu)?.to_dtype(DType::F32)?;
        let decode = t2.elapsed().as_secs_f64();
        Ok(Some(GeneratedImage {
            latents: out.latents.to_device(Device::Cpu)?,
            image,
            truncated,
            seconds: StageSeconds {
                encode,
                denoise,
                decode,
            },
            step_seconds: out.step_seconds,
        }))
    }

    /// Rank 0: the prompt embeddings (checked for non-finite values) and, for image-to-image, the
    /// scaled latents of the init image.
    fn encode(&self, job: &ImageJob<'_>) -> Result<(PromptEmbeds, Option<Tensor>)> {
        let text = self.text.as_ref().ok_or_else(|| {
            SdxlError::Input("internal: rank 0 has no text encoders loaded".into())
        })?;
        let e = text.encode(job.prompt, job.negative, job.params.cfg())?;
        let flag = Tensor::finite_flag(e.prompt_embeds.device())?;
        let flag = e.prompt_embeds.nonfinite_flag(&flag, 0.0)?;
        let flag = e.pooled.nonfinite_flag(&flag, 0.0)?;
        if flag.flag_code()?.is_some() {
            return Err(SdxlError::NonFinite {
                stage: "the prompt embeddings".into(),
                at: String::new(),
                hint: overflow_hint(self.dtype),
            });
        }
        let latents = match job.init {
            Some((img, _)) => {
                let enc = self.vae_encoder.as_ref().ok_or_else(|| {
                    SdxlError::Input("internal: rank 0 has no VAE encoder loaded".into())
                })?;
                let img = img.to_device(self.unet.device())?.to_dtype(enc.dtype())?;
                Some(enc.scale_latents(&enc.encode_mean(&img)?)?)
            }
            None => None,
        };
        Ok((e, latents))
    }
}

/// Rank 0's conditioning on every rank: the prompt embeddings, the pooled embedding, the initial
/// noise and (image-to-image) the init latents, broadcast bit for bit in their dtypes.
fn broadcast_conditioning(
    world: &dyn Transport,
    embeds: PromptEmbeds,
    noise: Tensor,
    init: Option<Tensor>,
    want_init: bool,
) -> Result<(PromptEmbeds, Tensor, Option<Tensor>)> {
    let mut msg = Vec::new();
    if world.rank() == 0 {
        let mut parts = vec![&embeds.prompt_embeds, &embeds.pooled, &noise];
        if let Some(l) = &init {
            parts.push(l);
        }
        msg = wire::pack(&parts)?;
    }
    world
        .broadcast(CommKind::Control, 0, &mut msg)
        .map_err(|e| SdxlError::Input(format!("broadcast of the prompt embeddings: {e}")))?;
    if world.rank() == 0 {
        return Ok((embeds, noise, init));
    }
    let want = 3 + usize::from(want_init);
    let mut ts = wire::unpack(&msg, want)?.into_iter();
    let (Some(prompt_embeds), Some(pooled), Some(noise)) = (ts.next(), ts.next(), ts.next()) else {
        return Err(SdxlError::Input(
            "internal: broadcast of the prompt embeddings".into(),
        ));
    };
    Ok((
        PromptEmbeds {
            prompt_embeds,
            pooled,
            truncated: false,
        },
        noise,
        ts.next(),
    ))
}
