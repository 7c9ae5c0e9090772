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
//! - GTX 1080 Ti, Titan Xp: "NVIDIA GeForce GTX 1080" whitepaper (GP102
//!   figures) and the product pages' specifications (250 W).
//! - Titan V: "NVIDIA Titan V" product page specifications; Volta whitepaper.
//! - RTX 2080 Ti: "NVIDIA Turing GPU Architecture" whitepaper, appendix A
//!   (Founders Edition, 260 W; GeForce tensor rate with fp32 accumulate).
//! - RTX A4000, A5000, A6000: "NVIDIA RTX A4000 / A5000 / A6000" datasheets
//!   (2021); tensor rates there are with sparsity, halved here.
//! - A40: "NVIDIA A40" datasheet (2021), sparsity halved.
//! - Quadro P5000, P6000: "Quadro P5000 / P6000" datasheets (2016).
//!
//! Idle power: NVIDIA's datasheets do not state it. The figures are what
//! `nvidia-smi` reports for an idle card with persistence mode on (lowest
//! performance state, no context), rounded up, so they err towards more
//! draw. A card on which copyhold runs nothing counts at this figure.
//!
//! A product missing from the table never counts as 0 W: [`fallback`] gives
//! the highest rated (and idle) power of the table's cards of the same
//! memory class, and the energy budget names the product in a condition.

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
    /// Power at idle (no context, lowest performance state), watts: what a
    /// card draws when nothing runs on it. Rounded up; see the sources.
    pub idle_w: f64,
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

// One row of the table: the arguments are its columns.
#[allow(clippy::too_many_arguments)]
const fn gpu(
    product: &'static str,
    gib: u64,
    bandwidth_gbs: f64,
    tdp_w: f64,
    idle_w: f64,
    cc: (u8, u8),
    fp16_tflops: f64,
    fp32_tflops: f64,
) -> GpuInfo {
    GpuInfo {
        product,
        memory_bytes: gib * GIB,
        bandwidth_gbs,
        tdp_w,
        idle_w,
        compute_capability: cc,
        fp16_tflops,
        fp32_tflops,
    }
}

/// The catalog. Product names are as GFD writes them.
pub const CATALOG: &[GpuInfo] = &[
    gpu("Tesla-P4", 8, 192.0, 75.0, 10.0, (6, 1), 0.09, 5.5),
    gpu("Tesla-P40", 24, 346.0, 250.0, 50.0, (6, 1), 0.18, 11.8),
    gpu(
        "Tesla-P100-PCIE-12GB",
        12,
        549.0,
        250.0,
        30.0,
        (6, 0),
        18.7,
        9.3,
    ),
    gpu(
        "Tesla-P100-PCIE-16GB",
        16,
        732.0,
        250.0,
        30.0,
        (6, 0),
        18.7,
        9.3,
    ),
    gpu(
        "Tesla-P100-SXM2-16GB",
        16,
        732.0,
        300.0,
        35.0,
        (6, 0),
        21.2,
        10.6,
    ),
    gpu(
        "Tesla-V100-PCIE-16GB",
        16,
        900.0,
        250.0,
        35.0,
        (7, 0),
        112.0,
        14.0,
    ),
    gpu(
        "Tesla-V100-PCIE-32GB",
        32,
        900.0,
        250.0,
        35.0,
        (7, 0),
        112.0,
        14.0,
    ),
    gpu(
        "Tesla-V100-SXM2-16GB",
        16,
        900.0,
        300.0,
        45.0,
        (7, 0),
        125.0,
        15.7,
    ),
    gpu(
        "Tesla-V100-SXM2-32GB",
        32,
        900.0,
        300.0,
        45.0,
        (7, 0),
        125.0,
        15.7,
    ),
    gpu(
        "Tesla-V100S-PCIE-32GB",
        32,
        1134.0,
        250.0,
        35.0,
        (7, 0),
        130.0,
        16.4,
    ),
    gpu("Tesla-T4", 16, 320.0, 70.0, 10.0, (7, 5), 65.0, 8.1),
    gpu("NVIDIA-A10", 24, 600.0, 150.0, 20.0, (8, 6), 125.0, 31.2),
    gpu(
        "NVIDIA-A100-PCIE-40GB",
        40,
        1555.0,
        250.0,
        35.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu(
        "NVIDIA-A100-80GB-PCIe",
        80,
        1935.0,
        300.0,
        45.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu(
        "NVIDIA-A100-SXM4-40GB",
        40,
        1555.0,
        400.0,
        55.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu(
        "NVIDIA-A100-SXM4-80GB",
        80,
        2039.0,
        400.0,
        60.0,
        (8, 0),
        312.0,
        19.5,
    ),
    gpu("NVIDIA-L4", 24, 300.0, 72.0, 16.0, (8, 9), 121.0, 30.3),
    gpu(
        "NVIDIA-GeForce-RTX-3090",
        24,
        936.0,
        350.0,
        30.0,
        (8, 6),
        71.0,
        35.6,
    ),
    gpu(
        "NVIDIA-GeForce-RTX-4090",
        24,
        1008.0,
        450.0,
        25.0,
        (8, 9),
        165.2,
        82.6,
    ),
    gpu(
        "NVIDIA-H100-PCIe",
        80,
        2000.0,
        350.0,
        50.0,
        (9, 0),
        756.0,
        51.2,
    ),
    gpu(
        "NVIDIA-H100-80GB-HBM3",
        80,
        3350.0,
        700.0,
        75.0,
        (9, 0),
        989.0,
        66.9,
    ),
    // Cards a community is likely to own second-hand.
    gpu(
        "NVIDIA-GeForce-GTX-1080-Ti",
        11,
        484.0,
        250.0,
        15.0,
        (6, 1),
        0.18,
        11.3,
    ),
    gpu(
        "NVIDIA-TITAN-Xp",
        12,
        548.0,
        250.0,
        15.0,
        (6, 1),
        0.19,
        12.1,
    ),
    gpu(
        "NVIDIA-TITAN-V",
        12,
        653.0,
        250.0,
        30.0,
        (7, 0),
        110.0,
        14.9,
    ),
    gpu(
        "NVIDIA-GeForce-RTX-2080-Ti",
        11,
        616.0,
        260.0,
        25.0,
        (7, 5),
        53.8,
        13.4,
    ),
    gpu(
        "NVIDIA-RTX-A4000",
        16,
        448.0,
        140.0,
        15.0,
        (8, 6),
        76.7,
        19.2,
    ),
    gpu(
        "NVIDIA-RTX-A5000",
        24,
        768.0,
        230.0,
        25.0,
        (8, 6),
        111.1,
        27.8,
    ),
    gpu(
        "NVIDIA-RTX-A6000",
        48,
        768.0,
        300.0,
        30.0,
        (8, 6),
        154.8,
        38.7,
    ),
    gpu("NVIDIA-A40", 48, 696.0, 300.0, 35.0, (8, 6), 149.7, 37.4),
    gpu("Quadro-P5000", 16, 288.0, 180.0, 15.0, (6, 1), 0.14, 8.9),
    gpu("Quadro-P6000", 24, 432.0, 250.0, 20.0, (6, 1), 0.20, 12.6),
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

/// Memory classes, upper bounds in GiB: a card belongs to the first class
/// its memory fits in.
const MEMORY_CLASSES_GIB: [u64; 6] = [12, 16, 24, 48, 80, u64::MAX];

fn memory_class(bytes: u64) -> usize {
    let gib = bytes.div_ceil(GIB);
    MEMORY_CLASSES_GIB
        .iter()
        .position(|c| gib <= *c)
        .unwrap_or(MEMORY_CLASSES_GIB.len() - 1)
}

/// Conservative power of a product missing from the catalog: the highest
/// rated and idle power among the catalog's cards of the memory class
/// `memory_bytes` falls in (the node's `nvidia.com/gpu.memory` label), or of
/// the whole catalog when the memory is unknown or no card shares the class.
/// Never 0 W: a budget must not think an unknown card is free.
pub fn fallback(memory_bytes: Option<u64>) -> GpuPower {
    let class = memory_bytes.map(memory_class);
    let pick = |same_class: bool| {
        CATALOG
            .iter()
            .filter(|g| !same_class || class == Some(memory_class(g.memory_bytes)))
            .fold(GpuPower::default(), |p, g| GpuPower {
                rated_w: p.rated_w.max(g.tdp_w),
                idle_w: p.idle_w.max(g.idle_w),
            })
    };
    let p = pick(class.is_some());
    if p.rated_w > 0.0 { p } else { pick(false) }
}

/// Rated and idle power of one GPU, watts.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuPower {
    pub rated_w: f64,
    pub idle_w: f64,
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
                g.bandwidth_gbs > 0.0 && g.tdp_w > g.idle_w && g.idle_w > 0.0 && g.memory_bytes > 0,
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
    fn the_second_hand_cards_are_in_the_catalog_with_rated_and_idle_power() {
        for p in [
            "NVIDIA GeForce GTX 1080 Ti",
            "NVIDIA TITAN Xp",
            "NVIDIA TITAN V",
            "NVIDIA GeForce RTX 2080 Ti",
            "NVIDIA GeForce RTX 3090",
            "NVIDIA RTX A4000",
            "NVIDIA RTX A5000",
            "NVIDIA RTX A6000",
            "NVIDIA A40",
            "NVIDIA A10",
            "NVIDIA L4",
            "Quadro P5000",
            "Quadro P6000",
        ] {
            let g = lookup(&p.replace(' ', "-"));
            assert!(
                g.is_some_and(|g| g.tdp_w > g.idle_w && g.idle_w > 0.0),
                "{p}: {g:?}"
            );
        }
    }

    #[test]
    fn a_product_missing_from_the_catalog_counts_at_the_highest_power_of_its_memory_class() {
        assert!(lookup("Radeon-Instinct-MI50").is_none());
        // 16 GB class: the P100 SXM2 and V100 SXM2 16 GB at 300 W are the highest.
        let p = fallback(Some(16 * GIB));
        assert_eq!(p.rated_w, 300.0);
        assert_eq!(p.idle_w, 45.0);
        // 24 GB: the RTX 4090 at 450 W.
        assert_eq!(fallback(Some(23_028 * 1024 * 1024)).rated_w, 450.0);
        // Unknown memory: the highest of all (H100 SXM5).
        assert_eq!(fallback(None).rated_w, 700.0);
        // Beyond the largest card: the class above 80 GiB is empty; the whole table.
        assert_eq!(fallback(Some(192 * GIB)).rated_w, 700.0);
        for g in CATALOG {
            let f = fallback(Some(g.memory_bytes));
            assert!(f.rated_w >= g.tdp_w && f.idle_w >= g.idle_w, "{g:?}");
        }
    }

    #[test]
    fn v100_is_more_efficient_per_watt_than_p40_and_t4_than_v100() {
        let eff = |p| lookup(p).map(GpuInfo::bandwidth_per_watt).unwrap_or(0.0);
        assert!(eff("Tesla-V100-SXM2-32GB") > eff("Tesla-P40"));
        assert!(eff("Tesla-T4") > eff("Tesla-V100-SXM2-32GB"));
    }
}
