//! dbmazz: a change-data-capture host.
//!
//! Data flows one way: [`source`] (replication connection, pgoutput parser) →
//! [`pipeline`] (transactions, schema cache, batches) → [`delivery`] (sink, then
//! [`checkpoint`]) → confirmation to PostgreSQL. [`runtime`] wires the stages together.
//! See `docs/architecture.md` for the invariants and the tests that prove them.

#![warn(missing_docs)]

pub mod check;
pub mod checkpoint;
pub use dbmazz_config as config;
pub mod control;
pub mod delivery;
pub mod dlq;
pub mod localpg;
pub use dbmazz_protocol::lsn;
pub mod metrics;
pub use dbmazz_pipeline as pipeline;
pub mod plugin;
pub mod quickstart;
pub mod runtime;
pub mod scaffold;
pub mod snapshot;
pub mod source;
pub mod stats;

pub use lsn::Lsn;
