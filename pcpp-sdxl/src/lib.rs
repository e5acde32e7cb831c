//! pcpp-sdxl: Stable Diffusion XL on the pcpp engine.
//!
//! Diffusers-layout configs and weights, the two CLIP tokenizers and text encoders, the UNet (built
//! through `pcpp-core`'s layer factory so that patch parallelism slots in), the VAE decoder (also
//! built through the factory, for a decode cut into bands), the schedulers, the text-to-image
//! pipeline, LoRA adapters and ControlNets.

pub mod checkpoint;
pub mod clip;
pub mod controlnet;
pub mod denoise;
pub mod error;
pub mod generation;
pub mod inventory;
pub mod lora;
pub mod pipeline;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
mod unet_blocks;
pub mod unet_config;
mod unet_resnet;
pub mod vae;
pub mod vae_encoder;
pub mod vae_parallel;
pub mod weights;
pub mod wire;

pub use clip::{ClipOutput, ClipTextConfig, ClipTextModel};
pub use controlnet::{
    control_image_from_rgb8, Control, ControlGuidance, ControlInput, ControlNet, ControlNetConfig,
    ControlUnit,
};
pub use denoise::{
    denoise, denoise_with, derived_step_noise, img2img_start_step, overflow_hint, DenoiseParams,
    DenoiseStart, Denoised, StepNoise,
};
pub use error::{Result, SdxlError};
pub use generation::{
    vae_dtype, GeneratedImage, Generator, ImageJob, LoadOptions, ModelGeometry, StageSeconds,
};
pub use inventory::unet_inventory;
pub use lora::{ComponentLora, LoraComponent, LoraSet, LoraSpec};
pub use pcpp_core::StepGraphs;
pub use pipeline::{MicroCond, ModelIndex, Pipeline, PromptEmbeds, TextEncoders};
pub use unet::{ControlResiduals, Taps, UNet, UNetCond};
pub use unet_config::UNetConfig;
pub use vae::{to_rgb8, to_unit_range, VaeConfig, VaeDecoder};
pub use vae_encoder::{image_from_rgb8, VaeEncoder};
pub use vae_parallel::{decode_bands, decode_runtime, decode_to_root, gather_image};
