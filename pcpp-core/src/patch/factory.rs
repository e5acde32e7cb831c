//! [`PatchRuntime`] as a [`LayerFactory`]: which layer each mode builds (serial layers for one
//! rank, tensor-parallel layers of [`crate::tensor`], patch-parallel layers otherwise) and the
//! stale-cache slot each communicating layer registers.

use std::sync::Arc;

use pcpp_comm::CommKind;
use pcpp_kernels::Tensor;

use super::attention::{PatchAttention, PatchProjectedAttention};
use super::gather::PatchGather;
use super::group_norm::PatchGroupNorm;
use super::halo_conv::HaloConv;
use super::input_conv::InputConv;
use super::locator::PatchLocator;
use super::PatchRuntime;
use crate::layers::{
    whole_feed_forward, whole_projected_attention, AttentionWeights, BandLocator, ChannelSplit,
    Conv2dLayer, FeedForwardLayer, FeedForwardWeights, GatherLayer, GroupNormLayer, LayerFactory,
    ProjectedAttentionLayer, Result, SelfAttentionLayer, SerialFactory,
};

impl LayerFactory for PatchRuntime {
    fn conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.fine_conv2d(id, weight, bias, stride, padding, 0)
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
        let k = weight.shape().get(2).copied().unwrap_or(1);
        if self.sh.topo.serial || self.sh.tensor() || (k == 1 && padding == 0) {
            return SerialFactory.conv2d(id, weight, bias, stride, padding);
        }
        let slot = self.slot_for(id, CommKind::Halo)?;
        Ok(Arc::new(HaloConv {
            id: id.to_string(),
            sh: self.sh.clone(),
            weight,
            bias,
            stride,
            pad: padding,
            slot,
            up,
        }))
    }

    fn input_conv2d(
        &self,
        id: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<dyn Conv2dLayer>> {
        self.fine_input_conv2d(id, weight, bias, stride, padding, 0)
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
        if self.sh.topo.serial || self.sh.tensor() {
            return SerialFactory.input_conv2d(id, weight, bias, stride, padding);
        }
        Ok(Arc::new(InputConv {
            id: id.to_string(),
            sh: self.sh.clone(),
            weight,
            bias,
            stride,
            pad: padding,
            up,
        }))
    }

    fn group_norm(
        &self,
        id: &str,
        groups: usize,
        eps: f64,
        gamma: Option<Tensor>,
        beta: Option<Tensor>,
    ) -> Result<Arc<dyn GroupNormLayer>> {
        if self.sh.topo.serial || self.sh.tensor() {
            return SerialFactory.group_norm(id, groups, eps, gamma, beta);
        }
        let slot = self.slot_for(id, CommKind::GroupNorm)?;
        Ok(Arc::new(PatchGroupNorm {
            id: id.to_string(),
            sh: self.sh.clone(),
            groups,
            eps,
            gamma,
            beta,
            slot,
        }))
    }

    fn self_attention(
        &self,
        id: &str,
        weights: AttentionWeights,
    ) -> Result<Arc<dyn SelfAttentionLayer>> {
        if self.sh.topo.serial {
            return SerialFactory.self_attention(id, weights);
        }
        if self.sh.tensor() {
            return crate::tensor::attention(self.sh.clone(), id, weights);
        }
        let slot = self.slot_for(id, CommKind::Attention)?;
        Ok(Arc::new(PatchAttention::new(
            id,
            self.sh.clone(),
            weights,
            slot,
        )?))
    }

    fn projected_attention(
        &self,
        id: &str,
        heads: usize,
    ) -> Result<Arc<dyn ProjectedAttentionLayer>> {
        if self.sh.topo.serial || self.sh.tensor() {
            // Tensor parallelism keeps the whole image on every rank and runs this whole.
            return Ok(whole_projected_attention(id, heads));
        }
        let slot = self.slot_for(id, CommKind::Attention)?;
        Ok(Arc::new(PatchProjectedAttention {
            id: id.to_string(),
            sh: self.sh.clone(),
            heads,
            slot,
        }))
    }

    fn band_locator(&self, id: &str) -> Result<Arc<dyn BandLocator>> {
        Ok(Arc::new(PatchLocator {
            id: id.to_string(),
            sh: self.sh.clone(),
        }))
    }

    fn gather(&self, id: &str) -> Result<Arc<dyn GatherLayer>> {
        if self.sh.topo.serial {
            return SerialFactory.gather(id);
        }
        if self.sh.tensor() {
            return Ok(crate::tensor::gather(self.sh.clone(), id));
        }
        Ok(Arc::new(PatchGather {
            id: id.to_string(),
            sh: self.sh.clone(),
        }))
    }

    fn feed_forward(
        &self,
        id: &str,
        weights: FeedForwardWeights,
    ) -> Result<Arc<dyn FeedForwardLayer>> {
        if self.sh.tensor() {
            return crate::tensor::feed_forward(self.sh.clone(), id, weights);
        }
        Ok(whole_feed_forward(id, weights))
    }

    fn channel_split(
        &self,
        id: &str,
        channels: usize,
        groups: usize,
    ) -> Result<Option<Arc<dyn ChannelSplit>>> {
        if self.sh.tensor() {
            return crate::tensor::channel_split(self.sh.clone(), id, channels, groups).map(Some);
        }
        Ok(None)
    }
}
