//! Loading the YAML fixtures under `tests/fixtures/`, and the mocked API server.
#![allow(dead_code)]

pub mod mock;

use std::path::PathBuf;

use serde::de::DeserializeOwned;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Every document of a fixture, deserialised as `T`; `CURRENT` replaced by `hash`.
pub fn docs<T: DeserializeOwned>(name: &str, hash: &str) -> Vec<T> {
    let text = fixture_text(name).replace("CURRENT", hash);
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| T::deserialize(d).unwrap_or_else(|e| panic!("fixture {name}: {e}")))
        .collect()
}

pub fn one<T: DeserializeOwned>(name: &str) -> T {
    docs::<T>(name, "")
        .into_iter()
        .next()
        .expect("one document")
}

pub fn ts(s: &str) -> k8s_openapi::jiff::Timestamp {
    s.parse().expect("RFC 3339 time")
}
