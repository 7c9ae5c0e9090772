//! Device buffers kept from one step to the next. A step's temporary
//! buffers (split-K attention partials, the activations cast for cuBLAS)
//! used to be allocated and freed at every launch; each purpose now keeps
//! one buffer, handed out again while it is big enough and replaced by a
//! larger one (rounded up, so a growing batch reallocates rarely) when not.

/// One purpose's buffer. Generic over the buffer type so the policy is
/// tested without a GPU.
#[derive(Debug)]
pub struct Reuse<B> {
    buf: Option<B>,
    cap: usize,
    /// Allocations made so far (the tests and the debug log read it).
    pub allocations: usize,
}

impl<B> Default for Reuse<B> {
    fn default() -> Self {
        Reuse {
            buf: None,
            cap: 0,
            allocations: 0,
        }
    }
}

/// Capacity allocated for a request of `n` elements: the next power of two
/// at or above it (at least 256).
pub fn capacity_for(n: usize) -> usize {
    n.max(256).next_power_of_two()
}

impl<B> Reuse<B> {
    /// A buffer of at least `n` elements: the kept one, or a new one from
    /// `alloc(capacity)` (the old one is dropped first, so its memory can
    /// serve the new allocation).
    pub fn get<E>(
        &mut self,
        n: usize,
        alloc: impl FnOnce(usize) -> Result<B, E>,
    ) -> Result<&mut B, E> {
        if self.buf.is_none() || self.cap < n {
            self.buf = None;
            let cap = capacity_for(n);
            self.buf = Some(alloc(cap)?);
            self.cap = cap;
            self.allocations += 1;
        }
        match self.buf.as_mut() {
            Some(b) => Ok(b),
            None => unreachable!("set above"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_is_allocated_once_per_shape_and_again_only_to_grow() {
        let mut r: Reuse<Vec<f32>> = Reuse::default();
        let alloc = |n: usize| Ok::<_, ()>(vec![0.0; n]);
        for _ in 0..100 {
            let b = r.get(1000, alloc).unwrap();
            assert!(b.len() >= 1000);
        }
        assert_eq!(r.allocations, 1);
        // Smaller steps reuse it; a larger one grows it once.
        r.get(10, alloc).unwrap();
        r.get(1024, alloc).unwrap();
        assert_eq!(r.allocations, 1);
        r.get(1025, alloc).unwrap();
        r.get(2000, alloc).unwrap();
        assert_eq!(r.allocations, 2);
        // A failed allocation leaves nothing half-made behind.
        assert!(r.get(1 << 20, |_| Err::<Vec<f32>, _>(())).is_err());
        assert_eq!(r.get(5, alloc).unwrap().len(), 256);
    }
}
