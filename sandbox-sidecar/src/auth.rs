//! The bearer token every call must carry, compared in constant time.
//!
//! Both sides are hashed with SHA-256 first and the digests compared with `subtle`'s
//! `ConstantTimeEq`, so neither the content nor the length of the token leaks through
//! timing.

use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tonic::{Request, Status};

pub const AUTH_HEADER: &str = "authorization";

#[derive(Clone)]
pub struct TokenCheck {
    digest: [u8; 32],
}

impl TokenCheck {
    pub fn new(token: &str) -> Self {
        Self {
            digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    pub fn matches(&self, given: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(given.as_bytes()).into();
        d.ct_eq(&self.digest).into()
    }

    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get(AUTH_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(t) if self.matches(t) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated(
                "missing token: send 'authorization: Bearer <token>'",
            )),
        }
    }
}

/// Reads a token file; surrounding whitespace (a trailing newline) is not part of the token.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<String> {
    let t = std::fs::read_to_string(path)?;
    let t = t.trim().to_string();
    if t.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "token file is empty",
        ));
    }
    Ok(t)
}
