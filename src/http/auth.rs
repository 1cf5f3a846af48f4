//! API keys as bearer tokens, with scopes: `admin` (datasets, jobs, adapters, and prediction)
//! and `predict` (prediction only). A route layer on each resource router asks for its scope;
//! `/healthz`, `/readyz`, `/metrics`, the dashboard page and its assets are open.
//!
//! Keys come from `ARBITER_API_KEYS` (`scope:key` pairs, held here as SHA-256 hashes) and from
//! the `api_keys` table (`arbiter keys create`, shared by every node). A presented key is
//! hashed and compared in constant time with every configured key, and, when it has the
//! `arb_<id>_<secret>` form, with the stored hash of that id.
//!
//! No key: 401 when any key is configured. With no key configured at all the API is open, which
//! the server allows only on a loopback address (it refuses to start otherwise, and this layer
//! answers 401 should every key be revoked later). Keys never reach a log line or an error body.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, HOST, ORIGIN, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::store::api_keys::{hash_key, hashes_equal, key_id};
use crate::store::{Scope, Store};

/// A key given in `ARBITER_API_KEYS`, by hash.
#[derive(Clone)]
struct ConfiguredKey {
    scope: Scope,
    hash: [u8; 32],
}

/// Keys shorter than this are refused in `ARBITER_API_KEYS`.
pub const MIN_KEY_LEN: usize = 16;

/// Why `ARBITER_API_KEYS` could not be read (never quotes a key).
#[derive(Debug, thiserror::Error)]
#[error("ARBITER_API_KEYS entry {entry}: {reason}")]
pub struct KeyListError {
    pub entry: usize,
    pub reason: String,
}

/// The authentication state every request checks against.
#[derive(Clone)]
pub struct Auth {
    configured: Arc<[ConfiguredKey]>,
    store: Store,
    /// Whether the API may run open when no key exists (the server listens on loopback).
    open_without_keys: bool,
}

impl Auth {
    /// `list` is `scope:key[,scope:key...]`; blanks around entries are ignored.
    pub fn new(list: Option<&str>, store: Store, open_without_keys: bool) -> Result<Auth, KeyListError> {
        let mut configured = Vec::new();
        for (i, entry) in list.unwrap_or("").split(',').enumerate() {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let err = |reason: String| KeyListError { entry: i + 1, reason };
            let (scope, key) = entry.split_once(':').ok_or_else(|| err("expected scope:key".into()))?;
            let scope = Scope::parse(scope.trim())
                .ok_or_else(|| err(format!("unknown scope {:?}; expected admin or predict", scope.trim())))?;
            let key = key.trim();
            if key.chars().count() < MIN_KEY_LEN || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err(format!("a key must be at least {MIN_KEY_LEN} characters without blanks")));
            }
            configured.push(ConfiguredKey { scope, hash: hash_key(key) });
        }
        Ok(Auth { configured: configured.into(), store, open_without_keys })
    }

    /// Keys given in the environment or settings.
    pub fn configured_keys(&self) -> usize {
        self.configured.len()
    }

    /// Whether any key exists (configured, or unrevoked in the database).
    pub async fn any_keys(&self) -> Result<bool, crate::store::StoreError> {
        if !self.configured.is_empty() {
            return Ok(true);
        }
        self.store.has_api_keys().await
    }

    /// The scope of a presented key, or None when it is no key of ours.
    pub async fn verify(&self, key: &str) -> Result<Option<Scope>, crate::store::StoreError> {
        let hash = hash_key(key);
        // Every configured key is compared, matched or not: the time taken says nothing.
        let mut found = None;
        for k in self.configured.iter() {
            if hashes_equal(&hash, &k.hash) && found.is_none() {
                found = Some(k.scope);
            }
        }
        if found.is_some() {
            return Ok(found);
        }
        let Some(id) = key_id(key) else { return Ok(None) };
        Ok(self.store.get_api_key(id).await?.filter(|r| r.matches(key)).and_then(|r| r.scope()))
    }
}

/// Whether a request to a server open without keys (on a loopback address) comes from this
/// machine's own clients and pages: its Host names a loopback address (a site whose name is
/// made to resolve to 127.0.0.1 passes a browser's same-origin rule, not this), and it carries no
/// Origin of another site (a page elsewhere posting to the local port; `null` included).
fn from_this_machine(req: &Request) -> bool {
    let header = |name| req.headers().get(name).map(|v: &HeaderValue| v.to_str().unwrap_or(""));
    let host = header(HOST).or_else(|| req.uri().authority().map(|a| a.as_str()));
    let host_ok = host.is_none_or(loopback_authority);
    let origin_ok = header(ORIGIN).is_none_or(|o| o.split_once("://").is_some_and(|(_, authority)| loopback_authority(authority)));
    host_ok && origin_ok
}

/// `localhost`, or a loopback IP address, with or without a port.
fn loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, port)| if port.bytes().all(|b| b.is_ascii_digit()) { h } else { authority }),
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// An error answer with the `WWW-Authenticate` challenge RFC 6750 asks for.
fn challenge(err: ApiError, value: String) -> Response {
    let mut res = err.into_response();
    if let Ok(v) = HeaderValue::from_str(&value) {
        res.headers_mut().insert(WWW_AUTHENTICATE, v);
    }
    res
}

fn unauthorized(code: &'static str, message: &str) -> Response {
    challenge(
        ApiError::new(StatusCode::UNAUTHORIZED, code, message.to_string()),
        format!("Bearer realm=\"arbiter\", error=\"invalid_token\", error_description=\"{code}\""),
    )
}

/// Route layer: lets the request through when it carries a key allowed `required`.
pub async fn require(State((auth, required)): State<(Auth, Scope)>, req: Request, next: Next) -> Response {
    let header = req.headers().get(AUTHORIZATION).map(|v| v.to_str().unwrap_or(""));
    let token = match header {
        None => None,
        Some(h) => match h.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() => {
                Some(token.trim())
            }
            _ => {
                return unauthorized(
                    "invalid_authorization",
                    "the Authorization header must be `Bearer <API key>`",
                )
            }
        },
    };
    let Some(token) = token else {
        return match auth.any_keys().await {
            Ok(false) if auth.open_without_keys => match from_this_machine(&req) {
                true => next.run(req).await,
                false => ApiError::new(
                    StatusCode::FORBIDDEN,
                    "foreign_origin",
                    "this server has no API keys and answers only pages and clients of this machine: the request's Host or \
                     Origin names another site (create an API key to serve others)",
                )
                .into_response(),
            },
            Ok(false) => unauthorized(
                "missing_api_key",
                "this server has no API keys and is not on a loopback address: it serves no API until a key is created",
            ),
            Ok(true) => unauthorized("missing_api_key", "an API key is required: send `Authorization: Bearer <API key>`"),
            Err(e) => ApiError::from(e).into_response(),
        };
    };
    match auth.verify(token).await {
        Ok(Some(scope)) if scope.allows(required) => next.run(req).await,
        Ok(Some(scope)) => challenge(
            ApiError::new(
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                format!("this API key has the {scope} scope; this route needs the {required} scope"),
            )
            .with("required_scope", required.as_str()),
            format!("Bearer realm=\"arbiter\", error=\"insufficient_scope\", scope=\"{required}\""),
        ),
        Ok(None) => unauthorized("invalid_api_key", "the API key is not valid (unknown or revoked)"),
        Err(e) => ApiError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_authorities() {
        for ok in ["localhost", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080", "127.1.2.3:1", "[::1]", "[::1]:8080"] {
            assert!(loopback_authority(ok), "{ok}");
        }
        for bad in ["evil.example", "evil.example:8080", "localhost.evil.example", "10.0.0.1:80", "[::2]:80", "", "null", "0.0.0.0"] {
            assert!(!loopback_authority(bad), "{bad}");
        }
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = Store::connect(&url).await.unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn key_lists_are_parsed_and_errors_never_quote_a_key() {
        let (_d, store) = store().await;
        let auth = Auth::new(Some(" admin:aaaaaaaaaaaaaaaa , predict:bbbbbbbbbbbbbbbb,"), store.clone(), false).unwrap();
        assert_eq!(auth.configured_keys(), 2);
        assert_eq!(auth.verify("aaaaaaaaaaaaaaaa").await.unwrap(), Some(Scope::Admin));
        assert_eq!(auth.verify("bbbbbbbbbbbbbbbb").await.unwrap(), Some(Scope::Predict));
        assert_eq!(auth.verify("cccccccccccccccc").await.unwrap(), None);
        for (bad, entry) in [("root:secretsecretsecret", 1), ("admin:aaaaaaaaaaaaaaaa,short:x", 2), ("admin:tooshort", 1), ("secretsecretsecret", 1)] {
            let e = Auth::new(Some(bad), store.clone(), false).err().expect(bad);
            assert_eq!(e.entry, entry, "{bad}");
            let text = e.to_string();
            for secret in ["secretsecretsecret", "tooshort", "aaaaaaaaaaaaaaaa"] {
                assert!(!text.contains(secret), "{text}");
            }
        }
    }

    #[tokio::test]
    async fn stored_keys_verify_until_revoked() {
        let (_d, store) = store().await;
        let auth = Auth::new(None, store.clone(), true).unwrap();
        assert!(!auth.any_keys().await.unwrap());
        let (id, key) = crate::store::api_keys::generate_key();
        store.insert_api_key(&id, Scope::Predict, &key, Some("ci"), 1).await.unwrap();
        assert!(auth.any_keys().await.unwrap());
        assert_eq!(auth.verify(&key).await.unwrap(), Some(Scope::Predict));
        // Same id, another secret: forged.
        let forged = format!("{}{}", &key[..key.len() - 4], "0000");
        assert_ne!(forged, key);
        assert_eq!(auth.verify(&forged).await.unwrap(), None);
        assert!(store.revoke_api_key(&id, 2).await.unwrap());
        assert_eq!(auth.verify(&key).await.unwrap(), None);
        assert!(!auth.any_keys().await.unwrap());
    }
}
