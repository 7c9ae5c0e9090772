//! Reading a client's request body within the size limit.
//!
//! A body over the limit is refused, but the rest of it is still read (and
//! dropped) up to a bound: a server that answers and closes while the client
//! is still writing leaves unread bytes in its socket, the kernel then resets
//! the connection, and the client loses the answer ("connection closed
//! before message completed") instead of reading a clear error.

use std::time::Duration;

use axum::body::{Body, Bytes};
use futures::StreamExt;

/// How much of an oversized body is read and dropped so the client can read
/// the refusal; past this the connection is closed regardless.
pub const DRAIN_LIMIT: usize = 64 << 20;

/// How long the drain may take before the connection is closed regardless.
pub const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Why a body was not read.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BodyError {
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the request body did not arrive within {after:?}")]
    TimedOut { after: Duration },
    #[error("the request body could not be read: {0}")]
    Broken(String),
}

/// Read the body whole if it is within `limit` bytes and arrives within
/// `timeout` (a client that trickles or stalls its body cannot hold the
/// request open); otherwise drain the rest of an oversized body (within
/// [`DRAIN_LIMIT`] and [`DRAIN_TIME`]) and refuse it.
pub async fn read_within(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, BodyError> {
    tokio::time::timeout(timeout, read_capped(body, limit))
        .await
        .unwrap_or(Err(BodyError::TimedOut { after: timeout }))
}

async fn read_capped(body: Body, limit: usize) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut out: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| BodyError::Broken(e.to_string()))?;
        if out.len() + chunk.len() > limit {
            let seen = out.len() + chunk.len();
            drop(out);
            drain(&mut stream, seen).await;
            return Err(BodyError::TooLarge { limit });
        }
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

/// Read and drop what is left of a body, within the drain bounds.
async fn drain(stream: &mut axum::body::BodyDataStream, mut seen: usize) {
    let rest = async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len();
            if seen > DRAIN_LIMIT {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, rest).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A body of `n` chunks of `size` bytes that counts the chunks read.
    fn counted(n: usize, size: usize, read: Arc<AtomicUsize>) -> Body {
        let chunks = futures::stream::iter(0..n).map(move |_| {
            read.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))
        });
        Body::from_stream(chunks)
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_refused_after_the_timeout() {
        let stalled = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{"))])
            .chain(futures::stream::pending());
        let t = Duration::from_millis(200);
        let b = read_within(Body::from_stream(stalled), 4000, t).await;
        assert_eq!(b, Err(BodyError::TimedOut { after: t }));
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let read = Arc::new(AtomicUsize::new(0));
        let b = read_within(
            counted(4, 1000, read.clone()),
            4000,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(b.map(|b| b.len()), Ok(4000));
    }

    #[tokio::test]
    async fn an_oversized_body_is_refused_and_its_rest_read_so_the_client_reads_the_refusal() {
        let read = Arc::new(AtomicUsize::new(0));
        let b = read_within(
            counted(50, 1000, read.clone()),
            4000,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(b, Err(BodyError::TooLarge { limit: 4000 }));
        assert_eq!(
            read.load(Ordering::SeqCst),
            50,
            "the whole body was drained"
        );
    }

    #[tokio::test]
    async fn the_drain_stops_at_its_bound() {
        let read = Arc::new(AtomicUsize::new(0));
        let chunk = 1 << 20;
        let n = DRAIN_LIMIT / chunk + 20;
        let b = read_within(
            counted(n, chunk, read.clone()),
            4000,
            Duration::from_secs(60),
        )
        .await;
        assert_eq!(b, Err(BodyError::TooLarge { limit: 4000 }));
        assert!(read.load(Ordering::SeqCst) < n, "stopped before the end");
    }
}
