//! `pcpp-cli plan`: the bytes each rank moves per steady (and warm-up) step and its stale-context
//! memory, for a model configuration and a parallel scheme, without loading weights (PCPP §3.3–3.4).
//! A folder holding only the configs is enough (e.g. the real SDXL-base configs). The model family
//! comes from `model_index.json`: a Flux pipeline folder is planned from its transformer's config
//! (no CFG; bands of the packed token grid, latent / 2), followed by the same parallel VAE decode.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use pcpp_core::{plan, ParallelConfig, ParallelMode, PlanSetup};
use pcpp_kernels::DType;
use pcpp_sdxl::{unet_inventory, UNetConfig};

/// Arguments of `pcpp-cli plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Model folder (pipeline, or configs only) holding `unet/config.json` (and `vae/config.json`).
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    model: Option<PathBuf>,
    /// A UNet `config.json` (the VAE scale factor is then taken as 8).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Image height in pixels.
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1024)]
    width: usize,
    /// Number of ranks.
    #[arg(long, default_value_t = 8)]
    ranks: usize,
    /// Parallel scheme.
    #[arg(long, default_value = "pcpp")]
    parallel: ParallelMode,
    /// PCPP portion: one value, or one per resolution level separated by commas.
    #[arg(long, default_value = "0.3")]
    portion: String,
    #[command(flatten)]
    modes: crate::mode_flags::ModeFlags,
    /// Keep both CFG branches on every rank (model batch 2) instead of two rank groups.
    #[arg(long)]
    no_cfg_split: bool,
    /// Without classifier-free guidance (model batch 1, one group).
    #[arg(long)]
    no_cfg: bool,
    /// Element type of the exchanged activations (f16 on GPUs; the CPU twin uses f32).
    #[arg(long, default_value = "f16")]
    dtype: DType,
    /// Print the plan as JSON (`bytes_per_step` is the total per rank per steady step).
    #[arg(long)]
    json: bool,
}

/// Runs the command.
pub fn run(a: PlanArgs) -> Result<()> {
    if let Some(m) = a.model.as_ref().filter(|m| is_flux_folder(m)) {
        return run_flux(&a, m);
    }
    let (cfg_path, vae_scale) = match (&a.model, &a.config) {
        (Some(m), _) => {
            let vae = m.join("vae").join("config.json");
            // A folder with only the UNet config (e.g. a config-only download) has SDXL's factor.
            let scale = if vae.is_file() {
                pcpp_sdxl::VaeConfig::from_file(&vae)?.scale_factor()
            } else {
                8
            };
            (m.join("unet").join("config.json"), scale)
        }
        (None, Some(c)) => (c.clone(), 8),
        (None, None) => bail!("give --model DIR or --config FILE"),
    };
    let ucfg = UNetConfig::from_file(&cfg_path)?;
    for (flag, v) in [("--height", a.height), ("--width", a.width)] {
        if v == 0 || v % vae_scale != 0 {
            bail!("{flag} {v}: must be a positive multiple of {vae_scale}");
        }
    }
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    let portions = crate::generate::parse_portions(&a.portion)?;
    let mut cfg = ParallelConfig::preset(a.parallel, &portions, None, usize::MAX);
    a.modes.apply(&mut cfg)?;
    let cfg_on = !a.no_cfg;
    let cfg_split = cfg_on && !a.no_cfg_split && a.ranks >= 2;
    let setup = PlanSetup {
        height: a.height / vae_scale,
        width: a.width / vae_scale,
        world_size: a.ranks,
        cfg_split,
        batch: if cfg_on && !cfg_split { 2 } else { 1 },
        elem_size: a.dtype.size(),
    };
    let inv = unet_inventory(&ucfg);
    let mut p =
        plan(&inv, &setup, &cfg).map_err(|e| anyhow::anyhow!("--ranks {}: {e}", a.ranks))?;
    // The VAE decode that follows: one synchronous pass over all ranks, one image.
    if let Some(vae) = a.model.as_ref().map(|m| m.join("vae").join("config.json")) {
        if vae.is_file() {
            let vc = pcpp_sdxl::VaeConfig::from_file(&vae)?;
            let d = pcpp_sdxl::vae_parallel::decode_plan(
                &vc,
                setup.height,
                setup.width,
                a.ranks,
                1,
                a.dtype.size(),
            )
            .map_err(|e| anyhow::anyhow!("VAE decode on --ranks {}: {e}", a.ranks))?;
            p.decode = Some(Box::new(d));
        }
    }
    if a.json {
        return crate::output::print(&format!("{}\n", serde_json::to_string_pretty(&p)?));
    }
    let mut out = String::new();
    let mb = |b: f64| b / 1e6;
    writeln!(
        out,
        "{} on {} ranks ({}), {}×{} image, latent {}×{}, activations in {}",
        a.parallel,
        a.ranks,
        if cfg_split {
            "CFG split into two groups".to_string()
        } else if cfg_on {
            "both CFG branches on every rank".to_string()
        } else {
            "no CFG".to_string()
        },
        a.height,
        a.width,
        setup.height,
        setup.width,
        a.dtype
    )?;
    writeln!(
        out,
        "received per rank per steady step: {:.3} MB (max {:.3} MB)",
        mb(p.bytes_per_step),
        mb(p.max_bytes_per_step as f64)
    )?;
    writeln!(
        out,
        "received per rank per warm-up step: {:.3} MB",
        mb(p.bytes_per_warmup_step)
    )?;
    writeln!(out, "rank  group band rows  steady recv MB  halo  attention  group-norm  gather  all-reduce   stale cache MB")?;
    for r in &p.ranks {
        let s = &r.steady.recvd;
        writeln!(
            out,
            "{:>4}  {:>5} {:>4} {:>4}  {:>14.3}  {:>5.2} {:>9.2}  {:>10.4}  {:>6.2}  {:>10.2}   {:>14.3}",
            r.world_rank,
            r.group,
            r.patch,
            r.rows,
            mb(r.steady.recvd.total() as f64),
            mb(s.halo as f64),
            mb(s.attention as f64),
            mb(s.group_norm as f64),
            mb(s.gather as f64),
            mb(s.all_reduce as f64),
            mb(r.cache_bytes as f64)
        )?;
    }
    if let Some(d) = &p.decode {
        writeln!(
            out,
            "VAE decode (one synchronous pass, every rank one band, image gathered to rank 0): received per rank {:.3} MB (max {:.3} MB)",
            mb(d.bytes_per_warmup_step),
            mb(d.ranks.iter().map(|r| r.warmup.recvd.total()).max().unwrap_or(0) as f64)
        )?;
        writeln!(
            out,
            "rank  image rows  recv MB  halo  attention  group-norm  gather  sent MB"
        )?;
        for r in &d.ranks {
            let s = &r.warmup.recvd;
            writeln!(
                out,
                "{:>4}  {:>10}  {:>7.3}  {:>5.2} {:>9.2}  {:>10.4}  {:>6.2}  {:>7.3}",
                r.world_rank,
                r.rows,
                mb(s.total() as f64),
                mb(s.halo as f64),
                mb(s.attention as f64),
                mb(s.group_norm as f64),
                mb(s.gather as f64),
                mb(r.warmup.sent.total() as f64)
            )?;
        }
    }
    crate::output::print(&out)
}

/// Whether `m` is a Flux pipeline folder (its `model_index.json` names `FluxPipeline`).
fn is_flux_folder(m: &std::path::Path) -> bool {
    m.join("model_index.json").is_file()
        && pcpp_flux::PipelineKind::of_folder(m).is_ok_and(|k| k.is_flux())
}

/// `plan` for a Flux folder.
fn run_flux(a: &PlanArgs, m: &std::path::Path) -> Result<()> {
    let tcfg = pcpp_flux::FluxTransformerConfig::from_file(&m.join("transformer/config.json"))?;
    let vae = m.join("vae").join("config.json");
    let scale = if vae.is_file() {
        pcpp_sdxl::VaeConfig::from_file(&vae)?.scale_factor()
    } else {
        8
    };
    for (flag, v) in [("--height", a.height), ("--width", a.width)] {
        if v == 0 || v % (2 * scale) != 0 {
            bail!(
                "{flag} {v}: must be a positive multiple of {} for this Flux model",
                2 * scale
            );
        }
    }
    if a.ranks == 0 {
        bail!("--ranks must be at least 1");
    }
    if a.parallel == ParallelMode::Tensor {
        bail!("--parallel tensor: Flux runs serial or patch-parallel (pcpp, distrifusion, naive-patch)");
    }
    let portions = crate::generate::parse_portions(&a.portion)?;
    let mut cfg = ParallelConfig::preset(a.parallel, &portions, None, usize::MAX);
    a.modes.apply(&mut cfg)?;
    let setup = PlanSetup {
        height: a.height / scale / 2,
        width: a.width / scale / 2,
        world_size: a.ranks,
        cfg_split: false,
        batch: 1,
        elem_size: a.dtype.size(),
    };
    let inv = pcpp_flux::flux_inventory(&tcfg);
    let mut p =
        plan(&inv, &setup, &cfg).map_err(|e| anyhow::anyhow!("--ranks {}: {e}", a.ranks))?;
    // The VAE decode that follows (`generate` without --serial-decode): one synchronous pass.
    if vae.is_file() && a.ranks > 1 {
        let vc = pcpp_sdxl::VaeConfig::from_file(&vae)?;
        let (lh, lw) = (a.height / scale, a.width / scale);
        let d = pcpp_sdxl::vae_parallel::decode_plan(&vc, lh, lw, a.ranks, 1, a.dtype.size())
            .map_err(|e| anyhow::anyhow!("VAE decode on --ranks {}: {e}", a.ranks))?;
        p.decode = Some(Box::new(d));
    }
    if a.json {
        return crate::output::print(&format!("{}\n", serde_json::to_string_pretty(&p)?));
    }
    let mb = |b: f64| b / 1e6;
    let mut out = String::new();
    writeln!(
        out,
        "Flux {} on {} ranks (no CFG), {}×{} image, packed token grid {}×{}, activations in {}",
        a.parallel, a.ranks, a.height, a.width, setup.height, setup.width, a.dtype
    )?;
    writeln!(
        out,
        "received per rank per steady step: {:.3} MB (max {:.3} MB); per warm-up step: {:.3} MB",
        mb(p.bytes_per_step),
        mb(p.max_bytes_per_step as f64),
        mb(p.bytes_per_warmup_step)
    )?;
    writeln!(
        out,
        "rank  token rows  steady recv MB  attention  gather   stale cache MB"
    )?;
    for r in &p.ranks {
        let s = &r.steady.recvd;
        writeln!(
            out,
            "{:>4}  {:>10}  {:>14.3}  {:>9.3}  {:>6.3}   {:>14.3}",
            r.world_rank,
            r.rows,
            mb(s.total() as f64),
            mb(s.attention as f64),
            mb(s.gather as f64),
            mb(r.cache_bytes as f64)
        )?;
    }
    if let Some(d) = &p.decode {
        writeln!(
            out,
            "VAE decode (one synchronous pass, every rank one band, image gathered to rank 0): received per rank {:.3} MB (max {:.3} MB)",
            mb(d.bytes_per_warmup_step),
            mb(d.ranks.iter().map(|r| r.warmup.recvd.total()).max().unwrap_or(0) as f64)
        )?;
    }
    crate::output::print(&out)
}
