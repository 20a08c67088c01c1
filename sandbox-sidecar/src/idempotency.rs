//! Idempotent request ids: the first call with an id runs (to completion, even if its client
//! goes away); later calls with the same id get the same result without running again.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Mutex;

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};
use prost::Message;
use sha2::{Digest as _, Sha256};
use tonic::{Code, Status, metadata::MetadataMap};

use crate::error::SidecarError;

#[derive(Clone)]
struct StoredStatus {
    code: Code,
    message: String,
    metadata: MetadataMap,
}

type Stored = Result<Vec<u8>, StoredStatus>;

struct Entry {
    fingerprint: [u8; 32],
    result: Shared<BoxFuture<'static, Stored>>,
}

pub struct IdempotencyCache {
    capacity: usize,
    inner: Mutex<(HashMap<String, Entry>, VecDeque<String>)>,
}

impl IdempotencyCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new((HashMap::new(), VecDeque::new())),
        }
    }

    /// Runs `work` once per `request_id` (an empty id always runs).
    pub async fn run<Req, Resp, F>(
        &self,
        method: &str,
        request_id: &str,
        req: &Req,
        work: F,
    ) -> Result<Resp, Status>
    where
        Req: Message,
        Resp: Message + Default + 'static,
        F: Future<Output = Result<Resp, Status>> + Send + 'static,
    {
        if request_id.is_empty() {
            return work.await;
        }
        let mut h = Sha256::new();
        h.update(method.as_bytes());
        h.update([0]);
        h.update(req.encode_to_vec());
        let fingerprint: [u8; 32] = h.finalize().into();
        let shared = {
            let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            let (map, order) = &mut *guard;
            match map.get(request_id) {
                Some(e) if e.fingerprint != fingerprint => {
                    return Err(SidecarError::RequestIdConflict(request_id.to_string()).into());
                }
                Some(e) => e.result.clone(),
                None => {
                    let fut: BoxFuture<'static, Stored> = async move {
                        match work.await {
                            Ok(resp) => Ok(resp.encode_to_vec()),
                            Err(s) => Err(StoredStatus {
                                code: s.code(),
                                message: s.message().to_string(),
                                metadata: s.metadata().clone(),
                            }),
                        }
                    }
                    .boxed();
                    let shared = fut.shared();
                    // Runs to the end even if every caller goes away, so a retry finds it.
                    tokio::spawn(shared.clone());
                    map.insert(
                        request_id.to_string(),
                        Entry {
                            fingerprint,
                            result: shared.clone(),
                        },
                    );
                    order.push_back(request_id.to_string());
                    while order.len() > self.capacity {
                        if let Some(old) = order.pop_front() {
                            map.remove(&old);
                        }
                    }
                    shared
                }
            }
        };
        match shared.await {
            Ok(bytes) => Resp::decode(bytes.as_slice())
                .map_err(|e| Status::internal(format!("cached response: {e}"))),
            Err(s) => Err(Status::with_metadata(s.code, s.message, s.metadata)),
        }
    }
}
