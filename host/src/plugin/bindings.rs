//! Host-side bindings of every contract version the host loads (`wit/` at the repository
//! root): `dbmazz:plugin@0.3.0` (the current one, [`sink`] and [`transform`]) and
//! `dbmazz:plugin@0.2.0` ([`v0_2`], `wit/since_v0.2.0/`), and `dbmazz:plugin@0.1.0`
//! ([`v0_1`], `wit/since_v0.1.0/`).
//!
//! 0.2's data types have exactly the shapes of 0.3's `data` interface (only the
//! interface's name changed), so its bindings reuse 0.3's Rust types (`with`): a batch
//! crosses into a 0.2 plugin without conversion; wasmtime type-checks records and
//! variants by structure when it instantiates the component.

#![allow(missing_docs)]

/// The `sink` world of 0.3; owns the shared types and host interfaces.
pub mod sink {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "dbmazz:plugin/sink",
        exports: { default: async },
        // PostgreSQL calls do I/O (tokio-postgres); the rest answer at once.
        imports: { "dbmazz:plugin/postgres": async },
        require_store_data_send: true,
        with: {
            "wasi:http": wasmtime_wasi_http::p2::bindings::http,
            "wasi:io": wasmtime_wasi::p2::bindings::io,
            "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
            "dbmazz:plugin/postgres.connection": crate::plugin::postgres::Connection,
        },
    });
}

/// The `transform` world of 0.3; shares [`sink`]'s types and host interfaces.
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "dbmazz:plugin/transform",
        exports: { default: async },
        require_store_data_send: true,
        with: {
            "dbmazz:plugin/data": super::sink::dbmazz::plugin::data,
            "dbmazz:plugin/log": super::sink::dbmazz::plugin::log,
            "dbmazz:plugin/config": super::sink::dbmazz::plugin::config,
            "dbmazz:plugin/metrics": super::sink::dbmazz::plugin::metrics,
            "dbmazz:plugin/kv": super::sink::dbmazz::plugin::kv,
            "dbmazz:plugin/metadata": super::sink::dbmazz::plugin::metadata,
        },
    });
}

/// `dbmazz:plugin@0.2.0` (`wit/since_v0.2.0/`): bare exports (`init`, `write`, ...),
/// text configuration, no `metadata`. Its `types` are 0.3's `data`.
pub mod v0_2 {
    /// The 0.2 `sink` world; owns 0.2's host interfaces.
    pub mod sink {
        wasmtime::component::bindgen!({
            path: "../wit/since_v0.2.0",
            world: "dbmazz:plugin/sink",
            exports: { default: async },
            require_store_data_send: true,
            with: {
                "wasi:http": wasmtime_wasi_http::p2::bindings::http,
                "wasi:io": wasmtime_wasi::p2::bindings::io,
                "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
                "dbmazz:plugin/types": crate::plugin::bindings::sink::dbmazz::plugin::data,
            },
        });
    }

    /// The 0.2 `transform` world.
    pub mod transform {
        wasmtime::component::bindgen!({
            path: "../wit/since_v0.2.0",
            world: "dbmazz:plugin/transform",
            exports: { default: async },
            require_store_data_send: true,
            with: {
                "dbmazz:plugin/types": crate::plugin::bindings::sink::dbmazz::plugin::data,
                "dbmazz:plugin/log": super::sink::dbmazz::plugin::log,
                "dbmazz:plugin/config": super::sink::dbmazz::plugin::config,
                "dbmazz:plugin/metrics": super::sink::dbmazz::plugin::metrics,
                "dbmazz:plugin/kv": super::sink::dbmazz::plugin::kv,
            },
        });
    }
}

pub use sink::dbmazz::plugin::data as wit;

/// `dbmazz:plugin@0.1.0` (`wit/since_v0.1.0/`): 0.2 without `op.read`. Its types are its
/// own (wasmtime's bindgen maps whole interfaces, not single records): a batch is
/// converted for it (`contract.rs`), `read` arriving as `insert`, which is what snapshot
/// rows were before 0.2 named them.
pub mod v0_1 {
    /// The 0.1 `sink` world; owns 0.1's types and host interfaces.
    pub mod sink {
        wasmtime::component::bindgen!({
            path: "../wit/since_v0.1.0",
            world: "dbmazz:plugin/sink",
            exports: { default: async },
            require_store_data_send: true,
            with: {
                "wasi:http": wasmtime_wasi_http::p2::bindings::http,
                "wasi:io": wasmtime_wasi::p2::bindings::io,
                "wasi:clocks": wasmtime_wasi::p2::bindings::clocks,
            },
        });
    }

    /// The 0.1 `transform` world.
    pub mod transform {
        wasmtime::component::bindgen!({
            path: "../wit/since_v0.1.0",
            world: "dbmazz:plugin/transform",
            exports: { default: async },
            require_store_data_send: true,
            with: {
                "dbmazz:plugin/types": super::sink::dbmazz::plugin::types,
                "dbmazz:plugin/log": super::sink::dbmazz::plugin::log,
                "dbmazz:plugin/config": super::sink::dbmazz::plugin::config,
                "dbmazz:plugin/metrics": super::sink::dbmazz::plugin::metrics,
                "dbmazz:plugin/kv": super::sink::dbmazz::plugin::kv,
            },
        });
    }
}
