//! Decode steps replayed from CUDA graphs (`--cuda-graphs`).
//!
//! A decode step is launch-bound on a small model or a fast GPU: a 32-layer
//! model makes about 400 launches a step, each a few microseconds of CPU
//! and driver time. A graph captured once per row bucket and split-K
//! bucket (`graph_plan`) replays them as one launch. The graph owns every
//! buffer it touches (step metadata, activations, partials, logits), so
//! its device pointers stay valid; a replay copies the step's padded
//! metadata into them, launches the graph, then chooses the tokens
//! eagerly (the sampling settings differ per step).
//!
//! Only the model on one GPU: a split model moves activations through the
//! host between GPUs, which a graph cannot hold.

use std::collections::HashMap;

use cudarc::driver::CudaGraph;

use super::*;
use crate::cuda::graph_plan::{GraphKey, PaddedDecode};

/// The captured graphs of one backend.
pub(super) struct Graphs {
    pub(super) limits: GraphLimits,
    captured: HashMap<GraphKey, Captured>,
}

/// A captured graph that may move to another thread with its backend.
struct SendGraph(CudaGraph);

// SAFETY: CUDA graph objects are not internally synchronized, so calls on
// one must be serialized; they need no particular thread. The graph is
// owned by one backend, used only through `&mut CudaBackend` (one thread
// at a time), and never shared (no `Sync`).
unsafe impl Send for SendGraph {}

/// One graph and the buffers its launches point at.
struct Captured {
    dev: DevStep,
    head: HeadBufs,
    graph: SendGraph,
    // Read only by the graph's launches; kept alive with it.
    _x: CudaSlice<f32>,
    _acts: Acts,
    _partials: Partials,
}

impl Graphs {
    /// Graphs for a backend of `shards` GPUs, when `--cuda-graphs` asks for
    /// them and the model is on one; the pad block follows the engine's
    /// `num_blocks`.
    pub(super) fn for_backend(
        opts: &CudaOptions,
        cfg: &ModelConfig,
        shards: usize,
        num_blocks: usize,
        part: usize,
    ) -> Option<Graphs> {
        if !opts.cuda_graphs {
            return None;
        }
        if shards != 1 {
            tracing::warn!(
                gpus = shards,
                "--cuda-graphs needs the model on one GPU; decode runs without graphs"
            );
            return None;
        }
        let context = opts.max_context.unwrap_or(cfg.max_position_embeddings);
        Some(Graphs {
            limits: GraphLimits::new(context, opts.block_size, part, num_blocks as u32),
            captured: HashMap::new(),
        })
    }
}

impl DevStep {
    /// Device buffers of a padded decode step (a graph's).
    fn upload_padded(st: &Arc<CudaStream>, p: &PaddedDecode) -> Result<DevStep, CudaError> {
        let e = drv("uploading the step");
        Ok(DevStep {
            ids: st.clone_htod(&p.ids).map_err(&e)?,
            pos: st.clone_htod(&p.pos).map_err(&e)?,
            slots: st.clone_htod(&p.slots).map_err(&e)?,
            tok_table: st.clone_htod(&p.tok_table).map_err(&e)?,
            tables: st.clone_htod(&p.tables).map_err(&e)?,
            decode: Some(st.clone_htod(&p.decode).map_err(&e)?),
            tiles: None,
            logits_rows: Some(st.clone_htod(&p.logits_rows).map_err(&e)?),
        })
    }

    /// Copies a padded step into these buffers (same sizes: same key).
    /// `decode` and `logits_rows` are `0..rows` for every key, never copied.
    fn refill(&mut self, st: &Arc<CudaStream>, p: &PaddedDecode) -> Result<(), CudaError> {
        let e = drv("uploading the step");
        st.memcpy_htod(&p.ids, &mut self.ids).map_err(&e)?;
        st.memcpy_htod(&p.pos, &mut self.pos).map_err(&e)?;
        st.memcpy_htod(&p.slots, &mut self.slots).map_err(&e)?;
        st.memcpy_htod(&p.tok_table, &mut self.tok_table)
            .map_err(&e)?;
        st.memcpy_htod(&p.tables, &mut self.tables).map_err(&e)?;
        Ok(())
    }
}

impl CudaBackend {
    /// Runs a decode step from the graph of `key`, capturing it first if
    /// this is its first step.
    pub(super) fn run_graph(
        &mut self,
        batch: &Batch,
        layout: &StepLayout,
        key: GraphKey,
        wants: &[RowWant],
    ) -> Result<Vec<RowOut>, CudaError> {
        let Some(mut graphs) = self.graphs.take() else {
            return Err(CudaError::Unsupported("no CUDA graphs".into()));
        };
        let out = self.replay(&mut graphs, batch, layout, key, wants);
        self.graphs = Some(graphs);
        out
    }

    fn replay(
        &self,
        graphs: &mut Graphs,
        batch: &Batch,
        layout: &StepLayout,
        key: GraphKey,
        wants: &[RowWant],
    ) -> Result<Vec<RowOut>, CudaError> {
        let padded = PaddedDecode::new(batch, layout, key, &graphs.limits)?;
        let sh = &self.shards[0];
        sh.ctx
            .bind_to_thread()
            .map_err(drv("binding the context"))?;
        let st = &sh.stream;
        let c = match graphs.captured.entry(key) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let c = self.capture(key, &padded)?;
                tracing::debug!(rows = key.rows, parts = key.parts, "decode graph captured");
                v.insert(c)
            }
        };
        c.dev.refill(st, &padded)?;
        c.graph
            .0
            .launch()
            .map_err(drv("launching the decode graph"))?;
        let m = layout.ids.len();
        let out = pick_rows(sh, &c.head.logits, m, self.cfg.vocab_size, wants);
        // As every step: a fault fails this step's sequences only.
        st.synchronize().map_err(drv("running the step"))?;
        out
    }

    /// Allocates a graph's buffers and records one padded decode step into
    /// it (recording runs nothing; the first replay does).
    fn capture(&self, key: GraphKey, padded: &PaddedDecode) -> Result<Captured, CudaError> {
        let sh = &self.shards[0];
        let st = &sh.stream;
        let cfg = &self.cfg;
        let rows = key.rows;
        let dev = DevStep::upload_padded(st, padded)?;
        let mut x = alloc(st, rows * cfg.hidden_size, "activations")?;
        let mut acts = Acts::alloc(st, cfg, rows)?;
        let partials = Partials::alloc(st, rows * cfg.num_heads * key.parts, cfg.head_dim)?;
        let mut head = HeadBufs::alloc(st, cfg, rows, rows)?;
        st.synchronize()
            .map_err(drv("allocating a graph's buffers"))?;
        let shape = StepShape {
            m: rows,
            decode: rows,
            tiles: 0,
            longest: 0,
            parts: Some(key.parts),
        };
        let mode = dsys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        st.begin_capture(mode)
            .map_err(drv("starting a graph capture"))?;
        let recorded = self.record_step(&mut x, &mut acts, &partials, &mut head, &dev, &shape);
        // The capture ends whatever happened, or the stream stays capturing.
        let ended = st.end_capture(dsys::CUgraphInstantiate_flags(0));
        recorded?;
        let graph = ended
            .map_err(drv("instantiating the decode graph"))?
            .ok_or_else(|| CudaError::Unsupported("the decode graph captured nothing".into()))?;
        graph.upload().map_err(drv("uploading the decode graph"))?;
        Ok(Captured {
            dev,
            head,
            graph: SendGraph(graph),
            _x: x,
            _acts: acts,
            _partials: partials,
        })
    }

    /// The launches of a decode step up to its logits, into `head.logits`.
    fn record_step(
        &self,
        x: &mut CudaSlice<f32>,
        acts: &mut Acts,
        partials: &Partials,
        head: &mut HeadBufs,
        dev: &DevStep,
        shape: &StepShape,
    ) -> Result<(), CudaError> {
        let sh = &self.shards[0];
        let h = self.cfg.hidden_size;
        let embed = sh
            .embed
            .as_ref()
            .ok_or_else(|| CudaError::Unsupported("the embedding is on another GPU".into()))?;
        embedding(sh, embed, dev, shape.m, h, x)?;
        let pending = forward_layers(self, 0, x, acts, Some(partials), dev, shape)?;
        let pending = pending.then_some(&acts.d);
        head_logits(self, sh, x, pending, dev, shape.m, shape.m, head)
    }
}
