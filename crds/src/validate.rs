//! Validation of selfplay objects as the API server does it, without an API server.
//!
//! Each object is checked against its CRD's generated `openAPIV3Schema` (types, bounds,
//! required fields, and — like `kubectl apply`'s strict field validation — unknown fields),
//! then against the CRD's CEL rules (`x-kubernetes-validations`, transition rules too when an
//! old object is given). `trainer local` uses the same functions, so a spec that the cluster
//! would reject is rejected on one machine too, with a message that names the field.

use std::fmt;

use kube::CustomResourceExt;
use kube::core::cel::Validator as CelValidator;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use thiserror::Error;

use crate::{API_VERSION, Checkpoint, SandboxPool, SelfPlayRun};

/// One rejected field, as the API server reports it: `spec.selfPlay.alpha: …`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (`spec.pools[0].name`); empty for the whole object.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Why an object was rejected.
#[derive(Debug, Error)]
pub enum ValidationError {
    #[error("not valid YAML/JSON: {0}")]
    Syntax(String),
    #[error("apiVersion: {found:?} is not supported (expected {API_VERSION:?})")]
    ApiVersion { found: String },
    #[error(
        "kind: {found:?} is not a selfplay kind (expected SelfPlayRun, SandboxPool or Checkpoint)"
    )]
    UnknownKind { found: String },
    #[error("kind: expected {expected}, found {found}")]
    WrongKind {
        expected: &'static str,
        found: String,
    },
    #[error("{kind} {name:?} is invalid:\n{}", join(.errors))]
    Invalid {
        kind: String,
        name: String,
        errors: Vec<FieldError>,
    },
    #[error("internal: the generated schema of {kind} cannot be compiled: {message}")]
    Schema { kind: String, message: String },
    #[error("{kind} {name:?} passed validation but cannot be decoded: {message}")]
    Decode {
        kind: String,
        name: String,
        message: String,
    },
}

impl ValidationError {
    /// The field errors, when the object was rejected field by field.
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            Self::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

fn join(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("  - {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The three kinds of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    SelfPlayRun,
    SandboxPool,
    Checkpoint,
}

impl Kind {
    pub fn from_name(kind: &str) -> Option<Self> {
        match kind {
            "SelfPlayRun" => Some(Self::SelfPlayRun),
            "SandboxPool" => Some(Self::SandboxPool),
            "Checkpoint" => Some(Self::Checkpoint),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::SelfPlayRun => "SelfPlayRun",
            Self::SandboxPool => "SandboxPool",
            Self::Checkpoint => "Checkpoint",
        }
    }

    /// The CRD's `openAPIV3Schema` as JSON.
    pub fn openapi_schema(self) -> Value {
        let crd = match self {
            Self::SelfPlayRun => SelfPlayRun::crd(),
            Self::SandboxPool => SandboxPool::crd(),
            Self::Checkpoint => Checkpoint::crd(),
        };
        crd.spec
            .versions
            .into_iter()
            .next()
            .and_then(|v| v.schema)
            .and_then(|s| s.open_api_v3_schema)
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null)
    }
}

/// Parses every document of a (multi-document) YAML or JSON text.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, ValidationError> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| ValidationError::Syntax(e.to_string()))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Validates one object (any selfplay kind); `old` enables the transition (immutability) rules.
pub fn validate_value(object: &Value, old: Option<&Value>) -> Result<Kind, ValidationError> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if api_version != API_VERSION {
        return Err(ValidationError::ApiVersion {
            found: api_version.to_string(),
        });
    }
    let kind_name = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = Kind::from_name(kind_name).ok_or_else(|| ValidationError::UnknownKind {
        found: kind_name.to_string(),
    })?;
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();

    let schema = kind.openapi_schema();
    let mut errors = Vec::new();
    if name.is_empty() && object.pointer("/metadata/generateName").is_none() {
        errors.push(FieldError {
            field: "metadata.name".into(),
            message: "Required value: name or generateName is required".into(),
        });
    }
    errors.extend(structural_errors(kind, &schema, object)?);
    // CEL rules assume a structurally valid object, as in the API server.
    if errors.is_empty()
        && let Err(cel) = CelValidator::new().validate(&schema, object, old)
    {
        errors.extend(cel.into_vec().into_iter().map(|e| FieldError {
            field: e.field_path.trim_start_matches('.').to_string(),
            message: format!("Invalid value: {} (rule: {})", e.message, e.rule),
        }));
    }
    if errors.is_empty() {
        Ok(kind)
    } else {
        Err(ValidationError::Invalid {
            kind: kind.as_str().to_string(),
            name,
            errors,
        })
    }
}

/// Validates and decodes one object of kind `K` (serde defaults fill the optional fields, as
/// the API server's schema defaults would).
pub fn parse_as<K>(object: &Value, old: Option<&Value>) -> Result<K, ValidationError>
where
    K: DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    let expected = K::kind(&());
    let found = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if found != expected {
        return Err(ValidationError::WrongKind {
            expected: leak_kind(&expected),
            found: found.to_string(),
        });
    }
    validate_value(object, old)?;
    serde_json::from_value(object.clone()).map_err(|e| ValidationError::Decode {
        kind: expected.to_string(),
        name: object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        message: e.to_string(),
    })
}

/// Validates and decodes a `SelfPlayRun` from YAML text (the first document of that kind).
pub fn parse_run_yaml(text: &str) -> Result<SelfPlayRun, ValidationError> {
    parse_first(text, Kind::SelfPlayRun)
}

/// Validates and decodes a `SandboxPool` from YAML text.
pub fn parse_pool_yaml(text: &str) -> Result<SandboxPool, ValidationError> {
    parse_first(text, Kind::SandboxPool)
}

fn parse_first<K>(text: &str, kind: Kind) -> Result<K, ValidationError>
where
    K: DeserializeOwned + kube::Resource<DynamicType = ()>,
{
    let docs = parse_documents(text)?;
    let doc = docs
        .iter()
        .find(|d| d.get("kind").and_then(Value::as_str) == Some(kind.as_str()))
        .or(docs.first())
        .ok_or_else(|| ValidationError::Syntax("the document is empty".into()))?;
    parse_as(doc, None)
}

fn leak_kind(kind: &str) -> &'static str {
    match Kind::from_name(kind) {
        Some(k) => k.as_str(),
        None => "unknown",
    }
}

/// Checks the object against the structural schema with a JSON-Schema validator.
fn structural_errors(
    kind: Kind,
    schema: &Value,
    object: &Value,
) -> Result<Vec<FieldError>, ValidationError> {
    let mut schema = schema.clone();
    to_strict_json_schema(&mut schema, true);
    let validator = jsonschema::validator_for(&schema).map_err(|e| ValidationError::Schema {
        kind: kind.as_str().to_string(),
        message: e.to_string(),
    })?;
    let mut errors: Vec<FieldError> = validator
        .iter_errors(object)
        .map(|e| FieldError {
            field: pointer_to_path(&e.instance_path().to_string()),
            message: e.to_string(),
        })
        .collect();
    errors.sort_by(|a, b| a.field.cmp(&b.field).then(a.message.cmp(&b.message)));
    errors.dedup();
    Ok(errors)
}

/// Turns an OpenAPI v3 structural schema into the JSON Schema the API server effectively
/// enforces: `nullable` becomes a `null` type, and objects with declared properties reject
/// unknown fields (strict field validation) unless they preserve unknown fields.
fn to_strict_json_schema(node: &mut Value, root: bool) {
    let Some(map) = node.as_object_mut() else {
        return;
    };
    if map.get("nullable").and_then(Value::as_bool) == Some(true) {
        if let Some(Value::String(t)) = map.get("type").cloned() {
            map.insert(
                "type".into(),
                Value::Array(vec![Value::String(t), Value::String("null".into())]),
            );
        }
        if let Some(Value::Array(e)) = map.get_mut("enum") {
            e.push(Value::Null);
        }
    }
    if root {
        let props = map
            .entry("properties")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(props) = props.as_object_mut() {
            props
                .entry("apiVersion")
                .or_insert_with(|| serde_json::json!({"type": "string"}));
            props
                .entry("kind")
                .or_insert_with(|| serde_json::json!({"type": "string"}));
            props
                .entry("metadata")
                .or_insert_with(|| serde_json::json!({"type": "object"}));
        }
    }
    let preserves = map
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    if map.contains_key("properties") && !map.contains_key("additionalProperties") && !preserves {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "patternProperties"] {
        if let Some(Value::Object(props)) = map.get_mut(key) {
            for (name, child) in props.iter_mut() {
                // metadata is validated by the API server itself, not by the CRD schema.
                if !(root && name == "metadata") {
                    to_strict_json_schema(child, false);
                }
            }
        }
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(child) = map.get_mut(key) {
            to_strict_json_schema(child, false);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(children)) = map.get_mut(key) {
            for child in children {
                to_strict_json_schema(child, false);
            }
        }
    }
}

/// `/spec/pools/0/name` → `spec.pools[0].name`.
fn pointer_to_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointer_paths_read_like_the_api_server() {
        assert_eq!(pointer_to_path("/spec/pools/0/name"), "spec.pools[0].name");
        assert_eq!(pointer_to_path(""), "");
    }
}
