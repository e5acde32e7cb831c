//! A small Flux-style diffusion transformer (DiT) built through `pcpp-core`'s [`LayerFactory`]:
//! the test model of the core's DiT API, with no model-specific code in the core (see
//! `docs/porting.md`). Random weights from a seeded generator.
//!
//! The model: the input layer patchifies the latent (`kernel = stride = patch`, a band of `2r`
//! latent rows becomes `r` token rows, so bands are planned on the token grid); extra "text"
//! tokens, given per call and held whole on every rank, run beside the image tokens. Each block
//! modulates both streams from the timestep (adaLN), projects q/k/v per stream, normalises q and
//! k (QK-norm), rotates the image tokens' q and k by their absolute row and column (a RoPE that
//! reads the band's offset from the factory's [`BandLocator`]), and attends jointly through the
//! factory's projected attention (image K/V exchanged between bands, text K/V always local); then
//! a GELU MLP per stream. A final adaLN and linear give `patch² · channels` values per token,
//! which the gather collects on the token grid and the model unpatchifies to the latent.

use std::sync::Arc;

use pcpp_core::layers::LayerContext;
use pcpp_core::plan::{Inventory, LayerKind, LayerSpec};
use pcpp_core::{
    BandLocator, Conv2dLayer, DenoiseModel, GatherLayer, LayerFactory, ProjectedAttentionLayer,
    Result, StepCtx,
};
use pcpp_kernels::{Activation, DType, Device, Tensor};

/// Sizes of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitConfig {
    /// Latent channels in and out.
    pub channels: usize,
    /// Patch size of the input layer (its kernel and stride).
    pub patch: usize,
    /// Token width (a multiple of 4: RoPE rotates halves, split between rows and columns).
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub depth: usize,
}

impl Default for DitConfig {
    fn default() -> Self {
        DitConfig {
            channels: 4,
            patch: 2,
            dim: 32,
            heads: 4,
            depth: 2,
        }
    }
}

/// A seeded generator of uniform weights (SplitMix64), so every rank builds the same model.
#[derive(Debug, Clone)]
pub struct WeightRng(u64);

impl WeightRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> WeightRng {
        WeightRng(seed)
    }

    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// A tensor of `shape` uniform in `[−scale, scale)`.
    pub fn tensor(&mut self, shape: &[usize], scale: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n)
            .map(|_| (self.next_f32() * 2.0 - 1.0) * scale)
            .collect();
        Tensor::from_vec(shape, v).unwrap_or_else(|_| Tensor::scalar(0.0))
    }
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn random(rng: &mut WeightRng, inp: usize, out: usize) -> Linear {
        let s = 1.0 / (inp as f32).sqrt();
        Linear {
            w: rng.tensor(&[out, inp], s),
            b: rng.tensor(&[out], s),
        }
    }

    fn forward(&self, id: &str, x: &Tensor) -> Result<Tensor> {
        x.linear(&self.w, Some(&self.b)).at(id)
    }
}

/// One stream's weights in a block (image or text).
struct Stream {
    ada: Linear,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    mlp_in: Linear,
    mlp_out: Linear,
}

impl Stream {
    fn random(rng: &mut WeightRng, d: usize) -> Stream {
        Stream {
            ada: Linear::random(rng, d, 6 * d),
            q: Linear::random(rng, d, d),
            k: Linear::random(rng, d, d),
            v: Linear::random(rng, d, d),
            out: Linear::random(rng, d, d),
            mlp_in: Linear::random(rng, d, 4 * d),
            mlp_out: Linear::random(rng, 4 * d, d),
        }
    }

    /// The six modulation vectors `[b, 1, d]` of this stream from the time embedding.
    fn modulation(&self, id: &str, temb: &Tensor, d: usize) -> Result<Vec<Tensor>> {
        let b = temb.shape()[0];
        self.ada
            .forward(id, temb)?
            .chunk(6, 1)
            .at(id)?
            .into_iter()
            .map(|c| c.reshape(&[b, 1, d]))
            .collect::<std::result::Result<_, _>>()
            .at(id)
    }

    /// Normalised, QK-normed q, k and v of the modulated tokens `x`.
    fn qkv(&self, id: &str, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let qn = |t: Tensor| t.layer_norm(None, None, 1e-6).at(id);
        Ok((
            qn(self.q.forward(id, x)?)?,
            qn(self.k.forward(id, x)?)?,
            self.v.forward(id, x)?,
        ))
    }

    /// `x + gate·out(attn)`, then `x + gate·mlp(modulate(x))`.
    fn finish(&self, id: &str, x: &Tensor, attn: &Tensor, m: &[Tensor]) -> Result<Tensor> {
        let x = x
            .add(&self.out.forward(id, attn)?.mul(&m[2]).at(id)?)
            .at(id)?;
        let f = modulate(id, &x, &m[3], &m[4])?;
        let f = self.mlp_in.forward(id, &f)?.act(Activation::Gelu).at(id)?;
        x.add(&self.mlp_out.forward(id, &f)?.mul(&m[5]).at(id)?)
            .at(id)
    }
}

fn modulate(id: &str, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    x.layer_norm(None, None, 1e-6)
        .and_then(|n| n.add(&n.mul(scale)?))
        .and_then(|n| n.add(shift))
        .at(id)
}

struct Block {
    name: String,
    img: Stream,
    txt: Stream,
    attn: Arc<dyn ProjectedAttentionLayer>,
}

/// The model, built through some factory.
pub struct Dit {
    cfg: DitConfig,
    patchify: Arc<dyn Conv2dLayer>,
    locator: Arc<dyn BandLocator>,
    time_1: Linear,
    time_2: Linear,
    blocks: Vec<Block>,
    final_ada: Linear,
    final_out: Linear,
    gather: Arc<dyn GatherLayer>,
}

/// RoPE's `cos` and `sin` `[b, rows·cols, d]` for the image tokens of a band whose first row is
/// `top` and first column `left`: channel pair `(i, i + d/2)` turns by `pos · 100^(−j/(d/4))`,
/// `pos` the token's absolute row for `i < d/4` (`j = i`) and its column otherwise
/// (`j = i − d/4`).
fn rope_tables(
    b: usize,
    (top, left): (usize, usize),
    (rows, cols): (usize, usize),
    d: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (half, quarter) = (d / 2, d / 4);
    let mut cos = Vec::with_capacity(b * rows * cols * d);
    let mut sin = Vec::with_capacity(b * rows * cols * d);
    for _ in 0..b {
        for r in 0..rows {
            for c in 0..cols {
                let angle = |i: usize| {
                    let (pos, j) = if i < quarter {
                        ((top + r) as f64, i)
                    } else {
                        ((left + c) as f64, i - quarter)
                    };
                    pos * 100f64.powf(-(j as f64) / quarter as f64)
                };
                for i in 0..d {
                    let a = angle(i % half);
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
    }
    (cos, sin)
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half([x1, x2]) = [−x2, x1]`.
fn rope(id: &str, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.shape()[2];
    let x1 = x.narrow(2, 0, d / 2).at(id)?;
    let x2 = x.narrow(2, d / 2, d / 2).at(id)?;
    let rot = Tensor::cat(&[&x2.affine(-1.0, 0.0).at(id)?, &x1], 2).at(id)?;
    x.mul(cos).and_then(|a| a.add(&rot.mul(sin)?)).at(id)
}

impl Dit {
    /// A model with random weights from `seed`, built through `f`.
    pub fn random(cfg: DitConfig, seed: u64, f: &dyn LayerFactory) -> Result<Dit> {
        let mut rng = WeightRng::new(seed);
        let (c, d, p) = (cfg.channels, cfg.dim, cfg.patch);
        let s = 1.0 / ((c * p * p) as f32).sqrt();
        let patchify = f.input_conv2d(
            "x_embedder",
            rng.tensor(&[d, c, p, p], s),
            Some(rng.tensor(&[d], s)),
            p,
            0,
        )?;
        let locator = f.band_locator("rope")?;
        let time_1 = Linear::random(&mut rng, d, d);
        let time_2 = Linear::random(&mut rng, d, d);
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let name = format!("blocks.{i}");
            blocks.push(Block {
                img: Stream::random(&mut rng, d),
                txt: Stream::random(&mut rng, d),
                attn: f.projected_attention(&format!("{name}.attn"), cfg.heads)?,
                name,
            });
        }
        let final_ada = Linear::random(&mut rng, d, 2 * d);
        let final_out = Linear::random(&mut rng, d, p * p * c);
        let gather = f.gather("out")?;
        Ok(Dit {
            cfg,
            patchify,
            locator,
            time_1,
            time_2,
            blocks,
            final_ada,
            final_out,
            gather,
        })
    }

    /// The layers that couple rows, from the config alone, in construction order. Its level 0
    /// is the token grid (latent size / patch).
    pub fn inventory(cfg: &DitConfig) -> Inventory {
        let p = cfg.patch;
        let mut layers = vec![LayerSpec {
            id: "x_embedder".into(),
            kind: LayerKind::InputConv {
                kernel: p,
                stride: p,
                padding: 0,
            },
            channels: cfg.channels,
            level: 0,
        }];
        for i in 0..cfg.depth {
            layers.push(LayerSpec {
                id: format!("blocks.{i}.attn"),
                kind: LayerKind::ProjectedAttention { heads: cfg.heads },
                channels: cfg.dim,
                level: 0,
            });
        }
        layers.push(LayerSpec {
            id: "out".into(),
            kind: LayerKind::Gather,
            channels: p * p * cfg.channels,
            level: 0,
        });
        Inventory {
            model: "dit".into(),
            levels: 0,
            layers,
        }
    }

    /// The prediction for `x` at timesteps `t` with text tokens `txt`.
    ///
    /// # Shapes
    /// `x: [b, channels, h, w]` (the whole latent on every rank; `h` and `w` multiples of the
    /// patch), `t: [b]`, `txt: [b, l_txt, dim]` (whole on every rank) → `[b, channels, h, w]`.
    pub fn forward(&self, ctx: &StepCtx, x: &Tensor, t: &Tensor, txt: &Tensor) -> Result<Tensor> {
        let (d, p, ch) = (self.cfg.dim, self.cfg.patch, self.cfg.channels);
        let b = x.shape()[0];
        let temb = t.timestep_embedding(d, true, 0.0).at("time_proj")?;
        let temb = self
            .time_2
            .forward(
                "time_2",
                &self
                    .time_1
                    .forward("time_1", &temb)?
                    .act(Activation::Silu)
                    .at("time_1")?,
            )?
            .act(Activation::Silu)
            .at("time_2")?;
        let h = self.patchify.forward(ctx, x)?;
        let (rows, cols) = (h.shape()[2], h.shape()[3]);
        let band = self.locator.locate(ctx, (rows, cols))?;
        let (cos, sin) = rope_tables(b, (band.top, band.left), (rows, cols), d);
        let shape = [b, rows * cols, d];
        let cos = Tensor::from_vec(&shape, cos).at("rope")?;
        let sin = Tensor::from_vec(&shape, sin).at("rope")?;
        let n_txt = txt.shape()[1];
        let mut img = h.to_tokens().at("x_embedder")?;
        let mut txt = txt.clone();
        for blk in &self.blocks {
            let id = blk.name.as_str();
            let mi = blk.img.modulation(id, &temb, d)?;
            let mt = blk.txt.modulation(id, &temb, d)?;
            let (qi, ki, vi) = blk.img.qkv(id, &modulate(id, &img, &mi[0], &mi[1])?)?;
            let (qi, ki) = (rope(id, &qi, &cos, &sin)?, rope(id, &ki, &cos, &sin)?);
            let (qt, kt, vt) = blk.txt.qkv(id, &modulate(id, &txt, &mt[0], &mt[1])?)?;
            let a = blk
                .attn
                .forward(ctx, &qi, &ki, &vi, Some((&qt, &kt, &vt)), (rows, cols))?;
            let at = a.narrow(1, 0, n_txt).at(id)?;
            let ai = a.narrow(1, n_txt, rows * cols).at(id)?;
            img = blk.img.finish(id, &img, &ai, &mi)?;
            txt = blk.txt.finish(id, &txt, &at, &mt)?;
        }
        let m = self.final_ada.forward("final", &temb)?;
        let shift = m.narrow(1, 0, d).and_then(|t| t.reshape(&[b, 1, d]));
        let scale = m.narrow(1, d, d).and_then(|t| t.reshape(&[b, 1, d]));
        let img = modulate("final", &img, &shift.at("final")?, &scale.at("final")?)?;
        let out = self.final_out.forward("final", &img)?;
        let out = out.from_tokens(rows, cols).at("final")?;
        let whole = self.gather.forward(ctx, &out)?;
        // Unpatchify: channel (c, py, px) of token (r, q) is latent pixel (r·p + py, q·p + px).
        let (gh, gw) = (whole.shape()[2], whole.shape()[3]);
        whole
            .reshape(&[whole.shape()[0], ch, p, p, gh, gw])
            .and_then(|t| t.permute(&[0, 1, 4, 2, 5, 3]))
            .and_then(|t| t.reshape(&[whole.shape()[0], ch, gh * p, gw * p]))
            .at("unpatchify")
    }
}

/// The DiT as the core denoising loop's model (CPU, `f32`); its conditioning is the text tokens
/// `[b, l_txt, dim]` of the batch it is fed.
impl DenoiseModel for Dit {
    type Cond = Tensor;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn device(&self) -> Device {
        Device::Cpu
    }

    fn dtype(&self) -> DType {
        DType::F32
    }

    fn forward(
        &self,
        ctx: &StepCtx,
        x: &Tensor,
        t: &Tensor,
        txt: &Tensor,
    ) -> std::result::Result<Tensor, Self::Error> {
        Ok(Dit::forward(self, ctx, x, t, txt)?)
    }
}
