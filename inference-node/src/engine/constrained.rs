//! Constrained decoding: `response_format` (`json_object`, `json_schema`)
//! and forced tool calls. A JSON schema is compiled into a small grammar;
//! a pushdown matcher follows the bytes generated so far, and before every
//! sample the logits of tokens whose bytes would leave the set of valid
//! prefixes are masked out. So every output is a prefix of a document that
//! parses and validates, and since the matcher also knows the fewest bytes
//! that still complete the document, a token is only allowed while what
//! remains of `max_tokens` can still close it (one token per byte at worst:
//! byte-level vocabularies hold every single byte). The result is complete
//! and valid even from a model with random weights.
//!
//! Supported schema keywords: `type` (one or a list), `properties`,
//! `required`, `additionalProperties` (`false` or absent: no other keys;
//! `true` or a schema: any other keys), `items`, `minItems`, `maxItems`,
//! `minLength`, `maxLength`, `enum`, `const`, `anyOf`, `oneOf` (as
//! `anyOf`), `$ref` to `#/$defs/…` or `#/definitions/…`, and the
//! annotations (`title`, `description`, `default`, `examples`, `$schema`,
//! `format`… which constrain nothing). Others (`pattern`, `minimum`, …)
//! are refused with an error naming them rather than silently ignored.

use crate::model::tokenizer::TokenBytes;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

/// A schema the matcher cannot enforce.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SchemaError(pub String);

type NodeId = usize;
const INF: usize = usize::MAX / 4;
/// Whitespace bytes allowed in a row between tokens of the document.
const MAX_WS: u8 = 24;
/// Digits allowed in the integer part of a number.
const MAX_INT_DIGITS: u8 = 15;
/// Parallel parses kept alive (alternatives of `anyOf`).
const MAX_STACKS: usize = 64;

#[derive(Debug, Clone)]
struct Prop {
    /// The key as it appears between the quotes (JSON-escaped).
    key: Vec<u8>,
    node: NodeId,
    required: bool,
}

#[derive(Debug, Clone)]
enum Node {
    Object {
        props: Vec<Prop>,
        additional: Option<NodeId>,
    },
    Array {
        items: NodeId,
        min: usize,
        max: Option<usize>,
    },
    Str {
        min: usize,
        max: Option<usize>,
    },
    Num {
        integer: bool,
    },
    /// Fixed JSON texts: `true`, `null`, an `enum`'s serialized values.
    Lit(Vec<Vec<u8>>),
    AnyOf(Vec<NodeId>),
}

/// A compiled schema.
#[derive(Debug)]
pub struct Grammar {
    nodes: Vec<Node>,
    root: NodeId,
    /// Fewest bytes of a valid value of each node.
    min_len: Vec<usize>,
}

const KNOWN_ANNOTATIONS: &[&str] = &[
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "format",
    "strict",
    "nullable",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
];

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    refs: HashMap<String, NodeId>,
    depth: usize,
}

impl<'a> Compiler<'a> {
    fn push(&mut self, n: Node) -> NodeId {
        self.nodes.push(n);
        self.nodes.len() - 1
    }

    fn any(&mut self) -> NodeId {
        // One shared "any JSON value" node; recursive through itself.
        if let Some(&id) = self.refs.get("#any") {
            return id;
        }
        let id = self.push(Node::AnyOf(Vec::new()));
        self.refs.insert("#any".into(), id);
        let obj = self.push(Node::Object {
            props: Vec::new(),
            additional: Some(id),
        });
        let arr = self.push(Node::Array {
            items: id,
            min: 0,
            max: None,
        });
        let s = self.push(Node::Str { min: 0, max: None });
        let n = self.push(Node::Num { integer: false });
        let l = self.push(Node::Lit(vec![
            b"true".to_vec(),
            b"false".to_vec(),
            b"null".to_vec(),
        ]));
        self.nodes[id] = Node::AnyOf(vec![obj, arr, s, n, l]);
        id
    }

    fn compile(&mut self, s: &Value, at: &str) -> Result<NodeId, SchemaError> {
        self.depth += 1;
        if self.depth > 64 {
            return Err(SchemaError(format!("{at}: the schema nests too deeply")));
        }
        let r = self.compile_inner(s, at);
        self.depth -= 1;
        r
    }

    fn compile_inner(&mut self, s: &Value, at: &str) -> Result<NodeId, SchemaError> {
        let obj = match s {
            Value::Bool(true) => return Ok(self.any()),
            Value::Object(o) => o,
            _ => {
                return Err(SchemaError(format!(
                    "{at}: a schema must be an object (or true)"
                )));
            }
        };
        for k in obj.keys() {
            let known = KNOWN_ANNOTATIONS.contains(&k.as_str())
                || matches!(
                    k.as_str(),
                    "type"
                        | "properties"
                        | "required"
                        | "additionalProperties"
                        | "items"
                        | "minItems"
                        | "maxItems"
                        | "minLength"
                        | "maxLength"
                        | "enum"
                        | "const"
                        | "anyOf"
                        | "oneOf"
                        | "$ref"
                );
            if !known {
                return Err(SchemaError(format!(
                    "{at}: the keyword `{k}` is not supported by constrained decoding"
                )));
            }
        }
        if let Some(r) = obj.get("$ref") {
            let r = r
                .as_str()
                .ok_or_else(|| SchemaError(format!("{at}.$ref: must be a string")))?;
            return self.reference(r, at);
        }
        if let Some(v) = obj.get("const") {
            return Ok(self.push(Node::Lit(vec![json_bytes(v)])));
        }
        if let Some(e) = obj.get("enum") {
            let e = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| SchemaError(format!("{at}.enum: must be a non-empty list")))?;
            return Ok(self.push(Node::Lit(e.iter().map(json_bytes).collect())));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(a) = obj.get(key) {
                let a = a
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| SchemaError(format!("{at}.{key}: must be a non-empty list")))?;
                let mut ids = Vec::new();
                for (i, sub) in a.iter().enumerate() {
                    ids.push(self.compile(sub, &format!("{at}.{key}[{i}]"))?);
                }
                return Ok(self.push(Node::AnyOf(ids)));
            }
        }
        match obj.get("type") {
            None => {
                if obj.contains_key("properties") {
                    self.typed(obj, "object", at)
                } else if obj.contains_key("items") {
                    self.typed(obj, "array", at)
                } else {
                    Ok(self.any())
                }
            }
            Some(Value::String(t)) => self.typed(obj, t, at),
            Some(Value::Array(ts)) if !ts.is_empty() => {
                let mut ids = Vec::new();
                for t in ts {
                    let t = t
                        .as_str()
                        .ok_or_else(|| SchemaError(format!("{at}.type: a list of type names")))?;
                    ids.push(self.typed(obj, t, at)?);
                }
                Ok(self.push(Node::AnyOf(ids)))
            }
            Some(_) => Err(SchemaError(format!(
                "{at}.type: must be a type name or a list of them"
            ))),
        }
    }

    fn reference(&mut self, r: &str, at: &str) -> Result<NodeId, SchemaError> {
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = r
            .strip_prefix('#')
            .and_then(|p| self.root.pointer(p))
            .ok_or_else(|| {
                SchemaError(format!(
                    "{at}.$ref: `{r}` is not a local reference into this schema"
                ))
            })?;
        // Reserve the id first so recursive references resolve to it.
        let id = self.push(Node::AnyOf(Vec::new()));
        self.refs.insert(r.to_string(), id);
        let inner = self.compile(target, r)?;
        self.nodes[id] = Node::AnyOf(vec![inner]);
        Ok(id)
    }

    fn typed(
        &mut self,
        obj: &serde_json::Map<String, Value>,
        t: &str,
        at: &str,
    ) -> Result<NodeId, SchemaError> {
        let usize_of = |k: &str| -> Result<Option<usize>, SchemaError> {
            match obj.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .map(|x| Some(x as usize))
                    .ok_or_else(|| SchemaError(format!("{at}.{k}: must be a whole number"))),
            }
        };
        let node = match t {
            "object" => {
                let mut props = Vec::new();
                let required: Vec<&str> = match obj.get("required") {
                    None => Vec::new(),
                    Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                    Some(_) => {
                        return Err(SchemaError(format!(
                            "{at}.required: must be a list of names"
                        )));
                    }
                };
                if let Some(p) = obj.get("properties") {
                    let p = p.as_object().ok_or_else(|| {
                        SchemaError(format!("{at}.properties: must be an object"))
                    })?;
                    for (k, sub) in p {
                        let node = self.compile(sub, &format!("{at}.properties.{k}"))?;
                        let quoted = json_bytes(&Value::String(k.clone()));
                        props.push(Prop {
                            key: quoted[1..quoted.len() - 1].to_vec(),
                            node,
                            required: required.contains(&k.as_str()),
                        });
                    }
                }
                if let Some(missing) = required
                    .iter()
                    .find(|r| !props.iter().any(|p| p.key == r.as_bytes()))
                {
                    return Err(SchemaError(format!(
                        "{at}.required: `{missing}` is not among the properties"
                    )));
                }
                if props.len() > 64 {
                    return Err(SchemaError(format!(
                        "{at}.properties: at most 64 properties per object"
                    )));
                }
                let additional = match obj.get("additionalProperties") {
                    None | Some(Value::Bool(false)) => None,
                    Some(Value::Bool(true)) => Some(self.any()),
                    Some(s) => Some(self.compile(s, &format!("{at}.additionalProperties"))?),
                };
                Node::Object { props, additional }
            }
            "array" => {
                let items = match obj.get("items") {
                    None => self.any(),
                    Some(s) => self.compile(s, &format!("{at}.items"))?,
                };
                let min = usize_of("minItems")?.unwrap_or(0);
                let max = usize_of("maxItems")?;
                Node::Array { items, min, max }
            }
            "string" => Node::Str {
                min: usize_of("minLength")?.unwrap_or(0),
                max: usize_of("maxLength")?,
            },
            "number" => Node::Num { integer: false },
            "integer" => Node::Num { integer: true },
            "boolean" => Node::Lit(vec![b"true".to_vec(), b"false".to_vec()]),
            "null" => Node::Lit(vec![b"null".to_vec()]),
            other => {
                return Err(SchemaError(format!("{at}.type: unknown type `{other}`")));
            }
        };
        Ok(self.push(node))
    }
}

fn json_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

impl Grammar {
    /// Compiles a JSON schema.
    pub fn from_schema(schema: &Value) -> Result<Grammar, SchemaError> {
        let mut c = Compiler {
            root: schema,
            nodes: Vec::new(),
            refs: HashMap::new(),
            depth: 0,
        };
        let root = c.compile(schema, "schema")?;
        Grammar::finish(c.nodes, root)
    }

    /// Any JSON object (`response_format: json_object`).
    pub fn any_object() -> Grammar {
        let mut c = Compiler {
            root: &Value::Null,
            nodes: Vec::new(),
            refs: HashMap::new(),
            depth: 0,
        };
        let any = c.any();
        let root = c.push(Node::Object {
            props: Vec::new(),
            additional: Some(any),
        });
        // Cannot fail: an empty object is a valid value.
        Grammar::finish(c.nodes, root).unwrap_or_else(|_| unreachable!())
    }

    /// A list of one or more `{"name": …, "arguments": …}` calls, each to
    /// one of `tools` (name, parameters schema): `tool_choice: required`.
    pub fn tool_calls(tools: &[(String, Value)]) -> Result<Grammar, SchemaError> {
        let mut c = Compiler {
            root: &Value::Null,
            nodes: Vec::new(),
            refs: HashMap::new(),
            depth: 0,
        };
        let mut calls = Vec::new();
        for (i, (name, params)) in tools.iter().enumerate() {
            // References inside a tool's parameters resolve within them.
            let mut sub = Compiler {
                root: params,
                nodes: std::mem::take(&mut c.nodes),
                refs: HashMap::new(),
                depth: 0,
            };
            let args = sub.compile(params, &format!("tools[{i}].function.parameters"))?;
            c.nodes = sub.nodes;
            let name_node = c.push(Node::Lit(vec![json_bytes(&Value::String(name.clone()))]));
            calls.push(c.push(Node::Object {
                props: vec![
                    Prop {
                        key: b"name".to_vec(),
                        node: name_node,
                        required: true,
                    },
                    Prop {
                        key: b"arguments".to_vec(),
                        node: args,
                        required: true,
                    },
                ],
                additional: None,
            }));
        }
        let one = c.push(Node::AnyOf(calls));
        let root = c.push(Node::Array {
            items: one,
            min: 1,
            max: None,
        });
        Grammar::finish(c.nodes, root)
    }

    fn finish(nodes: Vec<Node>, root: NodeId) -> Result<Grammar, SchemaError> {
        let mut g = Grammar {
            min_len: vec![INF; nodes.len()],
            nodes,
            root,
        };
        // Fixed point: recursive schemas converge from above.
        for _ in 0..g.nodes.len() + 2 {
            let mut changed = false;
            for i in 0..g.nodes.len() {
                let v = g.node_min_len(i);
                if v < g.min_len[i] {
                    g.min_len[i] = v;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        if g.min_len[root] >= INF {
            return Err(SchemaError(
                "schema: no finite JSON document satisfies it".into(),
            ));
        }
        Ok(g)
    }

    fn entry_len(&self, p: &Prop) -> usize {
        (p.key.len() + 3).saturating_add(self.min_len[p.node])
    }

    fn node_min_len(&self, i: NodeId) -> usize {
        let add = |a: usize, b: usize| a.saturating_add(b).min(INF);
        match &self.nodes[i] {
            Node::Object { props, .. } => {
                let req: Vec<&Prop> = props.iter().filter(|p| p.required).collect();
                let sum = req.iter().fold(0usize, |a, p| add(a, self.entry_len(p)));
                add(2 + req.len().saturating_sub(1), sum)
            }
            Node::Array { items, min, .. } => {
                if *min == 0 {
                    2
                } else {
                    add(
                        2 + min - 1,
                        self.min_len[*items].saturating_mul(*min).min(INF),
                    )
                }
            }
            Node::Str { min, .. } => 2 + min,
            Node::Num { .. } => 1,
            Node::Lit(opts) => opts.iter().map(Vec::len).min().unwrap_or(INF),
            Node::AnyOf(ids) => ids.iter().map(|&c| self.min_len[c]).min().unwrap_or(INF),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum ObjPhase {
    Open,
    NeedKey,
    /// Inside a key that must be one of the declared properties.
    Key(Vec<u8>),
    /// Inside a free key (a `Str` frame above records it).
    FreeKey,
    Colon(NodeId),
    Value,
    Next,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ArrPhase {
    Open,
    NeedItem,
    Item,
    Next,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Esc {
    No,
    Backslash,
    Hex(u8),
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum NumSt {
    Minus,
    Zero,
    Int(u8),
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, PartialEq)]
enum Frame {
    Value(NodeId),
    Obj {
        node: NodeId,
        seen: u64,
        phase: ObjPhase,
    },
    Arr {
        node: NodeId,
        count: usize,
        phase: ArrPhase,
    },
    Str {
        min: usize,
        max: Option<usize>,
        chars: usize,
        esc: Esc,
        /// Continuation bytes still due, and the range of the next one.
        utf8: (u8, u8, u8),
        /// The bytes of a free object key.
        key: Option<Vec<u8>>,
    },
    Num {
        integer: bool,
        st: NumSt,
    },
    Lit {
        node: NodeId,
        got: Vec<u8>,
    },
}

#[derive(Debug, Clone, PartialEq)]
struct Stack {
    frames: Vec<Frame>,
    ws: u8,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\n' | b'\t' | b'\r')
}

impl Grammar {
    fn unseen(&self, node: NodeId, seen: u64) -> impl Iterator<Item = (usize, &Prop)> {
        let props: &[Prop] = match &self.nodes[node] {
            Node::Object { props, .. } => props,
            _ => &[],
        };
        props
            .iter()
            .enumerate()
            .filter(move |(i, _)| seen & (1u64 << i) == 0)
    }

    fn additional(&self, node: NodeId) -> Option<NodeId> {
        match &self.nodes[node] {
            Node::Object { additional, .. } => *additional,
            _ => None,
        }
    }

    fn all_required_seen(&self, node: NodeId, seen: u64) -> bool {
        self.unseen(node, seen).all(|(_, p)| !p.required)
    }

    /// Feeds one byte to one parse; pushes the parses that survive.
    fn step(&self, mut st: Stack, b: u8, out: &mut Vec<Stack>, depth: usize) {
        if depth > 64 || out.len() >= MAX_STACKS {
            return;
        }
        let Some(top) = st.frames.last().cloned() else {
            return; // complete: nothing may follow
        };
        if is_ws(b) && self.ws_allowed(&top) {
            if st.ws < MAX_WS {
                st.ws += 1;
                out.push(st);
            }
            return;
        }
        match top {
            Frame::Value(n) => self.start_value(st, n, b, out, depth),
            Frame::Obj { node, seen, phase } => {
                if !is_ws(b) {
                    st.ws = 0;
                }
                self.step_obj(st, node, seen, phase, b, out);
            }
            Frame::Arr { node, count, phase } => {
                st.ws = 0;
                self.step_arr(st, node, count, phase, b, out, depth);
            }
            Frame::Str { .. } => self.step_str(st, b, out),
            Frame::Num { integer, st: ns } => self.step_num(st, integer, ns, b, out, depth),
            Frame::Lit { node, got } => self.step_lit(st, node, got, b, out, depth),
        }
    }

    fn ws_allowed(&self, top: &Frame) -> bool {
        match top {
            Frame::Value(_) => true,
            Frame::Obj { phase, .. } => matches!(
                phase,
                ObjPhase::Open | ObjPhase::NeedKey | ObjPhase::Colon(_) | ObjPhase::Next
            ),
            Frame::Arr { phase, .. } => {
                matches!(phase, ArrPhase::Open | ArrPhase::NeedItem | ArrPhase::Next)
            }
            _ => false,
        }
    }

    fn replace_top(st: &mut Stack, f: Frame) {
        st.frames.pop();
        st.frames.push(f);
    }

    fn start_value(&self, mut st: Stack, n: NodeId, b: u8, out: &mut Vec<Stack>, depth: usize) {
        st.ws = 0;
        match &self.nodes[n] {
            Node::AnyOf(ids) => {
                for &c in ids {
                    let mut s2 = st.clone();
                    Self::replace_top(&mut s2, Frame::Value(c));
                    self.step(s2, b, out, depth + 1);
                }
            }
            Node::Object { .. } if b == b'{' => {
                Self::replace_top(
                    &mut st,
                    Frame::Obj {
                        node: n,
                        seen: 0,
                        phase: ObjPhase::Open,
                    },
                );
                out.push(st);
            }
            Node::Array { .. } if b == b'[' => {
                Self::replace_top(
                    &mut st,
                    Frame::Arr {
                        node: n,
                        count: 0,
                        phase: ArrPhase::Open,
                    },
                );
                out.push(st);
            }
            Node::Str { min, max } if b == b'"' => {
                Self::replace_top(
                    &mut st,
                    Frame::Str {
                        min: *min,
                        max: *max,
                        chars: 0,
                        esc: Esc::No,
                        utf8: (0, 0, 0),
                        key: None,
                    },
                );
                out.push(st);
            }
            Node::Num { integer } => {
                let ns = match b {
                    b'-' => NumSt::Minus,
                    b'0' => NumSt::Zero,
                    b'1'..=b'9' => NumSt::Int(1),
                    _ => return,
                };
                Self::replace_top(
                    &mut st,
                    Frame::Num {
                        integer: *integer,
                        st: ns,
                    },
                );
                out.push(st);
            }
            Node::Lit(_) => {
                Self::replace_top(
                    &mut st,
                    Frame::Lit {
                        node: n,
                        got: Vec::new(),
                    },
                );
                self.step(st, b, out, depth + 1);
            }
            _ => {}
        }
    }

    /// The value on top is complete: pop it and move its parent on.
    fn pop_value(&self, st: &mut Stack) {
        st.frames.pop();
        match st.frames.last_mut() {
            Some(Frame::Obj { phase, .. }) => *phase = ObjPhase::Next,
            Some(Frame::Arr { count, phase, .. }) => {
                *count += 1;
                *phase = ArrPhase::Next;
            }
            _ => {}
        }
    }

    fn step_obj(
        &self,
        mut st: Stack,
        node: NodeId,
        seen: u64,
        phase: ObjPhase,
        b: u8,
        out: &mut Vec<Stack>,
    ) {
        let set = |st: &mut Stack, seen: u64, phase: ObjPhase| {
            Self::replace_top(st, Frame::Obj { node, seen, phase });
        };
        match phase {
            ObjPhase::Open | ObjPhase::NeedKey => {
                if b == b'}' && phase == ObjPhase::Open && self.all_required_seen(node, seen) {
                    self.pop_value(&mut st);
                    out.push(st);
                } else if b == b'"' {
                    if self.additional(node).is_some() {
                        set(&mut st, seen, ObjPhase::FreeKey);
                        st.frames.push(Frame::Str {
                            min: 0,
                            max: None,
                            chars: 0,
                            esc: Esc::No,
                            utf8: (0, 0, 0),
                            key: Some(Vec::new()),
                        });
                        out.push(st);
                    } else if self.unseen(node, seen).next().is_some() {
                        set(&mut st, seen, ObjPhase::Key(Vec::new()));
                        out.push(st);
                    }
                }
            }
            ObjPhase::Key(mut got) => {
                if b == b'"' {
                    if let Some((i, p)) = self.unseen(node, seen).find(|(_, p)| p.key == got) {
                        set(&mut st, seen | (1u64 << i), ObjPhase::Colon(p.node));
                        out.push(st);
                    }
                } else {
                    got.push(b);
                    if self
                        .unseen(node, seen)
                        .any(|(_, p)| p.key.starts_with(&got))
                    {
                        set(&mut st, seen, ObjPhase::Key(got));
                        out.push(st);
                    }
                }
            }
            ObjPhase::Colon(child) => {
                if b == b':' {
                    set(&mut st, seen, ObjPhase::Value);
                    st.frames.push(Frame::Value(child));
                    out.push(st);
                }
            }
            ObjPhase::Next => {
                if b == b'}' && self.all_required_seen(node, seen) {
                    self.pop_value(&mut st);
                    out.push(st);
                } else if b == b','
                    && (self.additional(node).is_some() || self.unseen(node, seen).next().is_some())
                {
                    set(&mut st, seen, ObjPhase::NeedKey);
                    out.push(st);
                }
            }
            // A key string or a value is on top, never the object itself.
            ObjPhase::FreeKey | ObjPhase::Value => {}
        }
    }

    /// A free key has been read: find which schema its value follows.
    fn end_free_key(&self, st: &mut Stack, key: &[u8]) -> bool {
        st.frames.pop();
        let Some(Frame::Obj { node, seen, .. }) = st.frames.last().cloned() else {
            return false;
        };
        let declared = match &self.nodes[node] {
            Node::Object { props, .. } => props.iter().position(|p| p.key == key),
            _ => None,
        };
        let (seen, child) = match declared {
            Some(i) if seen & (1u64 << i) != 0 => return false, // a repeated key
            Some(i) => match &self.nodes[node] {
                Node::Object { props, .. } => (seen | (1u64 << i), props[i].node),
                _ => return false,
            },
            None => match self.additional(node) {
                Some(a) => (seen, a),
                None => return false,
            },
        };
        Self::replace_top(
            st,
            Frame::Obj {
                node,
                seen,
                phase: ObjPhase::Colon(child),
            },
        );
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn step_arr(
        &self,
        mut st: Stack,
        node: NodeId,
        count: usize,
        phase: ArrPhase,
        b: u8,
        out: &mut Vec<Stack>,
        depth: usize,
    ) {
        let Node::Array { items, min, max } = self.nodes[node] else {
            return;
        };
        let set = |st: &mut Stack, phase: ArrPhase| {
            Self::replace_top(st, Frame::Arr { node, count, phase });
        };
        match phase {
            ArrPhase::Open | ArrPhase::NeedItem => {
                if b == b']' && phase == ArrPhase::Open && min == 0 {
                    self.pop_value(&mut st);
                    out.push(st);
                } else if b != b']' && max.is_none_or(|m| count < m) {
                    set(&mut st, ArrPhase::Item);
                    st.frames.push(Frame::Value(items));
                    self.step(st, b, out, depth + 1);
                }
            }
            ArrPhase::Next => {
                if b == b']' && count >= min {
                    self.pop_value(&mut st);
                    out.push(st);
                } else if b == b',' && max.is_none_or(|m| count < m) {
                    set(&mut st, ArrPhase::NeedItem);
                    out.push(st);
                }
            }
            ArrPhase::Item => {}
        }
    }

    fn step_str(&self, mut st: Stack, b: u8, out: &mut Vec<Stack>) {
        let Some(Frame::Str {
            min,
            max,
            mut chars,
            mut esc,
            mut utf8,
            mut key,
        }) = st.frames.last().cloned()
        else {
            return;
        };
        let room = max.is_none_or(|m| chars < m);
        if utf8.0 > 0 {
            if !(utf8.1..=utf8.2).contains(&b) {
                return;
            }
            utf8 = (utf8.0 - 1, 0x80, 0xBF);
            if utf8.0 == 0 {
                chars += 1;
            }
        } else {
            match esc {
                Esc::Backslash => match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {
                        esc = Esc::No;
                        chars += 1;
                    }
                    b'u' => esc = Esc::Hex(0),
                    _ => return,
                },
                Esc::Hex(k) => {
                    if !b.is_ascii_hexdigit() {
                        return;
                    }
                    if k == 3 {
                        esc = Esc::No;
                        chars += 1;
                    } else {
                        esc = Esc::Hex(k + 1);
                    }
                }
                Esc::No => match b {
                    b'"' => {
                        if chars < min {
                            return;
                        }
                        match key {
                            Some(k) => {
                                if self.end_free_key(&mut st, &k) {
                                    out.push(st);
                                }
                            }
                            None => {
                                self.pop_value(&mut st);
                                out.push(st);
                            }
                        }
                        return;
                    }
                    _ if !room => return,
                    b'\\' => esc = Esc::Backslash,
                    0..=0x1F => return,
                    0x20..=0x7F => chars += 1,
                    0xC2..=0xDF => utf8 = (1, 0x80, 0xBF),
                    0xE0 => utf8 = (2, 0xA0, 0xBF),
                    0xED => utf8 = (2, 0x80, 0x9F),
                    0xE1..=0xEF => utf8 = (2, 0x80, 0xBF),
                    0xF0 => utf8 = (3, 0x90, 0xBF),
                    0xF4 => utf8 = (3, 0x80, 0x8F),
                    0xF1..=0xF3 => utf8 = (3, 0x80, 0xBF),
                    _ => return,
                },
            }
        }
        if let Some(k) = key.as_mut() {
            k.push(b);
        }
        Self::replace_top(
            &mut st,
            Frame::Str {
                min,
                max,
                chars,
                esc,
                utf8,
                key,
            },
        );
        out.push(st);
    }

    fn num_complete(ns: NumSt) -> bool {
        matches!(ns, NumSt::Zero | NumSt::Int(_) | NumSt::Frac | NumSt::Exp)
    }

    fn step_num(
        &self,
        mut st: Stack,
        integer: bool,
        ns: NumSt,
        b: u8,
        out: &mut Vec<Stack>,
        depth: usize,
    ) {
        let digit = b.is_ascii_digit();
        let next = match (ns, b) {
            (NumSt::Minus, b'0') => Some(NumSt::Zero),
            (NumSt::Minus, b'1'..=b'9') => Some(NumSt::Int(1)),
            (NumSt::Int(k), _) if digit => (k < MAX_INT_DIGITS).then_some(NumSt::Int(k + 1)),
            (NumSt::Zero | NumSt::Int(_), b'.') if !integer => Some(NumSt::Dot),
            (NumSt::Zero | NumSt::Int(_) | NumSt::Frac, b'e' | b'E') if !integer => Some(NumSt::E),
            (NumSt::Dot | NumSt::Frac, _) if digit => Some(NumSt::Frac),
            (NumSt::E, b'+' | b'-') => Some(NumSt::ESign),
            (NumSt::E | NumSt::ESign | NumSt::Exp, _) if digit => Some(NumSt::Exp),
            _ => None,
        };
        match next {
            Some(n) => {
                Self::replace_top(&mut st, Frame::Num { integer, st: n });
                out.push(st);
            }
            None if Self::num_complete(ns) && !digit => {
                // The byte ends the number and belongs to the parent.
                self.pop_value(&mut st);
                self.step(st, b, out, depth + 1);
            }
            None => {}
        }
    }

    fn step_lit(
        &self,
        mut st: Stack,
        node: NodeId,
        mut got: Vec<u8>,
        b: u8,
        out: &mut Vec<Stack>,
        depth: usize,
    ) {
        let Node::Lit(opts) = &self.nodes[node] else {
            return;
        };
        let complete = opts.contains(&got);
        got.push(b);
        if opts.iter().any(|o| o.starts_with(&got)) {
            let exact = opts.contains(&got);
            let longer = opts
                .iter()
                .any(|o| o.len() > got.len() && o.starts_with(&got));
            if exact && !longer {
                self.pop_value(&mut st);
            } else {
                Self::replace_top(&mut st, Frame::Lit { node, got });
            }
            out.push(st);
        } else if complete && !got.is_empty() {
            self.pop_value(&mut st);
            self.step(st, b, out, depth + 1);
        }
    }

    /// Fewest bytes that complete this parse.
    fn remaining(&self, st: &Stack) -> usize {
        st.frames
            .iter()
            .fold(0usize, |a, f| a.saturating_add(self.frame_rest(f)))
            .min(INF)
    }

    /// Bytes that close the object after its current entry: a comma and an
    /// entry for each required property not yet seen (but `except`), then
    /// the brace.
    fn obj_tail(&self, node: NodeId, seen: u64, except: Option<usize>) -> usize {
        self.unseen(node, seen)
            .filter(|(i, p)| p.required && Some(*i) != except)
            .fold(1usize, |a, (_, p)| a.saturating_add(1 + self.entry_len(p)))
    }

    fn frame_rest(&self, f: &Frame) -> usize {
        match f {
            Frame::Value(n) => self.min_len[*n],
            Frame::Obj { node, seen, phase } => {
                let (node, seen) = (*node, *seen);
                let tail = self.obj_tail(node, seen, None);
                let any_required = self.unseen(node, seen).any(|(_, p)| p.required);
                match phase {
                    ObjPhase::Open if !any_required => 1,
                    ObjPhase::Open => tail - 1,
                    ObjPhase::NeedKey if any_required => tail - 1,
                    ObjPhase::NeedKey => {
                        let declared = self
                            .unseen(node, seen)
                            .map(|(_, p)| self.entry_len(p))
                            .min()
                            .unwrap_or(INF);
                        let free = self
                            .additional(node)
                            .map_or(INF, |a| self.min_len[a].saturating_add(3));
                        declared.min(free).saturating_add(1)
                    }
                    ObjPhase::Key(got) => self
                        .unseen(node, seen)
                        .filter(|(_, p)| p.key.starts_with(got))
                        .map(|(i, p)| {
                            (p.key.len() - got.len() + 2)
                                .saturating_add(self.min_len[p.node])
                                .saturating_add(self.obj_tail(node, seen, Some(i)))
                        })
                        .min()
                        .unwrap_or(INF),
                    ObjPhase::FreeKey => {
                        let v = self.additional(node).map_or(0, |a| self.min_len[a]);
                        v.saturating_add(1).saturating_add(tail)
                    }
                    ObjPhase::Colon(child) => {
                        self.min_len[*child].saturating_add(1).saturating_add(tail)
                    }
                    ObjPhase::Value | ObjPhase::Next => tail,
                }
            }
            Frame::Arr { node, count, phase } => {
                let Node::Array { items, min, .. } = self.nodes[*node] else {
                    return INF;
                };
                let mi = self.min_len[items];
                match phase {
                    ArrPhase::Open if min == 0 => 1,
                    ArrPhase::Open => (mi.saturating_add(1)).saturating_mul(min),
                    ArrPhase::NeedItem => {
                        let k = min.saturating_sub(*count).max(1);
                        (mi.saturating_add(1)).saturating_mul(k)
                    }
                    ArrPhase::Item => {
                        let k = min.saturating_sub(count + 1);
                        (mi.saturating_add(1)).saturating_mul(k).saturating_add(1)
                    }
                    ArrPhase::Next => {
                        let k = min.saturating_sub(*count);
                        (mi.saturating_add(1)).saturating_mul(k).saturating_add(1)
                    }
                }
            }
            Frame::Str {
                min,
                chars,
                esc,
                utf8,
                ..
            } => {
                let (esc_cost, pending) = match esc {
                    Esc::No => (0, utf8.0 > 0),
                    Esc::Backslash => (1, true),
                    Esc::Hex(k) => (4 - *k as usize, true),
                };
                let need = min.saturating_sub(chars + pending as usize);
                utf8.0 as usize + esc_cost + need + 1
            }
            Frame::Num { st, .. } => match st {
                NumSt::Minus | NumSt::Dot | NumSt::E | NumSt::ESign => 1,
                _ => 0,
            },
            Frame::Lit { node, got } => match &self.nodes[*node] {
                Node::Lit(opts) => opts
                    .iter()
                    .filter(|o| o.starts_with(got))
                    .map(|o| o.len() - got.len())
                    .min()
                    .unwrap_or(INF),
                _ => INF,
            },
        }
    }
}

/// Where generation stands against a grammar: every parse still alive.
#[derive(Debug, Clone, PartialEq)]
pub struct Matcher {
    g: Arc<Grammar>,
    stacks: Vec<Stack>,
}

impl PartialEq for Grammar {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}

impl Matcher {
    pub fn new(g: Arc<Grammar>) -> Matcher {
        let root = g.root;
        Matcher {
            g,
            stacks: vec![Stack {
                frames: vec![Frame::Value(root)],
                ws: 0,
            }],
        }
    }

    /// The matcher after `bytes`, or `None` if they leave the language.
    pub fn feed(&self, bytes: &[u8]) -> Option<Matcher> {
        let mut cur = self.stacks.clone();
        for &b in bytes {
            let mut next = Vec::with_capacity(cur.len());
            for st in cur {
                self.g.step(st, b, &mut next, 0);
            }
            next.dedup();
            if next.is_empty() {
                return None;
            }
            cur = next;
        }
        Some(Matcher {
            g: self.g.clone(),
            stacks: cur,
        })
    }

    /// Fewest bytes that make the document complete.
    pub fn remaining(&self) -> usize {
        self.stacks
            .iter()
            .map(|s| self.g.remaining(s))
            .min()
            .unwrap_or(INF)
    }

    /// The document is complete (generation may end here).
    pub fn can_end(&self) -> bool {
        self.stacks.iter().any(|s| match s.frames.as_slice() {
            [] => true,
            [Frame::Num { st, .. }] => Grammar::num_complete(*st),
            [Frame::Lit { node, got }] => {
                matches!(&self.g.nodes[*node], Node::Lit(o) if o.contains(got))
            }
            _ => false,
        })
    }

    /// Nothing more can follow: the document is complete and closed.
    pub fn done(&self) -> bool {
        self.stacks.iter().all(|s| s.frames.is_empty())
    }
}

/// What a request is held to: a grammar, over a vocabulary.
#[derive(Clone)]
pub struct Constraint {
    pub grammar: Arc<Grammar>,
    pub tokens: Arc<TokenBytes>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl PartialEq for Constraint {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.grammar, &other.grammar) && Arc::ptr_eq(&self.tokens, &other.tokens)
    }
}

impl Constraint {
    /// Fewest tokens a complete document takes (one per byte at worst).
    pub fn min_tokens(&self) -> usize {
        Matcher::new(self.grammar.clone()).remaining()
    }
}

/// One sequence's progress through its constraint.
#[derive(Debug, Clone)]
pub struct Guide {
    tokens: Arc<TokenBytes>,
    m: Matcher,
}

impl Guide {
    pub fn new(c: &Constraint) -> Guide {
        Guide {
            tokens: c.tokens.clone(),
            m: Matcher::new(c.grammar.clone()),
        }
    }

    /// Masks (to −∞) every token that would leave the language, or that
    /// would leave more to close than `budget` further tokens can write.
    /// End-of-sequence tokens are allowed only where the document is
    /// complete. Returns how many tokens remain allowed.
    pub fn mask(&self, logits: &mut [f32], budget: usize, eos: &[u32]) -> usize {
        let can_end = self.m.can_end();
        let mut allowed = 0;
        for (id, l) in logits.iter_mut().enumerate() {
            let ok = if eos.contains(&(id as u32)) {
                can_end
            } else {
                match self.tokens.get(id as u32) {
                    None => false,
                    Some(b) => self
                        .m
                        .feed(b)
                        .is_some_and(|next| next.remaining() <= budget),
                }
            };
            if ok {
                allowed += 1;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        allowed
    }

    /// Moves past a sampled token; false if it was not allowed.
    pub fn advance(&mut self, id: u32) -> bool {
        let Some(b) = self.tokens.get(id) else {
            return false;
        };
        match self.m.feed(b) {
            Some(m) => {
                self.m = m;
                true
            }
            None => false,
        }
    }

    pub fn can_end(&self) -> bool {
        self.m.can_end()
    }

    pub fn done(&self) -> bool {
        self.m.done()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn accepts(g: &Arc<Grammar>, text: &str) -> bool {
        Matcher::new(g.clone())
            .feed(text.as_bytes())
            .is_some_and(|m| m.can_end())
    }

    fn prefix_ok(g: &Arc<Grammar>, text: &str) -> bool {
        Matcher::new(g.clone()).feed(text.as_bytes()).is_some()
    }

    fn schema() -> Value {
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 5},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1},
            "ok": {"type": ["boolean", "null"]},
            "score": {"type": "number"}},
            "required": ["name", "age", "tags"], "additionalProperties": false})
    }

    #[test]
    fn documents_of_the_schema_are_accepted_and_others_refused_at_the_first_wrong_byte() {
        let g = Arc::new(Grammar::from_schema(&schema()).unwrap());
        assert!(accepts(&g, r#"{"name":"Ann","age":3,"tags":["a"]}"#));
        assert!(accepts(
            &g,
            r#"{ "tags": ["b", "a"], "age": -12, "name": "é✓", "ok": null, "score": 1.5e-3 }"#
        ));
        assert!(!prefix_ok(&g, r#"{"nam":"#));
        assert!(!prefix_ok(&g, r#"{"name":"toolong"#));
        assert!(!prefix_ok(&g, r#"{"age":1.5"#));
        assert!(!prefix_ok(&g, r#"{"tags":["c"#));
        assert!(!prefix_ok(&g, r#"{"name":"a","name""#));
        assert!(!prefix_ok(&g, r#"{"extra""#));
        // Complete only once every required property is there.
        assert!(!accepts(&g, r#"{"name":"a","age":1}"#));
        assert!(!prefix_ok(&g, r#"{"name":"a","age":1}"#));
    }

    #[test]
    fn remaining_is_the_length_of_a_shortest_completion() {
        let g = Arc::new(Grammar::from_schema(&schema()).unwrap());
        let m = Matcher::new(g.clone());
        let shortest = r#"{"name":"","age":0,"tags":["a"]}"#;
        assert_eq!(m.remaining(), shortest.len());
        for cut in 0..shortest.len() {
            let m = m.feed(&shortest.as_bytes()[..cut]).unwrap();
            assert_eq!(m.remaining(), shortest.len() - cut, "{}", &shortest[..cut]);
        }
    }

    #[test]
    fn any_object_takes_nested_json_and_refuses_a_bare_value() {
        let g = Arc::new(Grammar::any_object());
        assert!(accepts(&g, r#"{"a":[1,{"b":null}],"c":"\u00e9\n"}"#));
        assert!(!prefix_ok(&g, "[1]"));
        assert!(!prefix_ok(&g, r#"{"a":tru "#));
        assert!(Matcher::new(g).feed(b"{}").unwrap().done());
    }

    #[test]
    fn recursive_refs_and_unsupported_keywords() {
        let s = json!({"$defs": {"node": {"type": "object", "properties": {
            "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["kids"]}},
            "$ref": "#/$defs/node"});
        let g = Arc::new(Grammar::from_schema(&s).unwrap());
        assert!(accepts(
            &g,
            r#"{"kids":[{"kids":[]},{"kids":[{"kids":[]}]}]}"#
        ));
        let e = Grammar::from_schema(&json!({"type": "string", "pattern": "a+"})).unwrap_err();
        assert!(e.0.contains("pattern"), "{e}");
        let e = Grammar::from_schema(
            &json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"], "$defs": {"a": {"$ref": "#/$defs/a"}}}),
        );
        assert!(e.is_err());
    }

    #[test]
    fn tool_call_lists_name_one_of_the_tools_with_its_arguments() {
        let g = Arc::new(
            Grammar::tool_calls(&[
                (
                    "get_weather".into(),
                    json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
                ),
                ("noop".into(), json!({"type": "object", "properties": {}})),
            ])
            .unwrap(),
        );
        assert!(accepts(
            &g,
            r#"[{"name":"get_weather","arguments":{"city":"Oslo"}},{"arguments":{},"name":"noop"}]"#
        ));
        assert!(!prefix_ok(&g, r#"[{"name":"other"#));
        assert!(!prefix_ok(&g, "[]"));
    }
}
