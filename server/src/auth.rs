//! Bearer tokens: who is calling, and what each caller may touch.
//!
//! Every route but `/health` and `/openapi.json` needs `Authorization: Bearer <token>`.
//! A token is 32 bytes from the operating system's generator, shown once as `sy_` and 64 hex
//! digits. Only its SHA-256 is stored (in the store and in memory), so a leaked database holds
//! no usable token. Three kinds of caller:
//!
//! | caller | how it gets a token | may |
//! |---|---|---|
//! | admin | `--admin-token` / `SWITCHYARD_ADMIN_TOKEN`, or generated on the first start and printed once | everything |
//! | submitter | `POST /v1/admin/tokens` (`switchyard token create`), scoped to groups | submit, get, list, update and cancel tasks of its groups; register workers that serve only its groups |
//! | worker | returned by `POST /v1/workers` | heartbeat, fetch, report and leave as that one worker |
//!
//! A missing or unknown token gets 401; a known token outside its scope gets 403, except that
//! a task of another group answers 404, as if it did not exist, so a submitter cannot probe
//! other groups' ids. A removed worker's token still identifies it, so its late requests get
//! 410 (register again) rather than 401.
//!
//! Handlers authorise by what they take: [`Admin`] (the admin routes), [`User`] (task routes and
//! registration; its scope checked per group), [`ThisWorker`] (the worker routes: the token must
//! be that of the `{worker}` in the path). Each check runs in the extractor, before the handler,
//! so a handler cannot forget it.
//!
//! Giving `--admin-token` on a start makes it the only admin token (earlier ones are revoked),
//! which is also how a lost admin token is replaced.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};

use crate::app::App;
use crate::error::ApiError;
use crate::store::{Role, TokenRecord};
use crate::sync::{Arc, AtomicU64, Ordering, RwLock};

/// A new random token, as shown to its owner (`sy_` and 64 hex digits).
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
    let mut token = String::with_capacity(67);
    token.push_str("sy_");
    for b in bytes {
        let _ = write!(token, "{b:02x}");
    }
    token
}

/// The stored form of `token`: lower-case hex SHA-256.
pub fn hash(token: &str) -> String {
    hash_bytes(token.as_bytes())
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn hash_bytes(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for b in digest {
        let _ = write!(hex, "{b:02x}");
    }
    hex
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A user token: admin or submitter.
    User(Arc<TokenRecord>),
    /// The token of this worker.
    Worker(u64),
}

impl Caller {
    fn forbidden(&self, what: &str) -> ApiError {
        ApiError::forbidden(format!("this token may not {what}"))
    }

    /// Only `worker` itself (see [`ThisWorker`]).
    fn require_worker(&self, worker: u64) -> Result<(), ApiError> {
        match self {
            Caller::Worker(w) if *w == worker => Ok(()),
            _ => Err(self.forbidden(&format!("act as worker {worker}"))),
        }
    }
}

/// Every valid token, by hash. Read on every request, written when a token or worker is added
/// or a token revoked.
#[derive(Debug, Default)]
pub struct Keyring {
    by_hash: RwLock<HashMap<String, Caller>>,
    /// Counts the changes made here (under `by_hash`'s write lock), so a sync from the store
    /// read before one of them is not applied over it. Relaxed: read and bumped under the lock.
    generation: AtomicU64,
}

impl Keyring {
    /// Adds (or replaces) the caller behind `hash`.
    pub fn insert(&self, hash: String, caller: Caller) {
        let mut map = self.by_hash.write();
        self.generation.fetch_add(1, Ordering::Relaxed);
        map.insert(hash, caller);
    }

    /// The count of changes made here so far: pass it to [`Keyring::sync_users`] with tokens
    /// read after it.
    pub fn generation(&self) -> u64 {
        let _map = self.by_hash.read();
        self.generation.load(Ordering::Relaxed)
    }

    /// Revokes the user token `id`; returns whether it existed.
    pub fn revoke(&self, id: u64) -> bool {
        let mut map = self.by_hash.write();
        self.generation.fetch_add(1, Ordering::Relaxed);
        let before = map.len();
        map.retain(|_, c| !matches!(c, Caller::User(t) if t.id == id));
        map.len() != before
    }

    /// Makes `tokens` the user tokens in force (another coordinator of the same database may
    /// have added or revoked some); worker tokens are kept. Skipped if a token changed here
    /// since `generation` (then `tokens`, read after it, may predate that change).
    pub fn sync_users(&self, tokens: Vec<TokenRecord>, generation: u64) {
        let mut map = self.by_hash.write();
        if self.generation.load(Ordering::Relaxed) != generation {
            return;
        }
        let wanted: std::collections::HashSet<u64> = tokens.iter().map(|t| t.id).collect();
        map.retain(|_, c| !matches!(c, Caller::User(t) if !wanted.contains(&t.id)));
        for t in tokens {
            if !matches!(map.get(&t.hash), Some(Caller::User(known)) if known.id == t.id) {
                map.insert(t.hash.clone(), Caller::User(Arc::new(t)));
            }
        }
    }

    /// The user tokens, by id.
    pub fn users(&self) -> Vec<Arc<TokenRecord>> {
        let mut users: Vec<_> = self
            .by_hash
            .read()
            .values()
            .filter_map(|c| match c {
                Caller::User(t) => Some(t.clone()),
                Caller::Worker(_) => None,
            })
            .collect();
        users.sort_by_key(|t| t.id);
        users
    }

    /// The caller presenting `authorization` (the header's value, if any).
    pub fn identify(&self, authorization: Option<&[u8]>) -> Result<Caller, ApiError> {
        let header = authorization.ok_or_else(|| {
            ApiError::unauthorized("missing Authorization header: use `Bearer <token>`")
        })?;
        let token = std::str::from_utf8(header)
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("malformed Authorization header: use `Bearer <token>`")
            })?;
        self.by_hash
            .read()
            .get(&hash(token))
            .cloned()
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))
    }
}

impl FromRequestParts<Arc<App>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        app.keyring().identify(
            parts
                .headers
                .get(AUTHORIZATION)
                .map(axum::http::HeaderValue::as_bytes),
        )
    }
}

/// An admin caller. Taking it as a handler argument is the admin check: without an admin
/// token the request is refused (401 or 403) before the handler runs.
#[derive(Debug, Clone)]
pub struct Admin(pub Arc<TokenRecord>);

impl FromRequestParts<Arc<App>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, app).await? {
            Caller::User(t) if t.role == Role::Admin => Ok(Admin(t)),
            caller => Err(caller.forbidden("use the admin routes")),
        }
    }
}

/// A user (admin or submitter) caller: the routes that manage tasks. A worker's token is
/// refused (403). Its scope is checked per group with [`User::require_group`] or
/// [`User::scope`].
#[derive(Debug, Clone)]
pub struct User(pub Arc<TokenRecord>);

impl User {
    /// Whether it may see and change tasks of `group`.
    pub fn may_use(&self, group: &str) -> bool {
        self.0.role == Role::Admin || self.0.groups.iter().any(|g| g == group)
    }

    /// It may use `group` (403 otherwise).
    pub fn require_group(&self, group: &str) -> Result<(), ApiError> {
        if self.may_use(group) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "this token may not use group {group:?}"
            )))
        }
    }

    /// The groups it is limited to: `None` for an admin (no limit).
    pub fn scope(&self) -> Option<&[String]> {
        match self.0.role {
            Role::Admin => None,
            Role::Submitter => Some(&self.0.groups),
        }
    }

    /// Its token's id (idempotency keys are scoped to it).
    pub fn token_id(&self) -> u64 {
        self.0.id
    }
}

impl FromRequestParts<Arc<App>> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        match Caller::from_request_parts(parts, app).await? {
            Caller::User(t) => Ok(User(t)),
            caller => Err(caller.forbidden("manage tasks or register workers")),
        }
    }
}

/// The worker named by the route's `{worker}` path parameter, presenting its own token.
/// Taking it as a handler argument is the check that a worker acts only as itself (403).
#[derive(Debug, Clone, Copy)]
pub struct ThisWorker(pub u64);

impl FromRequestParts<Arc<App>> for ThisWorker {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, app).await?;
        let params = axum::extract::RawPathParams::from_request_parts(parts, app)
            .await
            .map_err(|e| ApiError::internal(format!("reading the path: {e}")))?;
        let named = params
            .iter()
            .find(|(name, _)| *name == "worker")
            .ok_or_else(|| ApiError::internal("a worker route without a {worker} parameter"))?
            .1;
        let worker: u64 = named
            .parse()
            .map_err(|_| ApiError::bad_path(format!("{named:?} is not a worker id (a number)")))?;
        caller.require_worker(worker)?;
        Ok(ThisWorker(worker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64, role: Role, groups: &[&str]) -> Caller {
        Caller::User(record(id, role, groups))
    }

    fn record(id: u64, role: Role, groups: &[&str]) -> Arc<TokenRecord> {
        Arc::new(TokenRecord {
            id,
            hash: String::new(),
            role,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            created_ms: 0,
        })
    }

    #[test]
    fn tokens_are_random_and_hashes_are_sha256_hex() {
        let (a, b) = (generate(), generate());
        assert_ne!(a, b);
        assert!(a.starts_with("sy_") && a.len() == 67, "{a}");
        // SHA-256 of the empty string, a known answer.
        assert_eq!(
            hash(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn identify_accepts_only_known_bearer_tokens() {
        let ring = Keyring::default();
        ring.insert(hash("sy_w"), Caller::Worker(7));
        let ok = ring.identify(Some(b"Bearer sy_w")).unwrap();
        assert!(matches!(ok, Caller::Worker(7)));
        for bad in [
            None,
            Some(&b"sy_w"[..]),
            Some(b"Basic sy_w"),
            Some(b"Bearer nope"),
        ] {
            let e = ring.identify(bad).unwrap_err();
            assert_eq!(e.status(), axum::http::StatusCode::UNAUTHORIZED, "{bad:?}");
        }
    }

    #[test]
    fn scopes() {
        let admin = User(record(1, Role::Admin, &[]));
        let sub = User(record(2, Role::Submitter, &["a", "b"]));
        assert!(admin.may_use("z") && sub.may_use("a") && !sub.may_use("z"));
        assert!(sub.require_group("a").is_ok() && sub.require_group("z").is_err());
        assert_eq!(admin.scope(), None);
        assert_eq!(sub.scope().unwrap(), ["a", "b"]);
        assert_eq!((admin.token_id(), sub.token_id()), (1, 2));
        let worker = Caller::Worker(3);
        assert!(worker.require_worker(3).is_ok() && worker.require_worker(4).is_err());
        assert!(Caller::User(admin.0).require_worker(3).is_err());
    }

    #[test]
    fn revoking_removes_only_that_token() {
        let ring = Keyring::default();
        ring.insert(hash("x"), user(1, Role::Submitter, &["a"]));
        ring.insert(hash("y"), user(2, Role::Submitter, &["a"]));
        assert!(ring.revoke(1));
        assert!(!ring.revoke(1));
        assert!(ring.identify(Some(b"Bearer x")).is_err());
        assert!(ring.identify(Some(b"Bearer y")).is_ok());
        assert_eq!(ring.users().len(), 1);
    }
}
