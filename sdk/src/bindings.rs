//! Generated bindings of the `dbmazz:plugin@0.3.0` worlds (see `wit/` at the repository
//! root). Plugin authors use the re-exports at the crate root instead.

#![allow(missing_docs, clippy::all)]

/// The `sink` world. Owns the shared types and host interfaces.
pub mod sink {
    wit_bindgen::generate!({
        path: "wit",
        world: "dbmazz:plugin/sink",
        pub_export_macro: true,
        additional_derives: [PartialEq],
        export_macro_name: "__export_sink_world",
        default_bindings_module: "dbmazz_sdk::bindings::sink",
        with: {
            "wasi:http/types@0.2.12": wasip2::http::types,
            "wasi:http/outgoing-handler@0.2.12": wasip2::http::outgoing_handler,
            "wasi:io/error@0.2.12": wasip2::io::error,
            "wasi:io/poll@0.2.12": wasip2::io::poll,
            "wasi:io/streams@0.2.12": wasip2::io::streams,
            "wasi:clocks/monotonic-clock@0.2.12": wasip2::clocks::monotonic_clock,
        },
    });
}

/// The `transform` world; shares the types and host interfaces of [`sink`].
pub mod transform {
    wit_bindgen::generate!({
        path: "wit",
        world: "dbmazz:plugin/transform",
        pub_export_macro: true,
        additional_derives: [PartialEq],
        export_macro_name: "__export_transform_world",
        default_bindings_module: "dbmazz_sdk::bindings::transform",
        with: {
            "dbmazz:plugin/data@0.3.0": crate::bindings::sink::dbmazz::plugin::data,
            "dbmazz:plugin/log@0.3.0": crate::bindings::sink::dbmazz::plugin::log,
            "dbmazz:plugin/config@0.3.0": crate::bindings::sink::dbmazz::plugin::config,
            "dbmazz:plugin/metrics@0.3.0": crate::bindings::sink::dbmazz::plugin::metrics,
            "dbmazz:plugin/kv@0.3.0": crate::bindings::sink::dbmazz::plugin::kv,
            "dbmazz:plugin/metadata@0.3.0": crate::bindings::sink::dbmazz::plugin::metadata,
        },
    });
}
