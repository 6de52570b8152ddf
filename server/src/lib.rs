//! # Switchyard coordinator
//!
//! The HTTP coordinator that workers and users talk to, built on the in-process dispatcher
//! (crate `switchyard`). It is being built in stages (issue 5); what exists now:
//!
//! | module | what it does | state |
//! |---|---|---|
//! | [`store`] | the `Store` trait, its records and changes; SQLite (WAL) as the embedded default | done |
//! | [`writer`] | the group-commit writer: one transaction per batch of waiting requests | done |
//! | [`recovery`] | restart: workers into the dispatcher first, then tasks (queued and running) | done |
//!
//! Still to come: the HTTP API (axum), leases and the reaper, auth, metrics, and the
//! `switchyard` CLI.
//!
//! The rule that joins the dispatcher and the store: the dispatcher decides, the writer makes
//! the decision durable, and only then is the caller answered (a submission acknowledged, an
//! assignment sent, a report confirmed).

pub mod recovery;
pub mod store;
pub mod writer;
