//! Weights as the device stores them, from the mapped checkpoint without an
//! f32 copy: a tensor whose dtype the device keeps is handed to the upload
//! as the file's own bytes; bf16 that becomes f16 (before sm_80) is
//! converted element by element into 2-byte values; only a tensor the
//! device keeps in f32 (f32 stored, or bf16 beyond f16's range) is 4 bytes
//! an element on the host. A 70B bf16 checkpoint on sm_80 thus costs no
//! host memory beyond its mapping, instead of 280 GB of f32.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::model::weights::DType;

/// Elements to upload, in the device dtype.
#[derive(Debug)]
pub enum HostBits<'a> {
    /// f16 or bf16 patterns.
    Half(Cow<'a, [u16]>),
    F32(Cow<'a, [f32]>),
}

/// Little-endian 2-byte elements of `raw`: borrowed when aligned (the
/// usual case: safetensors aligns its data), else copied.
fn halves(raw: &[u8]) -> Cow<'_, [u16]> {
    match bytemuck::try_cast_slice::<u8, u16>(raw) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(
            raw.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect(),
        ),
    }
}

/// Largest |x| of bf16 data, read from the bits (NaN is ignored; an
/// infinity gives infinity).
pub fn bf16_max_abs(raw: &[u8]) -> f32 {
    halves(raw)
        .iter()
        .map(|&b| bf16::from_bits(b).to_f32().abs())
        .filter(|x| !x.is_nan())
        .fold(0.0, f32::max)
}

/// `raw` (stored as `stored`) in the device dtype `device`.
pub fn device_bits(raw: &[u8], stored: DType, device: DType) -> HostBits<'_> {
    match (stored, device) {
        (DType::F16, DType::F16) | (DType::BF16, DType::BF16) => HostBits::Half(halves(raw)),
        (DType::BF16, DType::F16) => HostBits::Half(Cow::Owned(
            halves(raw)
                .iter()
                .map(|&b| f16::from_f32(bf16::from_bits(b).to_f32()).to_bits())
                .collect(),
        )),
        (DType::F32, DType::F32) => match bytemuck::try_cast_slice::<u8, f32>(raw) {
            Ok(s) => HostBits::F32(Cow::Borrowed(s)),
            Err(_) => HostBits::F32(Cow::Owned(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            )),
        },
        (s, _) => {
            // Widening to f32 (the device keeps this tensor in f32).
            let h = halves(raw);
            let wide = h.iter().map(|&b| match s {
                DType::F16 => f16::from_bits(b).to_f32(),
                _ => bf16::from_bits(b).to_f32(),
            });
            match device {
                DType::F32 => HostBits::F32(Cow::Owned(wide.collect())),
                DType::F16 => HostBits::Half(Cow::Owned(
                    wide.map(|x| f16::from_f32(x).to_bits()).collect(),
                )),
                // Quantized blocks are widened by the caller (`upload_w`)
                // and never reach here; bf16 bits for anything else.
                DType::BF16 | DType::Q(_) => HostBits::Half(Cow::Owned(
                    wide.map(|x| bf16::from_f32(x).to_bits()).collect(),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|b| b.to_le_bytes()).collect()
    }

    #[test]
    fn f16_and_bf16_kept_on_the_device_are_uploaded_from_the_file_bytes() {
        let vals = [1.5f32, -2.0, 65504.0, 1e-3];
        // An aligned buffer, as a mapped safetensors file gives.
        let bits: Vec<u16> = vals.iter().map(|v| f16::from_f32(*v).to_bits()).collect();
        let raw: &[u8] = bytemuck::cast_slice(&bits);
        match device_bits(raw, DType::F16, DType::F16) {
            HostBits::Half(Cow::Borrowed(s)) => {
                assert_eq!(s.as_ptr() as usize, raw.as_ptr() as usize)
            }
            other => panic!("f16 copied or widened: {other:?}"),
        }
        let bbits: Vec<u16> = vals.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        let braw: &[u8] = bytemuck::cast_slice(&bbits);
        assert!(matches!(
            device_bits(braw, DType::BF16, DType::BF16),
            HostBits::Half(Cow::Borrowed(_))
        ));
    }

    #[test]
    fn bf16_becomes_f16_two_bytes_an_element_and_its_range_is_read_from_the_bits() {
        let vals = [1.5f32, -2.0, 300.0, -0.0078125, 65280.0];
        let bbits: Vec<u16> = vals.iter().map(|v| bf16::from_f32(*v).to_bits()).collect();
        let raw = le(&bbits);
        assert_eq!(bf16_max_abs(&raw), 65280.0);
        match device_bits(&raw, DType::BF16, DType::F16) {
            HostBits::Half(h) => {
                let back: Vec<f32> = h.iter().map(|&b| f16::from_bits(b).to_f32()).collect();
                assert_eq!(back, vals, "bf16 in f16's range converts exactly");
            }
            other => panic!("{other:?}"),
        }
        // Unaligned bytes (an odd offset) still convert.
        let mut shifted = vec![0u8];
        shifted.extend(&raw);
        assert_eq!(bf16_max_abs(&shifted[1..]), 65280.0);
        // Out of f16's range the device keeps f32.
        let big = le(&[bf16::from_f32(1e6).to_bits()]);
        match device_bits(&big, DType::BF16, DType::F32) {
            HostBits::F32(v) => assert_eq!(v[0], bf16::from_f32(1e6).to_f32()),
            other => panic!("{other:?}"),
        }
    }
}
