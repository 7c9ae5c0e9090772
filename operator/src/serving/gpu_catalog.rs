//! What we know about GPU products, keyed by the value GPU Feature Discovery
//! puts in the `nvidia.com/gpu.product` label (NVML's product name with
//! spaces replaced by `-`, e.g. `Tesla-P100-PCIE-16GB`).
//!
//! Placement ranks classes by estimated tokens per joule. Decoding is bound
//! by memory bandwidth, so bandwidth ÷ board power is the estimate; a product
//! not in the table falls back to what its node's labels say (memory and
//! compute capability) and ranks last.
//!
//! Sources (vendor datasheets; board TDP, peak dense rates without sparsity;
//! fp16 is the tensor-core rate where the card has tensor cores, else the
//! CUDA-core rate):
//! - Tesla P4, P40: NVIDIA "Tesla P4 / P40 Inferencing Accelerators" datasheets
//!   (2016); fp16 runs at 1/64 of fp32 on GP102/GP104.
//! - Tesla P100: "NVIDIA Tesla P100 PCIe" datasheet (2016) and the
//!   "Tesla P100 for NVLink-optimized servers" datasheet (SXM2).
//! - Tesla V100: "NVIDIA Tesla V100 GPU Accelerator" datasheet (2018), PCIe
//!   and SXM2, 16 and 32 GB.
//! - Tesla T4: "NVIDIA T4 Tensor Core GPU" datasheet (2019).
//! - A10: "NVIDIA A10 Tensor Core GPU" datasheet (2021).
//! - A100: "NVIDIA A100 Tensor Core GPU" datasheet (2021), 40/80 GB PCIe and
//!   SXM4.
//! - L4: "NVIDIA L4 Tensor Core GPU" datasheet (2023).
//! - RTX 3090: "NVIDIA Ampere GA102 GPU Architecture" whitepaper, appendix A.
//! - RTX 4090: "NVIDIA Ada GPU Architecture" whitepaper, appendix A.
//! - H100: "NVIDIA H100 Tensor Core GPU" datasheet (2023), PCIe and SXM5.

/// One GPU product.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GpuInfo {
    /// GFD's `nvidia.com/gpu.product` value.
    pub product: &'static str,
    /// Memory as the datasheet states it (GB, counted as GiB); the node's
    /// `nvidia.com/gpu.memory` label, when present, is more exact.
    pub memory_bytes: u64,
    /// Peak memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
    /// Board power, watts.
    pub tdp_w: f64,
    /// CUDA compute capability (major, minor).
    pub compute_capability: (u8, u8),
    /// Peak fp16 TFLOPS (tensor cores where present, dense).
    pub fp16_tflops: f64,
    /// Peak fp32 TFLOPS.
    pub fp32_tflops: f64,
}

impl GpuInfo {
    /// Estimated decode efficiency: GB/s of bandwidth per watt, which is
    /// proportional to tokens per joule for a memory-bound decoder.
    pub fn bandwidth_per_watt(&self) -> f64 {
        self.bandwidth_gbs / self.tdp_w
    }
}

const GIB: u64 = 1024 * 1024 * 1024;

const fn gpu(
    product: &'static str,
    gib: u64,
    bandwidth_gbs: f64,
    tdp_w: f64,
    cc: (u8, u8),
    fp16_tflops: f64,
    fp32_tflops: f64,
) -> GpuInfo {
    GpuInfo {
        product,
        memory_bytes: gib * GIB,
        bandwidth_gbs,
        tdp_w,
        compute_capability: cc,
        fp16_tflops,
        fp32_tflops,
    }
}

/// The catalog. Product names are as GFD writes them.
pub const CATALOG: &[GpuInfo] = &[
    gpu("Tesla-P4", 8, 192.0, 75.0, (6, 1), 0.09, 5.5),
    gpu("Tesla-P40", 24, 346.0, 250.0, (6, 1), 0.18, 11.8),
    gpu("Tesla-P100-PCIE-12GB", 12, 549.0, 250.0, (6, 0), 18.7, 9.3),
    gpu("Tesla-P100-PCIE-16GB", 16, 732.0, 250.0, (6, 0), 18.7, 9.3),
    gpu("Tesla-P100-SXM2-16GB", 16, 732.0, 300.0, (6, 0), 21.2, 10.6),
    gpu(
        "Tesla-V100-PCIE-16GB",
        16,
        900.0,
        250.0,
        (7, 0),
        112.0,
        14.0,
    ),
    gpu(
        "Tesla-V100-PCIE-32GB",
        32,
        900.0,
        250.0,
        (7, 0),
        112.0,
        14.0,
    ),
    gpu(
        "Tesla-V100-SXM2-16GB",
        16,
        900.0,
        300.0,
        (7, 0),
        125.0,
        15.7,
    ),
    gpu(
        "Tesla-V100-SXM2-32GB",
        32,
        900.0,
        300.0,
        (7, 0),
        125.0,
        15.7,
    ),
    gpu(
        "Tesla-V100S-PCIE-32GB",
        32,
        1134.0,
        250.0,
        (7, 0),
        130.0,
        16.4,
    ),
    gpu("Tesla-T4", 16, 320.0, 70.0, (7, 5), 65.0, 8.1),
    gpu("NVIDIA-A10", 24, 600.0, 150.0, (8, 6), 125.0, 31.2),
    gpu(
        "NVIDIA-A100-PCIE-40GB",
        40,
        1555.0,
        250.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu(
        "NVIDIA-A100-80GB-PCIe",
        80,
        1935.0,
        300.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu(
        "NVIDIA-A100-SXM4-40GB",
        40,
        1555.0,
        400.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu(
        "NVIDIA-A100-SXM4-80GB",
        80,
        2039.0,
        400.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu("NVIDIA-L4", 24, 300.0, 72.0, (8, 9), 121.0, 30.3),
    gpu(
        "NVIDIA-GeForce-RTX-3090",
        24,
        936.0,
        350.0,
        (8, 6),
        71.0,
        35.6,
    ),
    gpu(
        "NVIDIA-GeForce-RTX-4090",
        24,
        1008.0,
        450.0,
        (8, 9),
        165.2,
        82.6,
    ),
    gpu("NVIDIA-H100-PCIe", 80, 2000.0, 350.0, (9, 0), 756.0, 51.2),
    gpu(
        "NVIDIA-H100-80GB-HBM3",
        80,
        3350.0,
        700.0,
        (9, 0),
        989.0,
        66.9,
    ),
];

/// Reduces a product label to a comparable key: case-insensitive, without
/// the vendor prefix NVML adds or drops between driver versions, and without
/// the `-SHARED` suffix GFD adds under time-slicing.
fn key(product: &str) -> String {
    let mut k = product.trim().to_ascii_lowercase().replace([' ', '_'], "-");
    if let Some(s) = k.strip_suffix("-shared") {
        k = s.to_string();
    }
    for prefix in ["nvidia-", "tesla-"] {
        if let Some(s) = k.strip_prefix(prefix) {
            k = s.to_string();
        }
    }
    k
}

/// Whether two product names denote the same product (as [`lookup`] compares).
pub fn same_product(a: &str, b: &str) -> bool {
    key(a) == key(b)
}

/// The catalog entry for a `nvidia.com/gpu.product` label value.
pub fn lookup(product: &str) -> Option<&'static GpuInfo> {
    let k = key(product);
    CATALOG.iter().find(|g| key(g.product) == k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_gfd_label_of_the_simulated_fleet_is_found() {
        for p in [
            "Tesla-P100-PCIE-16GB",
            "Tesla-P40",
            "Tesla-V100-SXM2-32GB",
            "Tesla-T4",
        ] {
            assert_eq!(lookup(p).map(|g| g.product), Some(p));
        }
    }

    #[test]
    fn lookup_tolerates_prefixes_case_and_the_shared_suffix() {
        assert_eq!(
            lookup("NVIDIA-A100-SXM4-80GB").map(|g| g.memory_bytes),
            Some(80 * GIB)
        );
        assert_eq!(
            lookup("nvidia-geforce-rtx-3090").map(|g| g.compute_capability),
            Some((8, 6))
        );
        assert_eq!(
            lookup("Tesla-T4-SHARED").map(|g| g.product),
            Some("Tesla-T4")
        );
        assert_eq!(
            lookup("NVIDIA-H100-80GB-HBM3").map(|g| g.compute_capability),
            Some((9, 0))
        );
        assert!(lookup("Radeon-Instinct-MI50").is_none());
    }

    #[test]
    fn the_catalog_has_unique_products_and_sane_numbers() {
        for (i, g) in CATALOG.iter().enumerate() {
            assert!(
                g.bandwidth_gbs > 0.0 && g.tdp_w > 0.0 && g.memory_bytes > 0,
                "{g:?}"
            );
            assert!(g.compute_capability >= (6, 0), "{g:?}");
            assert!(
                CATALOG[..i]
                    .iter()
                    .all(|o| key(o.product) != key(g.product)),
                "duplicate {}",
                g.product
            );
        }
    }

    #[test]
    fn v100_is_more_efficient_per_watt_than_p40_and_t4_than_v100() {
        let eff = |p| lookup(p).map(GpuInfo::bandwidth_per_watt).unwrap_or(0.0);
        assert!(eff("Tesla-V100-SXM2-32GB") > eff("Tesla-P40"));
        assert!(eff("Tesla-T4") > eff("Tesla-V100-SXM2-32GB"));
    }
}
