//! A [`LayerFactory`] that builds through another one with every layer id prefixed, so that two
//! models with the same module names (a UNet and a ControlNet copied from it) get their own
//! stale-cache slots on one runtime (PCPP §7.1: one slot per layer).

use std::ops::Range;
use std::sync::Arc;

use pcpp_kernels::Tensor;

use crate::layers::{
    AttentionWeights, BandLocator, ChannelSplit, Conv2dLayer, FeedForwardLayer, FeedForwardWeights,
    GatherLayer, GroupNormLayer, LayerFactory, ProjectedAttentionLayer, Result, SelfAttentionLayer,
    StepCtx,
};

/// Builds through `inner`, naming every layer `{prefix}{id}`.
pub struct PrefixedFactory<'a> {
    inner: &'a dyn LayerFactory,
    prefix: String,
}

impl<'a> PrefixedFactory<'a> {
    /// Layers of `inner` whose ids start with `prefix` (e.g. `"controlnet.0."`).
    pub fn new(inner: &'a dyn LayerFactory, prefix: &str) -> PrefixedFactory<'a> {
        PrefixedFactory {
            inner,
            prefix: prefix.to_string(),
        }
    }

    fn id(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }
}

impl LayerFactory for PrefixedFactory<'_> {
    fn conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.inner
            .conv2d(&self.id(id), weight, bias, stride, padding)
    }

    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.inner
            .input_conv2d(&self.id(id), weight, bias, stride, padding)
    }

    fn fine_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.inner
            .fine_conv2d(&self.id(id), weight, bias, stride, padding, up)
    }

    fn fine_input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
        up: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.inner
            .fine_input_conv2d(&self.id(id), weight, bias, stride, padding, up)
    }

    fn group_norm(
        &self,
        id: &str,
        groups: usize,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        self.inner
            .group_norm(&self.id(id), groups, eps, gamma, beta)
    }

    fn self_attention(
        &self,
        id: &str,
        weights: AttentionWeights,
    ) -> Result<Arc<dyn SelfAttentionLayer>> {
        self.inner.self_attention(&self.id(id), weights)
    }

    fn projected_attention(
        &self,
        id: &str,
        heads: usize,
    ) -> Result<Arc<dyn ProjectedAttentionLayer>> {
        self.inner.projected_attention(&self.id(id), heads)
    }

    fn band_locator(&self, id: &str) -> Result<Arc<dyn BandLocator>> {
        self.inner.band_locator(&self.id(id))
    }

    fn gather(&self, id: &str) -> Result<Arc<dyn GatherLayer>> {
        self.inner.gather(&self.id(id))
    }

    fn feed_forward(
        &self,
        id: &str,
        weights: FeedForwardWeights,
    ) -> Result<Arc<dyn FeedForwardLayer>> {
        self.inner.feed_forward(&self.id(id), weights)
    }

    fn channel_split(
        &self,
        id: &str,
        channels: usize,
        groups: usize,
    ) -> Result<Option<Arc<dyn ChannelSplit>>> {
        let inner = self.inner.channel_split(&self.id(id), channels, groups)?;
        Ok(inner.map(|inner| {
            Arc::new(PrefixedSplit {
                inner,
                prefix: self.prefix.clone(),
            }) as Arc<dyn ChannelSplit>
        }))
    }
}

/// A [`ChannelSplit`] whose group norms are named with the factory's prefix.
struct PrefixedSplit {
    inner: Arc<dyn ChannelSplit>,
    prefix: String,
}

impl ChannelSplit for PrefixedSplit {
    fn share(&self) -> Range<usize> {
        self.inner.share()
    }

    fn adds_bias(&self) -> bool {
        self.inner.adds_bias()
    }

    fn group_norm(
        &self,
        id: &str,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        self.inner
            .group_norm(&format!("{}{id}", self.prefix), eps, gamma, beta)
    }

    fn reduce(&self, ctx: &StepCtx, partial: &Tensor) -> Result<Tensor> {
        self.inner.reduce(ctx, partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcpp_comm::{LocalTransport, TransportOptions};

    #[test]
    fn prefixed_layers_get_their_own_slots() {
        LocalTransport::run(2, TransportOptions::default(), |world| {
            let rt =
                crate::PatchRuntime::new(world, false, crate::ParallelConfig::one_pass(), 8, 8, 1)?;
            let w = Tensor::zeros(&[2, 2, 3, 3], pcpp_kernels::DType::F32);
            rt.factory().conv2d("a.conv", w.clone(), None, 1, 1)?;
            PrefixedFactory::new(rt.factory(), "net.").conv2d("a.conv", w.clone(), None, 1, 1)?;
            let mut ids = rt.slot_ids();
            ids.sort();
            assert_eq!(ids, ["a.conv", "net.a.conv"]);
            // The same id twice is refused, so the prefix is what keeps them apart.
            assert!(rt.factory().conv2d("a.conv", w, None, 1, 1).is_err());
            Ok::<(), crate::CoreError>(())
        })
        .unwrap();
    }
}
