//! Attention over q, k and v that are column blocks of wider matrices: the output of one fused
//! projection (`[q | k | v] = x · [Wq; Wk; Wv]ᵀ`, or `[k | v]` of a patch-parallel layer's K/V
//! window) attended over without first copying each block out. On Hopper the warp-specialised
//! kernel's TMA maps read the blocks in place (a row stride wider than the block); everywhere else
//! the blocks are copied out and [`Tensor::attention`] runs, so the CPU twin is that composition.

use crate::{KernelError, Result, Tensor};

/// Columns `start..start + width` of a `[b, l, n]` tensor (`width` is the attention's).
#[derive(Debug, Clone, Copy)]
pub struct Cols<'a> {
    pub t: &'a Tensor,
    pub start: usize,
}

impl<'a> Cols<'a> {
    /// Columns from `start` of `t`.
    pub fn new(t: &'a Tensor, start: usize) -> Self {
        Cols { t, start }
    }

    /// The block as a tensor of its own (a copy unless it is all of `t`).
    fn take(&self, width: usize) -> Result<Tensor> {
        if self.start == 0 && self.t.shape()[2] == width {
            Ok(self.t.clone())
        } else {
            self.t.narrow(2, self.start, width)
        }
    }
}

impl Tensor {
    /// [`Tensor::attention`] of the `width`-column blocks `q`, `k` and `v`.
    ///
    /// # Shapes
    /// `q.t: [b, lq, nq]`, `k.t, v.t: [b, lk, n]` with `start + width` within each → `[b, lq,
    /// width]`.
    pub fn attention_packed(
        q: Cols,
        k: Cols,
        v: Cols,
        width: usize,
        heads: usize,
        causal: bool,
    ) -> Result<Tensor> {
        for (name, c) in [("q", &q), ("k", &k), ("v", &v)] {
            if c.t.rank() != 3 || c.start + width > c.t.shape()[2] {
                return Err(KernelError::invalid(
                    "attention_packed",
                    format!(
                        "{name}: columns {}..{} of {:?}",
                        c.start,
                        c.start + width,
                        c.t.shape()
                    ),
                ));
            }
        }
        if k.t.shape()[..2] != v.t.shape()[..2] || q.t.shape()[0] != k.t.shape()[0] {
            return Err(KernelError::shape(
                "attention_packed",
                q.t.shape(),
                k.t.shape(),
            ));
        }
        #[cfg(feature = "cuda")]
        if crate::ops::on_gpu("attention_packed", &[Some(q.t), Some(k.t), Some(v.t)])?
            && heads > 0
            && width % heads == 0
            && k.t.shape()[1] > 0
        {
            let _timed =
                crate::cuda::profile::scope(crate::cpu::profile::Kernel::Attention, q.t.device());
            if let Some(y) = crate::cuda::attention_in_place(q, k, v, width, heads, causal)? {
                return Ok(y);
            }
        }
        Tensor::attention(
            &q.take(width)?,
            &k.take(width)?,
            &v.take(width)?,
            heads,
            causal,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::Cols;
    use crate::test_util::rnd;
    use crate::Tensor;

    /// The blocks are the right columns: a stacked `[q | k | v]` against attention of the three
    /// tensors stacked into it.
    #[test]
    fn blocks_of_a_stacked_projection_are_its_q_k_and_v() {
        let (q, k, v) = (rnd(&[2, 5, 8], 1), rnd(&[2, 5, 8], 2), rnd(&[2, 5, 8], 3));
        let qkv = Tensor::cat(&[&q, &k, &v], 2).unwrap();
        let want = Tensor::attention(&q, &k, &v, 2, false).unwrap();
        let got = Tensor::attention_packed(
            Cols::new(&qkv, 0),
            Cols::new(&qkv, 8),
            Cols::new(&qkv, 16),
            8,
            2,
            false,
        )
        .unwrap();
        assert_eq!(got.max_abs_diff(&want).unwrap(), 0.0);
    }

    #[test]
    fn blocks_outside_their_tensor_are_errors() {
        let t = rnd(&[1, 4, 8], 1);
        let u = rnd(&[1, 3, 8], 2);
        let err = |q: Cols, k: Cols, v: Cols, w: usize| {
            Tensor::attention_packed(q, k, v, w, 1, false)
                .unwrap_err()
                .to_string()
        };
        let e = err(Cols::new(&t, 0), Cols::new(&t, 4), Cols::new(&t, 0), 8);
        assert!(e.contains("k: columns 4..12"), "{e}");
        let e = err(Cols::new(&t, 0), Cols::new(&t, 0), Cols::new(&u, 0), 8);
        assert!(e.contains("attention_packed"), "{e}");
    }
}
