//! `pcpp-cli unet`: one forward pass of a diffusers UNet (`DIR/unet`) on inputs from a safetensors
//! file (`sample`, `timestep`, `encoder_hidden_states`, and for SDXL `text_embeds`, `time_ids`),
//! writing the prediction as tensor `out`. A debugging tool and the parity hook for reviewers.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use pcpp_core::{SerialFactory, StepCtx};
use pcpp_kernels::io::SafetensorsFile;
use pcpp_kernels::DType;
use pcpp_sdxl::{UNet, UNetCond};

use crate::output;

/// Arguments of `pcpp-cli unet`.
#[derive(Debug, Args)]
pub struct UnetArgs {
    /// Model folder holding `unet/` (a pipeline folder or a folder with only `unet/`).
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file with `sample`, `timestep`, `encoder_hidden_states` [, `text_embeds`, `time_ids`].
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the output (tensor `out`).
    #[arg(long)]
    output: PathBuf,
    /// Compute dtype (the CPU computes in f32; weights stored in f16/bf16 are cast on load).
    #[arg(long, default_value = "f32")]
    dtype: DType,
}

/// Runs the command.
pub fn run(a: UnetArgs) -> Result<()> {
    if a.dtype != DType::F32 {
        bail!("--dtype {}: the CPU back-end computes in f32 only", a.dtype);
    }
    output::check_writable(&a.output, "--output")?;
    let inputs = SafetensorsFile::open(&a.inputs).with_context(|| "--inputs".to_string())?;
    let get = |name: &str| -> Result<_> {
        inputs
            .load(name, Some(DType::F32))
            .with_context(|| format!("--inputs {}", a.inputs.display()))
    };
    let opt = |name: &str| -> Result<_> {
        if inputs.contains(name) {
            Ok(Some(get(name)?))
        } else {
            Ok(None)
        }
    };
    let sample = get("sample")?;
    let timestep = get("timestep")?;
    let ehs = get("encoder_hidden_states")?;
    let text_embeds = opt("text_embeds")?;
    let time_ids = opt("time_ids")?;

    let unet_dir = a.model.join("unet");
    if !unet_dir.is_dir() {
        bail!("--model {}: no `unet` folder in it", a.model.display());
    }
    let unet = UNet::load(&unet_dir, DType::F32, &SerialFactory)?;
    if unet.config().text_time.is_some() && (text_embeds.is_none() || time_ids.is_none()) {
        bail!(
            "--inputs {}: this UNet uses SDXL added conditioning and needs tensors `text_embeds` and `time_ids`",
            a.inputs.display()
        );
    }
    let cond = UNetCond::new(ehs, text_embeds, time_ids);
    let out = unet.forward(&StepCtx::serial(), &sample, &timestep, &cond, None)?;
    pcpp_kernels::io::save(&a.output, &[("out", &out)], None)
        .with_context(|| format!("--output {}", a.output.display()))?;
    Ok(())
}
