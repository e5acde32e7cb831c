//! pcpp-sdxl: Stable Diffusion XL on the pcpp engine.
//!
//! Diffusers-layout configs and weights, the two CLIP tokenizers and text encoders, the UNet (built
//! through `pcpp-core`'s layer factory so that patch parallelism slots in), the VAE decoder, the
//! schedulers and the text-to-image pipeline.

pub mod error;
pub mod scheduler;
pub mod tokenizer;
pub mod unet;
pub mod unet_config;
pub mod weights;

pub use error::{Result, SdxlError};
pub use unet::{Taps, UNet, UNetCond};
pub use unet_config::UNetConfig;
