//! Host-side bindings of the `dbmazz:plugin@0.2.0` worlds (`wit/` at the repository root).

#![allow(missing_docs)]

/// The `sink` world; owns the shared types and host interfaces.
pub mod sink {
    wasmtime::component::bindgen!({
        path: "../wit",
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

/// The `transform` world; shares [`sink`]'s types and host interfaces.
pub mod transform {
    wasmtime::component::bindgen!({
        path: "../wit",
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

pub use sink::dbmazz::plugin::types as wit;
