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
//! | [`app`] | the HTTP API (axum): workers register, fetch, report, leave; tasks submit, get, list, update, cancel; admin rebalance, workers, force-remove; stats, health | no auth yet |
//! | [`error`] | one error type, mapped to a status and a JSON body in one place | done |
//! | [`liveness`] | worker leases, renewed by every worker request; the reaper declares silent workers dead | done |
//! | [`wakeups`] | long-poll: a waiting fetch is woken the moment work it can fetch is placed | done |
//! | `main.rs` | the `switchyard` CLI: `serve` | first slice |
//!
//! Still to come: bearer-token auth, request limits beyond fetch size, page size
//! and payload, Prometheus metrics, OpenAPI, and
//! the client subcommands.
//!
//! The rule that joins the dispatcher and the store: the dispatcher decides, the writer makes
//! the decision durable, and only then is the caller answered (a submission acknowledged, an
//! assignment sent, a report confirmed).

pub mod api;
pub mod app;
pub mod auth;
pub mod client;
pub mod error;
pub mod liveness;
pub mod metrics;
pub mod recovery;
pub mod store;
pub mod wakeups;
pub mod work;
pub mod writer;
