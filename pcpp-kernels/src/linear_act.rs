//! A linear layer and the work after it in one op: `Tensor::linear_act` (the up-projection and
//! tanh-approximated GELU of diffusers' `FeedForward("gelu-approximate")` and of Flux.1's
//! single-stream `proj_mlp`) and `Tensor::linear_add` (a GEMM accumulating onto a tensor, e.g. the
//! two halves of Flux.1's single-stream `proj_out` over `[attention; mlp]` without concatenating
//! them), and `Tensor::linear_geglu` (diffusers' `GEGLU`: the feed-forward input projection and
//! its gated exact GELU). On the GPU, with [`crate::cuda::fused_epilogues`] on, the GELU runs in
//! cuBLASLt's epilogue and the accumulator is its C operand, both on the f32 accumulator (one
//! pass over the output instead of three, and one rounding); GEGLU runs in the epilogue of the
//! small-row GEMM kernels where they apply ([`crate::cuda::small_gemm`]); everywhere else each is
//! `linear` then `act` / `add` / `geglu`, so the CPU twins are exactly the compositions.

use crate::{Activation, Result, Tensor};

impl Tensor {
    /// `act(self · wᵀ + bias)`.
    ///
    /// # Shapes
    /// `self: [..., k]`, `w: [n, k]`, `bias: [n]` → `[..., n]`.
    pub fn linear_act(&self, w: &Tensor, bias: Option<&Tensor>, act: Activation) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if act == Activation::GeluTanh
            && crate::cuda::fused_epilogues()
            && self.is_cuda()
            && w.is_cuda()
            && self.device() == w.device()
            && bias.map_or(true, |b| b.device() == w.device())
        {
            let k = *self.shape().last().unwrap_or(&0);
            if w.rank() == 2
                && w.shape()[1] == k
                && bias.map_or(true, |b| b.shape() == [w.shape()[0]])
            {
                let mut shape = self.shape().to_vec();
                *shape.last_mut().unwrap_or(&mut 0) = w.shape()[0];
                let _timed =
                    crate::cuda::profile::scope(crate::cpu::profile::Kernel::Linear, self.device());
                return crate::cuda::linear_gelu_tanh(self, w, bias, &shape);
            }
        }
        self.linear(w, bias)?.act(act)
    }

    /// `GEGLU(self · wᵀ + bias)`: with `[h | gate]` the two halves of the projection's output,
    /// `h · gelu(gate)` (exact GELU).
    ///
    /// # Shapes
    /// `self: [..., k]`, `w: [2n, k]`, `bias: [2n]` → `[..., n]`.
    pub fn linear_geglu(&self, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let k = *self.shape().last().unwrap_or(&0);
        if w.rank() != 2 || w.shape()[1] != k || w.shape()[0] % 2 != 0 {
            return Err(crate::KernelError::shape(
                "linear_geglu",
                self.shape(),
                w.shape(),
            ));
        }
        if let Some(b) = bias {
            if b.shape() != [w.shape()[0]] {
                return Err(crate::KernelError::shape(
                    "linear_geglu (bias)",
                    w.shape(),
                    b.shape(),
                ));
            }
        }
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu("linear_geglu", &[Some(self), Some(w), bias])? {
            let mut shape = self.shape().to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = w.shape()[0] / 2;
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::Linear, self.device());
            return crate::cuda::linear_geglu(self, w, bias, &shape);
        }
        self.linear(w, bias)?.geglu()
    }

    /// `acc + self · wᵀ + bias`.
    ///
    /// # Shapes
    /// `self: [..., k]`, `w: [n, k]`, `bias: [n]`, `acc: [..., n]` → `[..., n]`.
    pub fn linear_add(&self, w: &Tensor, bias: Option<&Tensor>, acc: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if crate::cuda::fused_epilogues()
            && self.is_cuda()
            && [w.device(), acc.device()] == [self.device(); 2]
            && bias.map_or(true, |b| b.device() == w.device())
            && self.dtype() == w.dtype()
            && acc.dtype() == w.dtype()
        {
            let k = *self.shape().last().unwrap_or(&0);
            let mut shape = self.shape().to_vec();
            *shape.last_mut().unwrap_or(&mut 0) = w.shape().first().copied().unwrap_or(0);
            if w.rank() == 2
                && w.shape()[1] == k
                && bias.map_or(true, |b| b.shape() == [w.shape()[0]])
                && acc.shape() == shape.as_slice()
            {
                let _timed =
                    crate::cuda::profile::scope(crate::cpu::profile::Kernel::Linear, self.device());
                return crate::cuda::linear_add(self, w, bias, acc);
            }
        }
        self.linear(w, bias)?.add(acc)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Activation, Tensor};

    #[test]
    fn linear_act_is_linear_then_act_on_the_cpu() {
        let x =
            Tensor::from_vec(&[2, 3, 4], (0..24).map(|i| i as f32 * 0.1 - 1.0).collect()).unwrap();
        let w =
            Tensor::from_vec(&[5, 4], (0..20).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
        let b = Tensor::from_vec(&[5], vec![0.1, -0.2, 0.3, 0.0, 0.5]).unwrap();
        for act in [Activation::GeluTanh, Activation::Silu] {
            let got = x.linear_act(&w, Some(&b), act).unwrap();
            let want = x.linear(&w, Some(&b)).unwrap().act(act).unwrap();
            assert_eq!(got.shape(), &[2, 3, 5]);
            assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        }
        assert!(x.linear_act(&b, None, Activation::GeluTanh).is_err());
        let acc = Tensor::from_vec(&[2, 3, 5], (0..30).map(|i| i as f32 * 0.01).collect()).unwrap();
        let got = x.linear_add(&w, Some(&b), &acc).unwrap();
        let want = x.linear(&w, Some(&b)).unwrap().add(&acc).unwrap();
        assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        assert!(x.linear_add(&b, None, &acc).is_err());
    }

    #[test]
    fn linear_geglu_is_linear_then_geglu_on_the_cpu() {
        let x =
            Tensor::from_vec(&[2, 3, 4], (0..24).map(|i| i as f32 * 0.1 - 1.0).collect()).unwrap();
        let w =
            Tensor::from_vec(&[6, 4], (0..24).map(|i| (i as f32 * 0.37).sin()).collect()).unwrap();
        let b = Tensor::from_vec(&[6], vec![0.1, -0.2, 0.3, 0.0, 0.5, -0.4]).unwrap();
        for bias in [Some(&b), None] {
            let got = x.linear_geglu(&w, bias).unwrap();
            let want = x.linear(&w, bias).unwrap().geglu().unwrap();
            assert_eq!(got.shape(), &[2, 3, 3]);
            assert_eq!(got.to_vec_f32().unwrap(), want.to_vec_f32().unwrap());
        }
        // An odd projection width, a bias of the wrong length, a wrong inner size.
        let w5 = Tensor::from_vec(&[5, 4], vec![0.0; 20]).unwrap();
        assert!(x.linear_geglu(&w5, None).is_err());
        let b5 = Tensor::from_vec(&[5], vec![0.0; 5]).unwrap();
        assert!(x.linear_geglu(&w, Some(&b5)).is_err());
        let w3 = Tensor::from_vec(&[6, 3], vec![0.0; 18]).unwrap();
        assert!(x.linear_geglu(&w3, None).is_err());
    }
}
