//! `pcpp-cli`: the command line of pcpp.
//!
//! Subcommands: `generate` (text to image, serial or patch-parallel), `unet` (one UNet forward from a
//! safetensors file of inputs, a parity and debugging hook), `compare` (PSNR / SSIM of two images), `plan` (bytes per step without weights),
//! `bench` (UNet forward timing), `convert` (diffusers folder ↔ single-file checkpoint),
//! `patch-bench` (patch-parallel denoising loop timing with random weights), `decode-bench` (one
//! rank's part of the patch-parallel VAE decode), `flux-bench` (one Flux transformer step, serial or
//! one rank's, with random weights).
//! This is the only crate that reads the environment and uses `anyhow`. User errors print one
//! `error: ...` line (no backtrace) and exit with status 1; bad flags exit with clap's status 2.

mod args;
mod band_bench;
mod batch;
mod bench;
mod compare;
mod control_flags;
mod convert;
mod decode_bench;
mod flux_bench;
mod flux_generate;
mod generate;
mod job;
mod kernel_costs;
mod kernel_env;
mod mode_flags;
mod output;
mod patch_bench;
mod plan_cmd;
mod unet_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Partially Conditioned Patch Parallelism for diffusion models.
#[derive(Debug, Parser)]
#[command(name = "pcpp-cli", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate an image from a prompt with an SDXL or Flux.1 pipeline folder.
    Generate(Box<generate::GenerateArgs>),
    /// Run one UNet forward pass on inputs read from a safetensors file.
    Unet(unet_cmd::UnetArgs),
    /// PSNR and SSIM of two images of the same size.
    Compare(compare::CompareArgs),
    /// Bytes per step and stale-context memory of a parallel configuration, without weights.
    Plan(plan_cmd::PlanArgs),
    /// Time the UNet forward (CPU) for a model or a config with random weights, or one rank's
    /// steady patch-parallel step (`--parallel`, `--ranks`; CPU or GPU).
    Bench(bench::Args),
    /// Convert an SDXL pipeline between a diffusers folder and a single-file checkpoint.
    Convert(convert::ConvertArgs),
    /// Time the patch-parallel denoising loop of a config with random weights (CPU or GPU, any
    /// transport), per step, with bytes per step and the final latents.
    PatchBench(Box<patch_bench::PatchBenchArgs>),
    /// Time one rank's part of the patch-parallel VAE decode (CPU or GPU), alone on this device,
    /// with its peak memory and bytes.
    DecodeBench(decode_bench::DecodeBenchArgs),
    /// Time one Flux transformer step (serial, or one rank's steady patch-parallel step) of a
    /// config with random weights, eager and as a CUDA-graph replay, with its bytes.
    FluxBench(Box<flux_bench::FluxBenchArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = kernel_env::apply().and_then(|()| match cli.command {
        Command::Generate(a) => generate::run(*a),
        Command::Unet(a) => unet_cmd::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Plan(a) => plan_cmd::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Convert(a) => convert::run(a),
        Command::PatchBench(a) => patch_bench::run(*a),
        Command::DecodeBench(a) => decode_bench::run(a),
        Command::FluxBench(a) => flux_bench::run(*a),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
