//! A small DiT-style diffusion transformer built through `pcpp-core`'s [`LayerFactory`] — the second
//! model family through the patch-parallel core (PCPP §2: the same halo convolution, group norm,
//! windowed stale self-attention and output gather as the SDXL UNet), with no model-specific code
//! in the core. See `docs/porting.md`.
//!
//! The model: a 3×3 convolutional stem turns the latent into one token per latent pixel (the
//! tokens of a band are its rows, row-major); each block adds a convolutional position encoding
//! (a 3×3 conv, as in CPVT, so no absolute position table needs the band's offset), then adaLN
//! self-attention and an adaLN GELU MLP modulated by the timestep; a group norm and a 3×3 conv
//! map back to latent channels, and the gather returns the whole latent. Weights are random
//! (a seeded generator), for tests.

use std::sync::Arc;

use pcpp_core::layers::LayerContext;
use pcpp_core::plan::{Inventory, LayerKind, LayerSpec};
use pcpp_core::{
    AttentionWeights, Conv2dLayer, GatherLayer, GroupNormLayer, LayerFactory, Result,
    SelfAttentionLayer, StepCtx,
};
use pcpp_kernels::{Activation, Tensor};

/// Sizes of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DitConfig {
    /// Latent channels in and out.
    pub channels: usize,
    /// Token width.
    pub dim: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub depth: usize,
    /// Groups of the output group norm.
    pub groups: usize,
}

impl Default for DitConfig {
    fn default() -> Self {
        DitConfig {
            channels: 4,
            dim: 32,
            heads: 4,
            depth: 3,
            groups: 8,
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

struct Block {
    name: String,
    pos: Arc<dyn Conv2dLayer>,
    ada: Linear,
    attn: Arc<dyn SelfAttentionLayer>,
    mlp_in: Linear,
    mlp_out: Linear,
}

/// The model, built through some factory.
pub struct Dit {
    cfg: DitConfig,
    stem: Arc<dyn Conv2dLayer>,
    time_1: Linear,
    time_2: Linear,
    blocks: Vec<Block>,
    norm_out: Arc<dyn GroupNormLayer>,
    conv_out: Arc<dyn Conv2dLayer>,
    gather: Arc<dyn GatherLayer>,
}

fn conv3(
    f: &dyn LayerFactory,
    rng: &mut WeightRng,
    id: &str,
    ci: usize,
    co: usize,
) -> Result<Arc<dyn Conv2dLayer>> {
    let s = 1.0 / ((ci * 9) as f32).sqrt();
    f.conv2d(
        id,
        rng.tensor(&[co, ci, 3, 3], s),
        Some(rng.tensor(&[co], s)),
        1,
        1,
    )
}

impl Dit {
    /// A model with random weights from `seed`, built through `f`.
    pub fn random(cfg: DitConfig, seed: u64, f: &dyn LayerFactory) -> Result<Dit> {
        let mut rng = WeightRng::new(seed);
        let (c, d) = (cfg.channels, cfg.dim);
        let s = 1.0 / ((c * 9) as f32).sqrt();
        let stem = f.input_conv2d(
            "stem",
            rng.tensor(&[d, c, 3, 3], s),
            Some(rng.tensor(&[d], s)),
            1,
        )?;
        let time_1 = Linear::random(&mut rng, d, d);
        let time_2 = Linear::random(&mut rng, d, d);
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let name = format!("blocks.{i}");
            let pos = conv3(f, &mut rng, &format!("{name}.pos"), d, d)?;
            let ada = Linear::random(&mut rng, d, 6 * d);
            let a = 1.0 / (d as f32).sqrt();
            let aw = AttentionWeights {
                to_q: rng.tensor(&[d, d], a),
                to_k: rng.tensor(&[d, d], a),
                to_v: rng.tensor(&[d, d], a),
                q_bias: None,
                k_bias: None,
                v_bias: None,
                to_out: rng.tensor(&[d, d], a),
                out_bias: Some(rng.tensor(&[d], a)),
                heads: cfg.heads,
            };
            let attn = f.self_attention(&format!("{name}.attn"), aw)?;
            blocks.push(Block {
                pos,
                ada,
                attn,
                mlp_in: Linear::random(&mut rng, d, 4 * d),
                mlp_out: Linear::random(&mut rng, 4 * d, d),
                name,
            });
        }
        let norm_out = f.group_norm(
            "norm_out",
            cfg.groups,
            1e-6,
            Some(rng.tensor(&[d], 1.0)),
            Some(rng.tensor(&[d], 0.1)),
        )?;
        let conv_out = conv3(f, &mut rng, "conv_out", d, c)?;
        let gather = f.gather("out")?;
        Ok(Dit {
            cfg,
            stem,
            time_1,
            time_2,
            blocks,
            norm_out,
            conv_out,
            gather,
        })
    }

    /// The layers that couple rows, from the config alone, in construction order.
    pub fn inventory(cfg: &DitConfig) -> Inventory {
        let mut layers = vec![LayerSpec {
            id: "stem".into(),
            kind: LayerKind::InputConv {
                kernel: 3,
                padding: 1,
            },
            channels: cfg.channels,
            level: 0,
        }];
        let conv = LayerKind::Conv {
            kernel: 3,
            stride: 1,
            padding: 1,
        };
        for i in 0..cfg.depth {
            layers.push(LayerSpec {
                id: format!("blocks.{i}.pos"),
                kind: conv,
                channels: cfg.dim,
                level: 0,
            });
            layers.push(LayerSpec {
                id: format!("blocks.{i}.attn"),
                kind: LayerKind::SelfAttention { heads: cfg.heads },
                channels: cfg.dim,
                level: 0,
            });
        }
        for (id, kind, channels) in [
            (
                "norm_out",
                LayerKind::GroupNorm { groups: cfg.groups },
                cfg.dim,
            ),
            ("conv_out", conv, cfg.dim),
            ("out", LayerKind::Gather, cfg.channels),
        ] {
            layers.push(LayerSpec {
                id: id.into(),
                kind,
                channels,
                level: 0,
            });
        }
        Inventory {
            model: "dit".into(),
            levels: 0,
            layers,
        }
    }

    /// The predicted noise for `x` at timesteps `t`.
    ///
    /// # Shapes
    /// `x: [b, channels, h, w]` (the whole latent on every rank), `t: [b]` → `[b, channels, h, w]`.
    pub fn forward(&self, ctx: &StepCtx, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let d = self.cfg.dim;
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
        let mut h = self.stem.forward(ctx, x)?;
        for blk in &self.blocks {
            let id = blk.name.as_str();
            let (rows, cols) = (h.shape()[2], h.shape()[3]);
            h = h.add(&blk.pos.forward(ctx, &h)?).at(id)?;
            let mut tok = h.to_tokens().at(id)?;
            let m = blk.ada.forward(id, &temb)?;
            let m: Vec<Tensor> = m
                .chunk(6, 1)
                .at(id)?
                .into_iter()
                .map(|c| c.reshape(&[b, 1, d]))
                .collect::<std::result::Result<_, _>>()
                .at(id)?;
            let modulate = |x: &Tensor, shift: &Tensor, scale: &Tensor| -> Result<Tensor> {
                x.layer_norm(None, None, 1e-6)
                    .and_then(|n| n.add(&n.mul(scale)?))
                    .and_then(|n| n.add(shift))
                    .at(id)
            };
            let a = modulate(&tok, &m[0], &m[1])?;
            let a = blk.attn.forward(ctx, &a, (rows, cols))?;
            tok = tok.add(&a.mul(&m[2]).at(id)?).at(id)?;
            let f = modulate(&tok, &m[3], &m[4])?;
            let f = blk.mlp_in.forward(id, &f)?.act(Activation::Gelu).at(id)?;
            let f = blk.mlp_out.forward(id, &f)?;
            tok = tok.add(&f.mul(&m[5]).at(id)?).at(id)?;
            h = tok.from_tokens(rows, cols).at(id)?;
        }
        let h = self.norm_out.forward(ctx, &h, true)?;
        let h = self.conv_out.forward(ctx, &h)?;
        self.gather.forward(ctx, &h)
    }
}
