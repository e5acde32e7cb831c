//! The patch-parallel VAE decode: every rank of the world decodes one horizontal band of latent
//! rows into the matching band of image rows, and rank 0 gathers the picture.
//!
//! The decoder is built through the one-pass runtime of `pcpp-core` ([`decode_runtime`], a
//! [`PatchRuntime::one_pass`] over the whole world: no CFG groups, one band per rank, uneven bands
//! allowed). Its band plan is cut on the latent rows, the coarsest level; the decoder's levels
//! are the latent ×1, ×2, ×4, ×8 (plan levels `L`, `L−1`, …, 0, with `L` the number of
//! up-samplings), and every band doubles its rows at each up-sampling. What the layers exchange:
//!
//! - every 3×3 convolution receives the rows its band's outputs read from the neighbouring bands
//!   (one row from each neighbour; zero padding only at the image border);
//! - every group norm sends its band's per-(batch, group) mean and centred sum of squares (f32)
//!   to every other rank and merges all bands' moments with their element counts: the exact
//!   statistics of the whole image;
//! - the mid-block self-attention receives every other band's K/V and attends over all tokens;
//! - the nearest ×2 up-sampling and the 1×1 convolutions are row-local: no exchange.
//!
//! A decode is one pass, so every exchange is synchronous: each band equals the serial decode's
//! rows up to float rounding. [`decode_plan`] gives the bytes each rank moves, which equal the
//! runtime's report exactly (tested).

use std::sync::Arc;

use pcpp_comm::Transport;
use pcpp_core::plan::{plan_one_pass, Inventory, LayerKind, Plan, PlanSetup};
use pcpp_core::{ParallelConfig, PatchRuntime};
use pcpp_kernels::Tensor;

use crate::error::{Result, SdxlError};
use crate::inventory::Lister;
use crate::vae::{VaeConfig, VaeDecoder};

/// The world rank that receives the decoded image.
pub const IMAGE_ROOT: usize = 0;

/// The runtime of a parallel decode of `latent_h × latent_w` latents over every rank of `world`
/// (collective over `world`). Build the decoder through it
/// ([`VaeDecoder::load_with`]`(…, runtime.factory())`), then call [`decode_to_root`] or
/// [`decode_bands`] with it. Errors if a band would be empty (more ranks than latent rows).
pub fn decode_runtime(
    world: Arc<dyn Transport>,
    config: &VaeConfig,
    latent_h: usize,
    latent_w: usize,
) -> Result<PatchRuntime> {
    let l = config.levels();
    Ok(PatchRuntime::one_pass(
        world,
        latent_h << l,
        latent_w << l,
        l,
    )?)
}

/// [`decode_runtime`] with the transport of the decode's group given instead of split from
/// `world` (the decode has one group: the whole world), for transports that cannot split, such
/// as [`pcpp_comm::SoloTransport`] when one rank's decode is measured alone.
pub fn decode_runtime_with_group(
    world: Arc<dyn Transport>,
    group: Arc<dyn Transport>,
    config: &VaeConfig,
    latent_h: usize,
    latent_w: usize,
) -> Result<PatchRuntime> {
    let l = config.levels();
    Ok(PatchRuntime::with_group(
        world,
        group,
        false,
        ParallelConfig::one_pass(),
        latent_h << l,
        latent_w << l,
        l,
    )?)
}

/// This rank's band index and the rows of the latent it decodes.
fn latent_rows(runtime: &PatchRuntime) -> (usize, std::ops::Range<usize>) {
    let plan = runtime.band_plan();
    let me = if runtime.is_serial() {
        0
    } else {
        runtime.grid().patch()
    };
    (me, plan.band(plan.levels, me))
}

/// This rank's band of `latents` (the whole latent, the same on every rank).
///
/// # Shapes
/// `[b, c, latent_h, latent_w]` → `[b, c, rows, latent_w]`.
pub fn latent_band(runtime: &PatchRuntime, latents: &Tensor) -> Result<Tensor> {
    let plan = runtime.band_plan();
    let (h, w) = (plan.height_at(plan.levels), plan.width_at(plan.levels));
    match latents.shape() {
        &[_, _, lh, lw] if (lh, lw) == (h, w) => {}
        s => {
            return Err(SdxlError::Input(format!(
                "vae: latents {s:?} do not match the decode runtime's {h}×{w} latent"
            )))
        }
    }
    let (_, rows) = latent_rows(runtime);
    Ok(latents.narrow(2, rows.start, rows.len())?)
}

/// Decodes this rank's band of (unscaled) latent rows; every rank of the runtime's world calls it
/// at the same time. `vae` must have been built through `runtime`'s factory. Returns this rank's
/// rows of the image (the image is not gathered; see [`decode_to_root`]). The runtime's report
/// then holds the decode's bytes by kind as its only step.
///
/// # Shapes
/// `band_latents: [b, latent_channels, rows, w]` (the rows of [`latent_band`]) →
/// `[b, out_channels, rows·2^L, w·2^L]`.
pub fn decode_bands(
    vae: &VaeDecoder,
    runtime: &PatchRuntime,
    band_latents: &Tensor,
) -> Result<Tensor> {
    Ok(one_pass(vae, runtime, band_latents, false)?.0)
}

/// Sends this rank's decoded band to rank [`IMAGE_ROOT`], which stitches the image together:
/// `Some(image)` there, `None` on the other ranks. Collective over the runtime's world.
///
/// # Shapes
/// `band: [b, c, rows, W]` → `[b, c, H, W]` on rank 0.
pub fn gather_image(runtime: &PatchRuntime, band: &Tensor) -> Result<Option<Tensor>> {
    Ok(runtime.gather_to(IMAGE_ROOT, band)?)
}

/// The whole parallel decode: every rank takes its band of `latents` (unscaled, the same on every
/// rank), decodes it and sends it to rank [`IMAGE_ROOT`], which returns `Some(image)`; the other
/// ranks return `None`. The runtime's report then holds the decode's bytes by kind (halo, group
/// norm, attention, gather) as its only step.
///
/// # Shapes
/// `latents: [b, latent_channels, h, w]` → `[b, out_channels, h·2^L, w·2^L]` on rank 0.
pub fn decode_to_root(
    vae: &VaeDecoder,
    runtime: &PatchRuntime,
    latents: &Tensor,
) -> Result<Option<Tensor>> {
    vae.check_latents(latents)?;
    let band = latent_band(runtime, latents)?;
    Ok(one_pass(vae, runtime, &band, true)?.1)
}

/// One decode of `band` as the runtime's only step, optionally followed by the gather to rank 0.
fn one_pass(
    vae: &VaeDecoder,
    runtime: &PatchRuntime,
    band: &Tensor,
    gather: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    vae.check_latents(band)?;
    let plan = runtime.band_plan();
    if plan.levels != vae.levels() {
        return Err(SdxlError::Input(format!(
            "vae: the decode runtime has {} levels but the decoder up-samples {} times",
            plan.levels,
            vae.levels()
        )));
    }
    let (me, rows) = latent_rows(runtime);
    let (h, w) = (band.shape()[2], band.shape()[3]);
    if h != rows.len() || w != plan.width_at(plan.levels) {
        return Err(SdxlError::Input(format!(
            "vae: band {me} is {}×{} latent rows and columns, got {h}×{w}",
            rows.len(),
            plan.width_at(plan.levels)
        )));
    }
    let driver = runtime.driver();
    driver.begin_generation()?;
    let ctx = driver.step_ctx(0);
    let run = || -> Result<(Tensor, Option<Tensor>)> {
        let rgb = vae.forward(&ctx, band)?;
        let image = if gather {
            gather_image(runtime, &rgb)?
        } else {
            None
        };
        Ok((rgb, image))
    };
    let out = run();
    let end = driver.end_generation();
    let out = out?;
    end?;
    Ok(out)
}

impl Lister {
    /// A VAE ResNet: two group norms and two 3×3 convolutions (no time embedding).
    fn vae_resnet(&mut self, p: &str, ci: usize, co: usize, level: usize) {
        self.norm(format!("{p}.norm1"), ci, level);
        self.conv3(format!("{p}.conv1"), ci, level, 1, 1);
        self.norm(format!("{p}.norm2"), co, level);
        self.conv3(format!("{p}.conv2"), co, level, 1, 1);
    }
}

/// The decoder's layers that couple rows, in the order [`VaeDecoder::build`] creates them through
/// the factory, for the plan: every 3×3 convolution, group norm and the mid-block self-attention,
/// then the gather of the image to rank 0. Levels count from the image (0) to the latent (`L`,
/// the number of up-samplings). `1×1` convolutions and the up-sampling are local and not listed.
pub fn decoder_inventory(config: &VaeConfig) -> Inventory {
    let levels = config.levels();
    let mut l = Lister {
        layers: Vec::new(),
        groups: config.norm_num_groups,
    };
    let rev: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
    let top = rev[0];
    l.conv3(
        "decoder.conv_in".into(),
        config.latent_channels,
        levels,
        1,
        1,
    );
    let mid = "decoder.mid_block";
    l.vae_resnet(&format!("{mid}.resnets.0"), top, top, levels);
    if config.mid_block_add_attention {
        let a = format!("{mid}.attentions.0");
        l.norm(format!("{a}.group_norm"), top, levels);
        l.push(a, LayerKind::SelfAttention { heads: 1 }, top, levels);
    }
    l.vae_resnet(&format!("{mid}.resnets.1"), top, top, levels);
    let mut prev = top;
    for (i, &co) in rev.iter().enumerate() {
        let level = levels - i.min(levels);
        let p = format!("decoder.up_blocks.{i}");
        for j in 0..=config.layers_per_block {
            let ci = if j == 0 { prev } else { co };
            l.vae_resnet(&format!("{p}.resnets.{j}"), ci, co, level);
        }
        if i + 1 < rev.len() {
            // Nearest ×2 first: the convolution runs one level finer.
            l.conv3(format!("{p}.upsamplers.0.conv"), co, level - 1, 1, 1);
        }
        prev = co;
    }
    let bottom = config.block_out_channels[0];
    l.norm("decoder.conv_norm_out".into(), bottom, 0);
    l.conv3("decoder.conv_out".into(), bottom, 0, 1, 1);
    l.push(
        "image".into(),
        LayerKind::GatherTo { root: IMAGE_ROOT },
        config.out_channels,
        0,
    );
    Inventory {
        model: "AutoencoderKL decoder".into(),
        levels,
        layers: l.layers,
    }
}

/// The bytes every rank moves in a parallel decode of `latent_h × latent_w` latents of `batch`
/// images over `world_size` ranks, with activations of `elem_size` bytes (4 for f32, 2 for bf16):
/// [`pcpp_core::plan::plan_one_pass`] of [`decoder_inventory`]. Each rank's bytes are in
/// `ranks[r].warmup` (equal to `steady`).
pub fn decode_plan(
    config: &VaeConfig,
    latent_h: usize,
    latent_w: usize,
    world_size: usize,
    batch: usize,
    elem_size: usize,
) -> Result<Plan> {
    let l = config.levels();
    let setup = PlanSetup {
        height: latent_h << l,
        width: latent_w << l,
        world_size,
        cfg_split: false,
        batch,
        elem_size,
    };
    Ok(plan_one_pass(&decoder_inventory(config), &setup)?)
}
