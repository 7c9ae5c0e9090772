//! GGUF headers (v2 and v3), read for sizing: the controller needs the
//! architecture's shape and the exact bytes of every tensor, which the
//! header holds; the tensor data (gigabytes) is never read.
//!
//! Pure parsing, no I/O: [`parse`] takes the file's first bytes and says
//! either what the header is or how many bytes it needs at least, so
//! [`crate::serving::model_source`] can read more (range requests or a
//! file) until the tensor infos are complete. The tokenizer's arrays
//! (tens of megabytes for 150 000-token vocabularies) are skipped by their
//! lengths, never stored.
//!
//! The layout is llama.cpp's (`gguf.h`, gguf-py's `GGUFReader`): magic
//! `GGUF`, version (u32), tensor count (u64), metadata count (u64), the
//! metadata key/values, then per tensor its name, dimensions, ggml type
//! and offset from the start of the (aligned) data section. Bytes per
//! tensor come from the ggml type's block: [`GgmlType::lookup`], the table
//! of gguf-py's `GGML_QUANT_SIZES`.
//!
//! `copyhold-node` has its own reader (`inference-node/src/model/gguf.rs`)
//! that loads whole files; the operator does not depend on the node crate,
//! and this one differs where the controller needs it to: it works on a
//! prefix of the file and keeps no array.

use std::collections::BTreeMap;

/// The file's first four bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// The data section's alignment when `general.alignment` is not given.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Why a header could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GgufError {
    #[error("not a GGUF file: it starts with {0:?}, not \"GGUF\"")]
    BadMagic(Vec<u8>),
    #[error("GGUF version {0}; the controller reads versions 2 and 3")]
    Version(u32),
    #[error("malformed GGUF header at byte {at}: {message}")]
    Malformed { at: u64, message: String },
    #[error("tensor `{tensor}` has ggml type {ggml_type}, which is not a known type")]
    UnknownType { tensor: String, ggml_type: u32 },
    #[error(
        "tensor `{tensor}`: {elements} elements in rows of {row} are not whole {ty} blocks of {block}"
    )]
    PartialBlock {
        tensor: String,
        ty: &'static str,
        row: u64,
        elements: u64,
        block: u64,
    },
    #[error("metadata `{0}` is missing or not a positive integer")]
    MissingKey(String),
    #[error("metadata `general.architecture` is missing or not a string")]
    NoArchitecture,
    #[error("the model's numbers overflow 64 bits: {0}")]
    Overflow(&'static str),
}

/// A ggml tensor type: how many elements one block holds and its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType {
    pub id: u32,
    pub name: &'static str,
    pub block_elems: u64,
    pub block_bytes: u64,
}

/// gguf-py's `GGML_QUANT_SIZES` (id, name, elements per block, bytes per
/// block), the same numbers as ggml's `type_traits`.
const GGML_TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// The type of ggml type number `id`, if it is one.
    pub fn lookup(id: u32) -> Option<GgmlType> {
        GGML_TYPES
            .iter()
            .find(|t| t.0 == id)
            .map(|&(id, name, block_elems, block_bytes)| GgmlType {
                id,
                name,
                block_elems,
                block_bytes,
            })
    }

    /// Whether values are stored in blocks with scales (not one float or
    /// integer per element).
    pub fn is_block_format(self) -> bool {
        self.block_elems > 1
    }
}

/// A metadata value. Arrays keep only their element type and length: the
/// controller reads none, and the tokenizer's are large.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array { item_type: u32, len: u64 },
}

impl MetaValue {
    /// A non-negative integer value.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::Uint(u) => Some(u),
            MetaValue::Int(i) => u64::try_from(i).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// One tensor's entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// GGUF order: `dims[0]` is the contiguous (row) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Elements of the tensor.
    pub fn elements(&self) -> Result<u64, GgufError> {
        self.dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or(GgufError::Overflow("tensor elements"))
    }

    /// Bytes of the tensor's data: whole blocks along each row.
    pub fn bytes(&self) -> Result<u64, GgufError> {
        let t = self.ggml_type;
        let row = self.dims.first().copied().unwrap_or(1);
        let elements = self.elements()?;
        if !row.is_multiple_of(t.block_elems) {
            return Err(GgufError::PartialBlock {
                tensor: self.name.clone(),
                ty: t.name,
                row,
                elements,
                block: t.block_elems,
            });
        }
        (elements / t.block_elems)
            .checked_mul(t.block_bytes)
            .ok_or(GgufError::Overflow("tensor bytes"))
    }
}

/// A parsed header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor infos end: the bytes the header takes.
    pub header_bytes: u64,
    /// Where the data section starts (the header, aligned).
    pub data_start: u64,
}

/// What [`parse`] made of the bytes it was given.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    Header(GgufHeader),
    /// The bytes end inside the header: read at least this many from the
    /// start of the file and parse again.
    NeedBytes(u64),
}

/// A failed read: more bytes needed, or a real error.
enum Stop {
    Need(u64),
    Err(GgufError),
}

impl From<GgufError> for Stop {
    fn from(e: GgufError) -> Self {
        Stop::Err(e)
    }
}

/// A cursor over the bytes read so far.
struct Cursor<'a> {
    b: &'a [u8],
    at: u64,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64) -> Result<&'a [u8], Stop> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(Stop::Err(GgufError::Overflow("header offset")))?;
        if end > self.b.len() as u64 {
            return Err(Stop::Need(end));
        }
        // Both within `b.len()`, a usize.
        let s = &self.b[self.at as usize..end as usize];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Stop> {
        let s = self.take(N as u64)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self) -> Result<u32, Stop> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, Stop> {
        self.array().map(u64::from_le_bytes)
    }

    fn malformed(&self, message: impl Into<String>) -> Stop {
        Stop::Err(GgufError::Malformed {
            at: self.at,
            message: message.into(),
        })
    }

    /// A count of items each at least `min_bytes` long: when they cannot
    /// all be in the bytes read, ask for that many at once.
    fn count(&mut self, min_bytes: u64) -> Result<u64, Stop> {
        let n = self.u64()?;
        let need = n
            .checked_mul(min_bytes)
            .and_then(|b| b.checked_add(self.at))
            .ok_or_else(|| self.malformed(format!("a count of {n} items overflows")))?;
        if need > self.b.len() as u64 {
            return Err(Stop::Need(need));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String, Stop> {
        let n = self.u64()?;
        let at = self.at;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec()).map_err(|_| {
            Stop::Err(GgufError::Malformed {
                at,
                message: "a string is not UTF-8".into(),
            })
        })
    }

    /// Skips a string, keeping nothing.
    fn skip_string(&mut self) -> Result<(), Stop> {
        let n = self.u64()?;
        self.take(n).map(|_| ())
    }
}

/// Bytes of a fixed-size metadata type; `None` for strings and arrays.
fn fixed_size(ty: u32) -> Option<u64> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        10..=12 => 8,
        _ => return None,
    })
}

const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;

fn value(c: &mut Cursor<'_>, ty: u32) -> Result<MetaValue, Stop> {
    Ok(match ty {
        0 => MetaValue::Uint(u64::from(c.array::<1>()?[0])),
        1 => MetaValue::Int(i64::from(c.array::<1>()?[0] as i8)),
        2 => MetaValue::Uint(u64::from(u16::from_le_bytes(c.array()?))),
        3 => MetaValue::Int(i64::from(i16::from_le_bytes(c.array()?))),
        4 => MetaValue::Uint(u64::from(c.u32()?)),
        5 => MetaValue::Int(i64::from(i32::from_le_bytes(c.array()?))),
        6 => MetaValue::Float(f64::from(f32::from_le_bytes(c.array()?))),
        7 => MetaValue::Bool(c.array::<1>()?[0] != 0),
        TYPE_STRING => MetaValue::Str(c.string()?),
        TYPE_ARRAY => skip_array(c)?,
        10 => MetaValue::Uint(c.u64()?),
        11 => MetaValue::Int(i64::from_le_bytes(c.array()?)),
        12 => MetaValue::Float(f64::from_le_bytes(c.array()?)),
        t => return Err(c.malformed(format!("unknown metadata type {t}"))),
    })
}

/// An array's type and length, its elements skipped by their sizes.
fn skip_array(c: &mut Cursor<'_>) -> Result<MetaValue, Stop> {
    let item_type = c.u32()?;
    match (item_type, fixed_size(item_type)) {
        (_, Some(size)) => {
            let len = c.count(size)?;
            c.take(len * size)?;
            Ok(MetaValue::Array { item_type, len })
        }
        (TYPE_STRING, None) => {
            let len = c.count(8)?;
            for _ in 0..len {
                c.skip_string()?;
            }
            Ok(MetaValue::Array { item_type, len })
        }
        (TYPE_ARRAY, None) => {
            // Arrays of arrays: each at least a type and a length.
            let len = c.count(12)?;
            for _ in 0..len {
                skip_array(c)?;
            }
            Ok(MetaValue::Array { item_type, len })
        }
        (t, None) => Err(c.malformed(format!("unknown array element type {t}"))),
    }
}

fn tensor_info(c: &mut Cursor<'_>) -> Result<TensorInfo, Stop> {
    let name = c.string()?;
    let n_dims = c.u32()?;
    if n_dims > MAX_DIMS {
        return Err(c.malformed(format!("tensor `{name}` has {n_dims} dimensions")));
    }
    let dims = (0..n_dims)
        .map(|_| c.u64())
        .collect::<Result<Vec<_>, _>>()?;
    let id = c.u32()?;
    let offset = c.u64()?;
    let ggml_type = GgmlType::lookup(id).ok_or_else(|| {
        Stop::Err(GgufError::UnknownType {
            tensor: name.clone(),
            ggml_type: id,
        })
    })?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

fn header(c: &mut Cursor<'_>) -> Result<GgufHeader, Stop> {
    let magic = c.take(4)?;
    if magic != MAGIC {
        return Err(Stop::Err(GgufError::BadMagic(magic.to_vec())));
    }
    let version = c.u32()?;
    if !(2..=3).contains(&version) {
        return Err(Stop::Err(GgufError::Version(version)));
    }
    // A tensor info takes at least 24 bytes, a key/value 13.
    let n_tensors = c.u64()?;
    let n_kv = c.count(13)?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string()?;
        let ty = c.u32()?;
        metadata.insert(key, value(c, ty)?);
    }
    let need = n_tensors
        .checked_mul(24)
        .and_then(|b| b.checked_add(c.at))
        .ok_or_else(|| c.malformed(format!("{n_tensors} tensors overflow")))?;
    if need > c.b.len() as u64 {
        return Err(Stop::Need(need));
    }
    let mut tensors = Vec::with_capacity(usize::try_from(n_tensors).unwrap_or(0));
    for _ in 0..n_tensors {
        tensors.push(tensor_info(c)?);
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| c.malformed("general.alignment is not a power of two"))?,
    };
    let header_bytes = c.at;
    Ok(GgufHeader {
        version,
        metadata,
        tensors,
        header_bytes,
        data_start: header_bytes.div_ceil(alignment) * alignment,
    })
}

/// Parses a header from the file's first bytes: the header, or how many
/// bytes from the start it needs at least.
pub fn parse(bytes: &[u8]) -> Result<Parsed, GgufError> {
    let mut c = Cursor { b: bytes, at: 0 };
    match header(&mut c) {
        Ok(h) => Ok(Parsed::Header(h)),
        Err(Stop::Need(n)) => Ok(Parsed::NeedBytes(n)),
        Err(Stop::Err(e)) => Err(e),
    }
}

/// Bytes and elements of one ggml type's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeTotal {
    pub ty: GgmlType,
    pub tensors: u64,
    pub elements: u64,
    pub bytes: u64,
}

/// What sizing needs of a GGUF model.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufModel {
    /// `general.architecture` (`llama`, `qwen2`, …).
    pub architecture: String,
    /// `{arch}.block_count`.
    pub layers: u32,
    /// `{arch}.embedding_length`.
    pub hidden: u64,
    /// `{arch}.attention.head_count`.
    pub heads: u64,
    /// `{arch}.attention.head_count_kv` (default: `heads`).
    pub kv_heads: u64,
    /// `{arch}.attention.key_length` (default: `hidden / heads`).
    pub key_length: u64,
    /// `{arch}.attention.value_length` (default: `key_length`).
    pub value_length: u64,
    /// `{arch}.context_length`, when given.
    pub context_length: Option<u64>,
    /// Tensors, elements and bytes by ggml type name.
    pub by_type: BTreeMap<&'static str, TypeTotal>,
    /// The token embedding's type and elements, when the file has one.
    pub embedding: Option<(GgmlType, u64)>,
    /// No `output.weight`: the LM head is the token embedding.
    pub tied_head: bool,
}

impl GgufModel {
    /// The model of a header: the architecture's keys and the tensors'
    /// bytes by type.
    pub fn from_header(h: &GgufHeader) -> Result<Self, GgufError> {
        let architecture = h
            .metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
            .ok_or(GgufError::NoArchitecture)?
            .to_string();
        let key = |k: &str| format!("{architecture}.{k}");
        let int = |k: &str| {
            h.metadata
                .get(&key(k))
                .and_then(MetaValue::as_u64)
                .filter(|&v| v > 0)
        };
        let need = |k: &str| int(k).ok_or_else(|| GgufError::MissingKey(key(k)));
        let layers = u32::try_from(need("block_count")?)
            .map_err(|_| GgufError::MissingKey(key("block_count")))?;
        let hidden = need("embedding_length")?;
        let heads = need("attention.head_count")?;
        let key_length = int("attention.key_length").unwrap_or(hidden / heads);
        if key_length == 0 {
            return Err(GgufError::MissingKey(key("attention.key_length")));
        }
        let mut by_type: BTreeMap<&'static str, TypeTotal> = BTreeMap::new();
        let mut embedding = None;
        for t in &h.tensors {
            let (elements, bytes) = (t.elements()?, t.bytes()?);
            let e = by_type.entry(t.ggml_type.name).or_insert(TypeTotal {
                ty: t.ggml_type,
                tensors: 0,
                elements: 0,
                bytes: 0,
            });
            e.tensors += 1;
            e.elements = e
                .elements
                .checked_add(elements)
                .ok_or(GgufError::Overflow("elements"))?;
            e.bytes = e
                .bytes
                .checked_add(bytes)
                .ok_or(GgufError::Overflow("weight bytes"))?;
            if t.name == "token_embd.weight" {
                embedding = Some((t.ggml_type, elements));
            }
        }
        Ok(GgufModel {
            layers,
            hidden,
            heads,
            kv_heads: int("attention.head_count_kv").unwrap_or(heads),
            key_length,
            value_length: int("attention.value_length").unwrap_or(key_length),
            context_length: int("context_length"),
            by_type,
            embedding,
            tied_head: !h.tensors.iter().any(|t| t.name == "output.weight"),
            architecture,
        })
    }

    /// Bytes of all tensors as stored in the file.
    pub fn stored_bytes(&self) -> u64 {
        self.by_type
            .values()
            .fold(0u64, |a, t| a.saturating_add(t.bytes))
    }

    /// The block formats the file uses, by bytes, largest first
    /// (`["Q4_K", "Q6_K"]` for a Q4_K_M file).
    pub fn block_formats(&self) -> Vec<&'static str> {
        let mut v: Vec<(&'static str, u64)> = self
            .by_type
            .iter()
            .filter(|(_, t)| t.ty.is_block_format())
            .map(|(n, t)| (*n, t.bytes))
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v.into_iter().map(|(n, _)| n).collect()
    }
}

/// GGUF headers of real shapes, written for tests: no tensor data.
#[cfg(test)]
pub(crate) mod synth {
    use super::{TYPE_ARRAY, TYPE_STRING};

    /// A metadata value to write.
    pub enum Val<'a> {
        U32(u32),
        F32(f32),
        Str(&'a str),
        /// An array of `n` strings `t0`, `t1`, …: a tokenizer's size.
        Tokens(u32),
    }

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A v3 header with `meta` and `tensors` (name, GGUF dims, ggml type),
    /// offsets packed in order with 32-byte alignment.
    pub fn header(meta: &[(&str, Val<'_>)], tensors: &[(String, Vec<u64>, u32)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            string(&mut b, k);
            match v {
                Val::U32(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                Val::F32(x) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                Val::Str(s) => {
                    b.extend(TYPE_STRING.to_le_bytes());
                    string(&mut b, s);
                }
                Val::Tokens(n) => {
                    b.extend(TYPE_ARRAY.to_le_bytes());
                    b.extend(TYPE_STRING.to_le_bytes());
                    b.extend(u64::from(*n).to_le_bytes());
                    for i in 0..*n {
                        string(&mut b, &format!("t{i}"));
                    }
                }
            }
        }
        let mut offset = 0u64;
        for (name, dims, ty) in tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            let t = super::GgmlType::lookup(*ty).expect("a known type");
            let bytes = dims.iter().product::<u64>() / t.block_elems * t.block_bytes;
            offset += bytes.div_ceil(32) * 32;
        }
        b
    }

    /// Q4_K (12), Q6_K (14), F16 (1), F32 (0).
    pub const Q4_K: u32 = 12;
    pub const Q6_K: u32 = 14;
    pub const F16: u32 = 1;
    pub const F32: u32 = 0;

    /// Llama 3.1 8B's header (32 layers, hidden 4096, FFN 14336, 32/8
    /// heads, 128 256 tokens), its 2-D weights of type `weights`, or
    /// llama.cpp's Q4_K_M mix when `q4_k_m`: Q4_K except the head and,
    /// in the layers `use_more_bits` picks (the first and last eighth and
    /// every third between), `attn_v` and `ffn_down` as Q6_K.
    pub fn llama_8b(q4_k_m: bool, weights: u32) -> Vec<u8> {
        let (n, h, f, v, kv) = (32u64, 4096u64, 14336u64, 128_256u64, 1024u64);
        let more = |i: u64| i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
        let (base, head) = if q4_k_m {
            (Q4_K, Q6_K)
        } else {
            (weights, weights)
        };
        let mixed = |i: u64| match (q4_k_m, more(i)) {
            (true, true) => Q6_K,
            (true, false) => Q4_K,
            (false, _) => weights,
        };
        let mut t = vec![
            ("token_embd.weight".to_string(), vec![h, v], base),
            ("output_norm.weight".to_string(), vec![h], F32),
            ("output.weight".to_string(), vec![h, v], head),
        ];
        for i in 0..n {
            let name = |s: &str| format!("blk.{i}.{s}.weight");
            t.extend([
                (name("attn_norm"), vec![h], F32),
                (name("ffn_norm"), vec![h], F32),
                (name("attn_q"), vec![h, h], base),
                (name("attn_k"), vec![h, kv], base),
                (name("attn_v"), vec![h, kv], mixed(i)),
                (name("attn_output"), vec![h, h], base),
                (name("ffn_gate"), vec![h, f], base),
                (name("ffn_up"), vec![h, f], base),
                (name("ffn_down"), vec![f, h], mixed(i)),
            ]);
        }
        header(
            &[
                ("general.architecture", Val::Str("llama")),
                ("general.alignment", Val::U32(32)),
                ("llama.block_count", Val::U32(32)),
                ("llama.context_length", Val::U32(131_072)),
                ("llama.embedding_length", Val::U32(4096)),
                ("llama.feed_forward_length", Val::U32(14336)),
                ("llama.attention.head_count", Val::U32(32)),
                ("llama.attention.head_count_kv", Val::U32(8)),
                ("llama.rope.freq_base", Val::F32(500_000.0)),
                ("tokenizer.ggml.model", Val::Str("gpt2")),
                ("tokenizer.ggml.tokens", Val::Tokens(128_256)),
            ],
            &t,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn root(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel)
    }

    fn parsed(bytes: &[u8]) -> GgufHeader {
        match parse(bytes).unwrap() {
            Parsed::Header(h) => h,
            Parsed::NeedBytes(n) => panic!("needs {n} bytes"),
        }
    }

    #[test]
    fn every_block_format_of_the_node_s_fixture_has_the_bytes_gguf_py_gives() {
        let b = std::fs::read(root("inference-node/tests/fixtures/gguf/blocks.gguf")).unwrap();
        let h = parsed(&b);
        assert_eq!(h.version, 3);
        // name, type, bytes, data offset as gguf-py's GGUFReader reads them.
        let want = [
            ("f32", "F32", 4096, 448),
            ("f16", "F16", 2048, 4544),
            ("bf16", "BF16", 2048, 6592),
            ("q8_0", "Q8_0", 1088, 8640),
            ("q4_0", "Q4_0", 576, 9728),
            ("q4_k", "Q4_K", 576, 10304),
            ("q5_k", "Q5_K", 704, 10880),
            ("q6_k", "Q6_K", 840, 11584),
        ];
        let got: Vec<_> = h
            .tensors
            .iter()
            .map(|t| {
                (
                    t.name.as_str(),
                    t.ggml_type.name,
                    t.bytes().unwrap(),
                    h.data_start + t.offset,
                )
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_converted_tiny_llama_gives_its_shape_and_bytes() {
        let b = std::fs::read(root("tests/fixtures/tiny-llama-gguf/model-q8_0.gguf")).unwrap();
        let h = parsed(&b);
        assert_eq!(h.data_start, 16_448, "gguf-py's first data offset");
        assert!(matches!(
            h.metadata.get("tokenizer.ggml.tokens"),
            Some(MetaValue::Array {
                item_type: TYPE_STRING,
                len: 590
            })
        ));
        let m = GgufModel::from_header(&h).unwrap();
        assert_eq!(
            (
                m.architecture.as_str(),
                m.layers,
                m.hidden,
                m.heads,
                m.kv_heads
            ),
            ("llama", 3, 64, 4, 2)
        );
        assert_eq!((m.key_length, m.value_length), (16, 16));
        assert_eq!(m.context_length, Some(256));
        assert_eq!(m.stored_bytes(), 260_592, "gguf-py: sum of n_bytes");
        assert_eq!(m.block_formats(), vec!["Q8_0"]);
        assert!(!m.tied_head);
    }

    #[test]
    fn every_prefix_asks_for_more_and_the_bytes_asked_for_suffice() {
        let b = std::fs::read(root("tests/fixtures/tiny-llama-gguf/model-q8_0.gguf")).unwrap();
        let whole = parsed(&b);
        let mut have = 0u64;
        let mut rounds = 0;
        loop {
            match parse(&b[..have as usize]).unwrap() {
                Parsed::Header(h) => {
                    assert_eq!(h, whole);
                    break;
                }
                Parsed::NeedBytes(n) => {
                    assert!(n > have, "{n} after {have}");
                    have = n;
                    rounds += 1;
                }
            }
        }
        assert!(have <= whole.header_bytes);
        assert!(rounds > 3, "{rounds}");
        // No prefix is an error.
        for cut in (0..whole.header_bytes as usize).step_by(7) {
            assert!(
                matches!(parse(&b[..cut]), Ok(Parsed::NeedBytes(_))),
                "{cut}"
            );
        }
    }

    #[test]
    fn bad_magic_version_type_and_dimensions_are_errors_naming_them() {
        assert_eq!(
            parse(b"GGML\x03\0\0\0"),
            Err(GgufError::BadMagic(b"GGML".to_vec()))
        );
        assert_eq!(parse(b"GGUF\x01\0\0\0"), Err(GgufError::Version(1)));
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend(1u64.to_le_bytes()); // one tensor
        b.extend(0u64.to_le_bytes()); // no metadata
        b.extend(1u64.to_le_bytes());
        b.push(b'w');
        b.extend(1u32.to_le_bytes());
        b.extend(64u64.to_le_bytes());
        let mut unknown = b.clone();
        unknown.extend(99u32.to_le_bytes());
        unknown.extend(0u64.to_le_bytes());
        let e = parse(&unknown).unwrap_err();
        assert!(e.to_string().contains("tensor `w` has ggml type 99"), "{e}");
        let mut five = b[..b.len() - 12].to_vec();
        five.extend(5u32.to_le_bytes());
        five.extend([0u8; 48]);
        let e = parse(&five).unwrap_err();
        assert!(e.to_string().contains("5 dimensions"), "{e}");
    }

    #[test]
    fn a_huge_count_asks_for_all_its_bytes_at_once() {
        let mut b = b"GGUF\x03\0\0\0".to_vec();
        b.extend(0u64.to_le_bytes());
        b.extend(1u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(b"tok");
        b.extend(TYPE_ARRAY.to_le_bytes());
        b.extend(TYPE_STRING.to_le_bytes());
        b.extend(10_000_000u64.to_le_bytes());
        let at = b.len() as u64;
        assert_eq!(parse(&b), Ok(Parsed::NeedBytes(at + 80_000_000)));
        let mut over = b[..b.len() - 8].to_vec();
        over.extend(u64::MAX.to_le_bytes());
        assert!(matches!(parse(&over), Err(GgufError::Malformed { .. })));
    }

    #[test]
    fn an_8b_llama_q4_k_m_header_gives_llama_cpp_s_mix_and_its_bytes() {
        let b = synth::llama_8b(true, 0);
        assert!(b.len() > 1_000_000, "the tokens make it {} bytes", b.len());
        let m = GgufModel::from_header(&parsed(&b)).unwrap();
        assert_eq!((m.layers, m.hidden, m.heads, m.kv_heads), (32, 4096, 32, 8));
        assert_eq!((m.key_length, m.context_length), (128, Some(131_072)));
        assert_eq!(m.block_formats(), vec!["Q4_K", "Q6_K"]);
        let q6 = m.by_type["Q6_K"];
        // The head plus attn_v and ffn_down in 16 of the 32 layers.
        assert_eq!(q6.tensors, 1 + 2 * 16);
        assert_eq!(q6.bytes, 1_256_693_760);
        assert_eq!(m.by_type["Q4_K"].bytes, 3_655_139_328);
        assert_eq!(m.by_type["F32"].bytes, 65 * 4096 * 4);
        // A published Llama 3 8B Q4_K_M file is 4 920 734 016 bytes: these
        // tensors plus its 7.8 MB header.
        assert_eq!(m.stored_bytes(), 4_912_898_048);
        let elements: u64 = m.by_type.values().map(|t| t.elements).sum();
        assert_eq!(elements, 8_030_261_248, "Llama 3.1 8B's parameters");
    }

    #[test]
    fn a_row_that_is_not_whole_blocks_is_refused() {
        let t = TensorInfo {
            name: "blk.0.attn_q.weight".into(),
            dims: vec![100, 4],
            ggml_type: GgmlType::lookup(12).unwrap(),
            offset: 0,
        };
        let e = t.bytes().unwrap_err();
        assert!(
            e.to_string().contains("not whole Q4_K blocks of 256"),
            "{e}"
        );
    }
}
