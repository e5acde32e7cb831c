//! `pcpp-cli convert`: an SDXL pipeline between a diffusers folder and a single-file checkpoint
//! (original Stability key names, component configs in the safetensors metadata), and the
//! `--model FILE` resolution of `generate`. Model-format plumbing; no PCPP section.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use pcpp_sdxl::checkpoint::{pack_single_file, read_header, unpack_cached, unpack_single_file};

/// The target format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One `.safetensors` file with the original key names (UNet, VAE, both text encoders).
    SingleFile,
    /// A diffusers pipeline folder.
    Diffusers,
}

/// Arguments of `pcpp-cli convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The model to read: a diffusers SDXL folder (to `single-file`) or a single file (to `diffusers`).
    #[arg(long)]
    pub model: PathBuf,
    /// The format to write.
    #[arg(long, value_enum)]
    pub to: Format,
    /// The file (`single-file`) or folder (`diffusers`) to write; it must not exist yet.
    #[arg(long)]
    pub output: PathBuf,
}

/// Runs `pcpp-cli convert`.
pub fn run(a: ConvertArgs) -> Result<()> {
    if a.output.exists() {
        bail!("--output {}: already exists", a.output.display());
    }
    match a.to {
        Format::SingleFile => {
            if !a.model.is_dir() {
                bail!(
                    "--model {}: `--to single-file` reads a diffusers pipeline folder",
                    a.model.display()
                );
            }
            if a.output.extension().and_then(|e| e.to_str()) != Some("safetensors") {
                bail!("--output {}: must end in .safetensors", a.output.display());
            }
            let tmp = a.output.with_extension("safetensors.partial");
            let n = pack_single_file(&a.model, &tmp).with_context(|| "--model".to_string())?;
            std::fs::rename(&tmp, &a.output)
                .with_context(|| format!("--output {}", a.output.display()))?;
            eprintln!("wrote {} ({n} tensors)", a.output.display());
        }
        Format::Diffusers => {
            if !a.model.is_file() {
                bail!(
                    "--model {}: `--to diffusers` reads a single-file checkpoint",
                    a.model.display()
                );
            }
            let tmp = a.output.with_extension("partial");
            let _ = std::fs::remove_dir_all(&tmp);
            unpack_single_file(&a.model, &tmp).with_context(|| "--model".to_string())?;
            std::fs::rename(&tmp, &a.output)
                .with_context(|| format!("--output {}", a.output.display()))?;
            eprintln!("wrote {}", a.output.display());
        }
    }
    Ok(())
}

/// `--model` of `generate`: a folder is used as is; a file is checked to be an SDXL single-file
/// checkpoint and unpacked once into a cache folder under the system temp folder.
pub fn resolve_model(model: PathBuf) -> Result<PathBuf> {
    if !model.is_file() {
        return Ok(model);
    }
    read_header(&model).with_context(|| "--model".to_string())?;
    let dir = unpack_cached(&model).with_context(|| "--model".to_string())?;
    Ok(dir)
}
