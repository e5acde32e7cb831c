//! The byte format in which rank 0 broadcasts tensors (prompt embeddings, noise, init latents) to
//! the other ranks: per tensor its rank, its dimensions, its dtype and its elements in that dtype,
//! all little-endian, so every rank starts from bit-identical inputs.

use pcpp_kernels::{DType, Tensor};

use crate::error::{Result, SdxlError};

fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
    }
}

fn dtype_of(code: u8) -> Result<DType> {
    match code {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::BF16),
        c => Err(SdxlError::Input(format!(
            "broadcast message: unknown dtype code {c}"
        ))),
    }
}

/// The tensors (on any device) as one message.
pub fn pack(ts: &[&Tensor]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for t in ts {
        out.extend_from_slice(&(t.shape().len() as u64).to_le_bytes());
        for &d in t.shape() {
            out.extend_from_slice(&(d as u64).to_le_bytes());
        }
        out.push(dtype_code(t.dtype()));
        out.extend_from_slice(&t.to_bytes()?);
    }
    Ok(out)
}

/// A read position in a message.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, k: usize) -> Result<&'a [u8]> {
        if self.0.len() < k {
            return Err(SdxlError::Input("broadcast message too short".into()));
        }
        let (h, t) = self.0.split_at(k);
        self.0 = t;
        Ok(h)
    }

    fn u64(&mut self) -> Result<usize> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b) as usize)
    }
}

/// `n` host tensors from a message written by [`pack`].
pub fn unpack(msg: &[u8], n: usize) -> Result<Vec<Tensor>> {
    let mut c = Cursor(msg);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let rank = c.u64()?;
        if rank > 8 {
            return Err(SdxlError::Input(format!(
                "broadcast message: tensor rank {rank}"
            )));
        }
        let shape = (0..rank).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
        let dtype = dtype_of(c.take(1)?[0])?;
        let bytes = shape
            .iter()
            .try_fold(dtype.size(), |a, &d| a.checked_mul(d))
            .ok_or_else(|| SdxlError::Input("broadcast message: tensor too large".into()))?;
        out.push(Tensor::from_bytes(&shape, dtype, c.take(bytes)?)?);
    }
    if !c.0.is_empty() {
        return Err(SdxlError::Input(format!(
            "broadcast message: {} bytes left over",
            c.0.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_bit_for_bit_in_every_dtype() {
        let a = Tensor::from_vec(&[2, 3], vec![1.0, -0.1, 3.5, 1e-8, f32::MAX, 0.0]).unwrap();
        let b = a.to_dtype(DType::F16).unwrap();
        let c = a.reshape(&[6]).unwrap().to_dtype(DType::BF16).unwrap();
        let msg = pack(&[&a, &b, &c]).unwrap();
        let back = unpack(&msg, 3).unwrap();
        for (x, y) in [&a, &b, &c].iter().zip(&back) {
            assert_eq!(x.shape(), y.shape());
            assert_eq!(x.dtype(), y.dtype());
            assert_eq!(x.to_bytes().unwrap(), y.to_bytes().unwrap());
        }
        assert!(unpack(&msg, 4).is_err());
        assert!(unpack(&msg[..msg.len() - 1], 3).is_err());
        assert!(unpack(&msg, 2).is_err());
    }
}
