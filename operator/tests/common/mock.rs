//! A scripted, mocked Kubernetes API server (kube-rs `controller-rs` pattern, tower-test):
//! the test lists the requests the code under test must make, in order, with the answers.
//! A request that differs from the script fails the test; one past its end fails the call.

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};

pub type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub fn client() -> (Client, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

pub enum Reply {
    /// The request's body back (named from generateName when unnamed), status 200/201.
    Echo,
    Json(u16, Value),
    /// A `Status` error: code and reason (NotFound, Conflict, AlreadyExists).
    Error(u16, &'static str),
}

pub struct Step {
    pub method: &'static str,
    /// The request's path and query must start with this.
    pub path: String,
    pub reply: Reply,
}

pub fn step(method: &'static str, path: impl Into<String>, reply: Reply) -> Step {
    Step {
        method,
        path: path.into(),
        reply,
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub body: Value,
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("mock: {reason}"), "reason": reason, "code": code})
}

/// Serves `script` in order; returns what was requested.
pub fn serve(mut handle: Handle, script: Vec<Step>) -> tokio::task::JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        for (i, s) in script.into_iter().enumerate() {
            let next =
                tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request())
                    .await;
            let (req, send) = next
                .unwrap_or_else(|_| {
                    panic!(
                        "step {i}: no request came; expected {} {}",
                        s.method, s.path
                    )
                })
                .unwrap_or_else(|| {
                    panic!("step {i}: client gone; expected {} {}", s.method, s.path)
                });
            let method = req.method().to_string();
            let uri = req.uri().to_string();
            let bytes = req.into_body().collect_bytes().await.expect("body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            assert!(
                method == s.method && uri.starts_with(&s.path),
                "step {i}: expected {} {}…, got {method} {uri}\nbody: {body}",
                s.method,
                s.path
            );
            let (code, out) = match s.reply {
                Reply::Echo => {
                    let mut out = body.clone();
                    if out.pointer("/metadata/name").is_none()
                        && let Some(prefix) = out.pointer("/metadata/generateName").cloned()
                    {
                        out["metadata"]["name"] =
                            json!(format!("{}{i}", prefix.as_str().unwrap_or("")));
                    }
                    (if method == "POST" { 201 } else { 200 }, out)
                }
                Reply::Json(code, v) => (code, v),
                Reply::Error(code, reason) => (code, status(code, reason)),
            };
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&out).expect("json")))
                .expect("response");
            send.send_response(resp);
            seen.push(Seen { method, uri, body });
        }
        seen
    })
}

/// An empty list of some kind.
pub fn list(kind: &str, items: Vec<Value>) -> Reply {
    Reply::Json(
        200,
        json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": "1"}, "items": items}),
    )
}
