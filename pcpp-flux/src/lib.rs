//! pcpp-flux: the Flux.1 model family (FLUX.1-dev, FLUX.1-schnell) on the pcpp engine.
//!
//! A diffusers `FluxPipeline` folder: `transformer/` (`FluxTransformer2DModel`), `text_encoder/`
//! (CLIP-L, pooled output; pcpp-sdxl's CLIP), `text_encoder_2/` (T5 v1.1 encoder),
//! `tokenizer/` and `tokenizer_2/`, `vae/` (16-channel `AutoencoderKL` with scale and shift;
//! pcpp-sdxl's VAE) and `scheduler/` (`FlowMatchEulerDiscreteScheduler`). Weights may be single
//! files or shards with an index. This is the serial implementation; the transformer hands every
//! attention step to a [`JointAttention`] and takes its RoPE positions as an input, so a
//! patch-parallel runtime can take those over.

pub mod blocks;
pub mod config;
pub mod error;
pub mod nn;
pub mod pipeline;
pub mod rope;
pub mod scheduler;
pub mod t5;
pub mod t5_tokenizer;
pub mod transformer;

pub use blocks::{FullAttention, JointAttention};
pub use config::{FlowMatchConfig, FluxTransformerConfig, PipelineKind, T5Config};
pub use error::{FluxError, Result};
pub use pipeline::{pack_latents, unpack_latents, FluxPipeline, FluxPrompt};
pub use rope::{image_ids, text_ids, RopeTables};
pub use scheduler::{calculate_shift, FlowMatchSchedule};
pub use t5::T5Encoder;
pub use t5_tokenizer::{T5Encoded, T5Tokenizer, MAX_SEQUENCE_LENGTH};
pub use transformer::{FluxCond, FluxTransformer};
