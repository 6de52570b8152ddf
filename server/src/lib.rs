//! # Switchyard coordinator
//!
//! The HTTP coordinator that workers and users talk to, built on the in-process dispatcher
//! (crate `switchyard`), and the `switchyard` CLI's client side.
//!
//! | module | what it does |
//! |---|---|
//! | [`app`] | the coordinator's state; opening (recovery, admin token), and [`app::detach`] |
//! | [`api`] | the HTTP routes, split by caller ([`api::workers`], [`api::tasks`], [`api::admin`]), the request-time limit and the OpenAPI document |
//! | [`auth`] | bearer tokens (stored hashed) and each caller's scope |
//! | [`delivery`] | the delivery protocol: assignments durable before the reply, reconciliation of what a worker holds, idempotent reports; the guarantee and its failure windows |
//! | [`error`] | one error type, mapped to a status and a JSON body in one place |
//! | [`ids`] | task, worker and token ids, reserved from the store in blocks (coordinators sharing a store never collide) |
//! | [`input`] | the configured limits on new input, including `--max-classes` (the name rules are the dispatcher's `Limits`; stored state loads whatever the limits are now) |
//! | [`store`] | the `Store` trait, its records and changes; SQLite (WAL) as the embedded default |
//! | [`writer`] | the group-commit writer: one transaction per batch of waiting requests |
//! | [`recovery`] | restart: workers into the dispatcher first, then tasks (queued and running) |
//! | [`listener`] | accepting connections: the connection cap, the header timeout, shutdown with a deadline |
//! | [`liveness`] | worker leases, renewed by every worker request; the reaper declares silent workers dead |
//! | [`wakeups`] | long-poll: a waiting fetch is woken the moment work it can fetch is placed |
//! | [`operations`] | every change a request asks for, in one of two shapes written once: decided then recorded, or recorded then published |
//! | [`metrics`] | Prometheus metrics: events as they happen, dispatcher state copied in at scrape time |
//! | [`sync`] | the locks and atomics the coordinator's shared state uses, named in one place |
//! | [`client`], [`work`] | the CLI's HTTP client, and the `work` loop that runs a shell command per task |
//! | `main.rs` | the `switchyard` CLI: `serve` and the client subcommands |
//!
//! The rule that joins the dispatcher and the store: the dispatcher decides, the writer makes
//! the decision durable, and only then is the caller answered (a submission acknowledged, an
//! assignment sent, a report confirmed). A submission is validated and committed before the
//! dispatcher sees it. Each decide-and-commit step runs detached from its request, so a client
//! that hangs up cannot leave a decision unrecorded.

pub mod api;
pub mod app;
pub mod auth;
pub mod client;
pub mod delivery;
pub mod error;
pub mod ids;
pub mod input;
pub mod listener;
pub mod liveness;
pub mod metrics;
pub mod operations;
pub mod ownership;
pub mod recovery;
pub mod sharing;
pub mod store;
pub mod sync;
pub mod wakeups;
pub mod work;
pub mod writer;
