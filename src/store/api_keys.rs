//! The `api_keys` table: keys made by `arbiter keys create`, shared by every API node.
//!
//! A key reads `arb_<id>_<secret>`: the id finds the row, and the SHA-256 of the whole key is
//! compared with the stored hash in constant time. Only the hash is stored; the key is shown
//! once when it is made. Keys are random 256-bit secrets, so a plain SHA-256 (no slow
//! password hash) is enough to make a leaked table useless.

use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::FromRow;
use subtle::ConstantTimeEq;

use super::{Result, Store};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Datasets, jobs, adapters, and prediction.
    Admin,
    /// Prediction only.
    Predict,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Predict => "predict",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "admin" => Some(Scope::Admin),
            "predict" => Some(Scope::Predict),
            _ => None,
        }
    }

    /// Whether a key of this scope may call a route that requires `required`.
    pub fn allows(self, required: Scope) -> bool {
        self == Scope::Admin || self == required
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Prefix of keys made by `arbiter keys create`.
pub const KEY_PREFIX: &str = "arb_";

/// The SHA-256 of a key.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Constant-time equality of two key hashes.
pub fn hashes_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.ct_eq(b).into()
}

/// The row id inside a key of the `arb_<id>_<secret>` form.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id) && id.len() == 16 && hex(secret)).then_some(id)
}

/// A new key: its id and the full key text (id and 256 random bits).
pub fn generate_key() -> (String, String) {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    let mut rng = rand::rng();
    rng.fill_bytes(&mut id);
    rng.fill_bytes(&mut secret);
    let id = hex::encode(id);
    let key = format!("{KEY_PREFIX}{id}_{}", hex::encode(secret));
    (id, key)
}

#[derive(Debug, Clone, FromRow)]
pub struct ApiKeyRecord {
    pub id: String,
    pub scope: String,
    /// Hex SHA-256 of the key.
    pub key_hash: String,
    pub name: Option<String>,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl ApiKeyRecord {
    /// Whether `key` is this (unrevoked) key; constant time in the key.
    pub fn matches(&self, key: &str) -> bool {
        let mut stored = [0u8; 32];
        if self.revoked_at.is_some() || hex::decode_to_slice(&self.key_hash, &mut stored).is_err() {
            return false;
        }
        hashes_equal(&hash_key(key), &stored)
    }

    pub fn scope(&self) -> Option<Scope> {
        Scope::parse(&self.scope)
    }
}

const COLUMNS: &str = "id, scope, key_hash, name, created_at, revoked_at";

impl Store {
    /// Stores the hash of a new key.
    pub async fn insert_api_key(&self, id: &str, scope: Scope, key: &str, name: Option<&str>, now: i64) -> Result<ApiKeyRecord> {
        let sql = format!("INSERT INTO api_keys ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, NULL) RETURNING {COLUMNS}");
        let hash = hex::encode(hash_key(key));
        Ok(with_pool!(self, pool => sqlx::query_as::<_, ApiKeyRecord>(&sql)
            .bind(id)
            .bind(scope.as_str())
            .bind(&hash)
            .bind(name)
            .bind(now)
            .fetch_one(pool)
            .await)?)
    }

    pub async fn get_api_key(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, ApiKeyRecord>(&sql).bind(id).fetch_optional(pool).await)?)
    }

    /// Every key, revoked ones included, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY created_at, id");
        Ok(with_pool!(self, pool => sqlx::query_as::<_, ApiKeyRecord>(&sql).fetch_all(pool).await)?)
    }

    /// Revokes a key; false when there is no such unrevoked key.
    pub async fn revoke_api_key(&self, id: &str, now: i64) -> Result<bool> {
        let sql = "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL";
        let affected = with_pool!(self, pool => sqlx::query(sql).bind(now).bind(id).execute(pool).await.map(|d| d.rows_affected()))?;
        Ok(affected == 1)
    }

    /// Whether any unrevoked key exists.
    pub async fn has_api_keys(&self) -> Result<bool> {
        let sql = "SELECT id FROM api_keys WHERE revoked_at IS NULL LIMIT 1";
        let row: Option<(String,)> = with_pool!(self, pool => sqlx::query_as(sql).fetch_optional(pool).await)?;
        Ok(row.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_carry_their_id_and_differ() {
        let (id, key) = generate_key();
        assert_eq!(key_id(&key), Some(id.as_str()));
        let (_, other) = generate_key();
        assert_ne!(key, other);
        assert_eq!(key.len(), KEY_PREFIX.len() + 16 + 1 + 64);
    }

    #[test]
    fn key_ids_are_only_read_from_well_formed_keys() {
        assert_eq!(key_id("arb_0123456789abcdef_00ff"), Some("0123456789abcdef"));
        for bad in ["", "arb_", "arb_0123456789abcdef", "arb_0123456789abcdef_", "arb_xyz_00", "xarb_0123456789abcdef_00", "arb_../../x_00"] {
            assert_eq!(key_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_record_matches_its_key_only_until_revoked() {
        let (id, key) = generate_key();
        let mut rec = ApiKeyRecord {
            id,
            scope: "predict".into(),
            key_hash: hex::encode(hash_key(&key)),
            name: None,
            created_at: 0,
            revoked_at: None,
        };
        assert!(rec.matches(&key));
        assert!(!rec.matches(&format!("{key}0")));
        rec.revoked_at = Some(1);
        assert!(!rec.matches(&key));
    }

    #[test]
    fn admin_allows_everything_predict_only_prediction() {
        assert!(Scope::Admin.allows(Scope::Predict));
        assert!(Scope::Admin.allows(Scope::Admin));
        assert!(Scope::Predict.allows(Scope::Predict));
        assert!(!Scope::Predict.allows(Scope::Admin));
    }
}
