//! Memory-mapped safetensors, single file or sharded
//! (`model.safetensors.index.json`). Tensors stay in the page cache in their
//! stored dtype (f32, f16 or bf16) and are widened to f32 as the math reads
//! them, so an f16 model costs its file size in memory, not twice that.
//!
//! This is the one module allowed `unsafe`: mapping a file is unsafe because
//! another process could truncate it underneath us. Model directories are
//! read-only inputs owned by the operator, which is the usual contract for
//! mmap-loaded weights (candle, llama.cpp, vLLM all do the same).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};
use serde::Deserialize;

use crate::error::{Error, Result, read_json};
use crate::model::quant::QType;

// Tensors are reinterpreted in place from little-endian files.
#[cfg(target_endian = "big")]
compile_error!("copyhold-node reads safetensors in place and needs a little-endian target");

/// Stored element type of a weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// A GGML block format (GGUF files); rows are whole blocks.
    Q(QType),
}

impl DType {
    /// Bytes per element; block formats round up to 1 (their exact size
    /// is [`DType::row_bytes`]).
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q(_) => 1,
        }
    }

    /// Bytes of a row of `k` elements.
    pub fn row_bytes(self, k: usize) -> usize {
        match self {
            DType::Q(q) => q.row_bytes(k),
            d => d.size() * k,
        }
    }

    /// The name as reported by /v1/models and bench.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Q(QType::Q8_0) => "q8_0",
            DType::Q(QType::Q4_0) => "q4_0",
            DType::Q(QType::Q4K) => "q4_k",
            DType::Q(QType::Q5K) => "q5_k",
            DType::Q(QType::Q6K) => "q6_k",
        }
    }
}

/// The bytes behind tensors: a mapped file, or an owned buffer (GGUF's
/// Q/K projections, put back into Hugging Face row order at load).
pub type Bytes = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// A read-only tensor view into a mapped file.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    map: Bytes,
    start: usize,
    len: usize,
    /// Q4_K/Q6_K rows repacked eight at a time for the prompt kernels,
    /// made on first use and shared by the clones
    /// ([`crate::cpu::matmul::repack`]).
    pub(crate) repacked: Arc<std::sync::OnceLock<crate::cpu::matmul::repack::Packed>>,
    /// Whether `map` is a read-only file mapping (whose pages can be given
    /// back once repacked), not an owned buffer.
    file_backed: bool,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?} {:?})", self.name, self.dtype, self.shape)
    }
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A view of `len` bytes of `map` from `start`.
    pub fn new(
        name: String,
        dtype: DType,
        shape: Vec<usize>,
        map: Bytes,
        start: usize,
        len: usize,
    ) -> Tensor {
        Tensor {
            name,
            dtype,
            shape,
            map,
            start,
            len,
            repacked: Arc::default(),
            file_backed: false,
        }
    }

    /// Marks the bytes as a read-only file mapping (see
    /// [`Tensor::release_file_pages`]).
    pub fn from_file(mut self) -> Tensor {
        self.file_backed = true;
        self
    }

    /// Gives the mapped pages of a file-backed tensor back to the kernel
    /// (`MADV_DONTNEED` on the whole pages inside it): once repacked, the
    /// file's copy is not read again on this path, and keeping it counted
    /// the weights twice in RSS. A later read faults the same bytes back in
    /// from the file. Does nothing for owned buffers, where it would zero
    /// the data.
    #[allow(unsafe_code)]
    pub fn release_file_pages(&self) {
        if !self.file_backed || self.len == 0 {
            return;
        }
        // SAFETY: `bytes()` is inside the live mapping; the advice only
        // drops clean pages of a read-only file mapping (nothing in the
        // process writes it), so later reads see the file's bytes again.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize;
        let b = self.bytes();
        let (lo, hi) = (b.as_ptr() as usize, b.as_ptr() as usize + b.len());
        let (start, end) = (lo.next_multiple_of(page), hi / page * page);
        if end > start {
            // SAFETY: as above; the range is whole pages within `b`.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        &(*self.map).as_ref()[self.start..self.start + self.len]
    }

    /// Block-quantized rows: the format and the bytes (`None` for floats).
    pub fn qrows(&self) -> Option<(QType, &[u8])> {
        match self.dtype {
            DType::Q(q) => Some((q, self.bytes())),
            _ => None,
        }
    }

    /// Widens elements `[from, from + out.len())` (flat index) into `out`.
    /// Aligned data (the usual case: safetensors pads its header) goes
    /// through `half`'s SIMD conversions; unaligned data byte by byte.
    /// (Reinterpreting the little-endian file bytes in place assumes a
    /// little-endian host, which every supported target is.)
    ///
    /// Block formats are dequantized; `from` and `out.len()` must then be
    /// whole blocks (rows always are).
    pub fn read_f32(&self, from: usize, out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        if let DType::Q(q) = self.dtype {
            let (be, bb) = (q.block_elems(), q.block_bytes());
            assert!(
                from.is_multiple_of(be) && out.len().is_multiple_of(be),
                "{}: reads of {q:?} must be whole blocks",
                self.name
            );
            let b = &self.bytes()[from / be * bb..(from + out.len()) / be * bb];
            q.dequantize(b, out);
            return;
        }
        let sz = self.dtype.size();
        let b = &self.bytes()[from * sz..(from + out.len()) * sz];
        match self.dtype {
            DType::F32 => match bytemuck::try_cast_slice::<u8, f32>(b) {
                Ok(src) => out.copy_from_slice(src),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
            },
            DType::F16 => match bytemuck::try_cast_slice::<u8, f16>(b) {
                Ok(src) => src.convert_to_f32_slice(out),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                        *o = f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
            },
            DType::BF16 => match bytemuck::try_cast_slice::<u8, bf16>(b) {
                Ok(src) => src.convert_to_f32_slice(out),
                Err(_) => {
                    for (o, c) in out.iter_mut().zip(b.chunks_exact(2)) {
                        *o = bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                    }
                }
            },
            DType::Q(_) => unreachable!("handled above"),
        }
    }

    /// The stored elements as a typed slice for the fused kernels, or `None`
    /// when the data is not aligned to its element size (then callers widen
    /// with [`Tensor::read_f32`]).
    pub fn rows(&self) -> Option<WRows<'_>> {
        let b = self.bytes();
        match self.dtype {
            DType::F32 => bytemuck::try_cast_slice::<u8, f32>(b).ok().map(WRows::F32),
            DType::F16 => bytemuck::try_cast_slice::<u8, u16>(b).ok().map(WRows::F16),
            DType::BF16 => bytemuck::try_cast_slice::<u8, u16>(b).ok().map(WRows::BF16),
            DType::Q(_) => None,
        }
    }

    /// The whole tensor widened to f32 (for small tensors: norms, biases).
    pub fn to_f32(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.numel()];
        self.read_f32(0, &mut v);
        v
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

/// All tensors of a model directory, by name.
pub struct WeightStore {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// Where an absent tensor would have been looked for (for errors).
    primary: PathBuf,
}

impl WeightStore {
    /// Opens `model.safetensors`, or every shard listed in
    /// `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<WeightStore> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let index: Index = read_json(&index_path)?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            if names.is_empty() {
                return Err(Error::Safetensors {
                    path: index_path,
                    message: "weight_map is empty".into(),
                });
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut tensors = HashMap::new();
        for file in &files {
            for t in map_file(file)? {
                tensors.insert(t.name.clone(), (t, file.clone()));
            }
        }
        Ok(WeightStore {
            tensors,
            primary: if files.len() == 1 {
                files[0].clone()
            } else {
                index_path
            },
        })
    }

    /// A store over already-made tensors (GGUF files), by name.
    pub fn from_tensors(tensors: Vec<Tensor>, path: &Path) -> WeightStore {
        WeightStore {
            tensors: tensors
                .into_iter()
                .map(|t| (t.name.clone(), (t, path.to_path_buf())))
                .collect(),
            primary: path.to_path_buf(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The tensor `name`, checked to have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (t, path) = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.primary.clone(),
            tensor: name.to_string(),
        })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                path: path.clone(),
                tensor: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t.clone())
    }

    /// The stored dtype most weights use (reported by /v1/models and bench).
    pub fn dominant_dtype(&self) -> Option<DType> {
        let mut counts: HashMap<&'static str, (usize, DType)> = HashMap::new();
        for (t, _) in self.tensors.values() {
            let key = t.dtype.name();
            counts.entry(key).or_insert((0, t.dtype)).0 += t.numel();
        }
        counts.values().max_by_key(|(n, _)| *n).map(|(_, d)| *d)
    }
}

#[allow(unsafe_code)]
pub(crate) fn mmap(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: see the module comment; the file is a read-only model input.
    unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn map_file(path: &Path) -> Result<Vec<Tensor>> {
    let map = Arc::new(mmap(path)?);
    let (header, meta) = SafeTensors::read_metadata(&map).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let data_start = 8 + header;
    let mut out = Vec::new();
    for (name, info) in meta.tensors() {
        let dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => {
                return Err(Error::TensorDtype {
                    path: path.to_path_buf(),
                    tensor: name,
                    found: format!("{other:?}"),
                });
            }
        };
        let (a, b) = info.data_offsets;
        out.push(Tensor {
            name,
            dtype,
            shape: info.shape.clone(),
            map: map.clone() as Bytes,
            start: data_start + a,
            len: b - a,
            repacked: Arc::default(),
            file_backed: true,
        });
    }
    Ok(out)
}

/// Weight rows (`n × k`, row-major) in their stored element type. f16 and
/// bf16 are raw bits.
#[derive(Clone, Copy)]
pub enum WRows<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    BF16(&'a [u16]),
}

impl<'a> WRows<'a> {
    /// The rows from element `at` on.
    pub fn offset(self, at: usize) -> WRows<'a> {
        match self {
            WRows::F32(s) => WRows::F32(&s[at..]),
            WRows::F16(s) => WRows::F16(&s[at..]),
            WRows::BF16(s) => WRows::BF16(&s[at..]),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            WRows::F32(s) => s.len(),
            WRows::F16(s) | WRows::BF16(s) => s.len(),
        }
    }

    /// Element `i` widened to f32 (the scalar paths).
    pub fn get(self, i: usize) -> f32 {
        match self {
            WRows::F32(s) => s[i],
            WRows::F16(s) => half::f16::from_bits(s[i]).to_f32(),
            WRows::BF16(s) => half::bf16::from_bits(s[i]).to_f32(),
        }
    }
}
