//! Wire protocol of the joey guest agent.
//!
//! The `.proto` files in `protos/` are wire-compatible with kata-containers'
//! agent API (`src/libs/protocols/protos/`); `build.rs` turns them into
//! rust-protobuf messages and async ttrpc services. Module names follow
//! kata's `protocols` crate so generated cross references (`super::oci::...`)
//! resolve.

pub mod contract;
pub mod mountinfo;

macro_rules! generated {
    ($(#[$meta:meta])* $name:ident, $file:literal) => {
        $(#[$meta])*
        #[allow(
            clippy::all,
            clippy::pedantic,
            missing_docs,
            non_camel_case_types,
            non_snake_case,
            non_upper_case_globals,
            unused_imports,
            unused_results,
            unused_mut,
            dead_code,
            unknown_lints,
            renamed_and_removed_lints
        )]
        pub mod $name {
            include!(concat!(env!("OUT_DIR"), "/", $file));
        }
    };
}

generated!(
    /// Messages of `agent.proto` (package `grpc`).
    agent,
    "agent.rs"
);
generated!(
    /// ttrpc client and server for `grpc.AgentService`.
    agent_ttrpc,
    "agent_ttrpc.rs"
);
generated!(
    /// Messages of `health.proto` (package `grpc`).
    health,
    "health.rs"
);
generated!(
    /// ttrpc client and server for `grpc.Health`.
    health_ttrpc,
    "health_ttrpc.rs"
);
generated!(
    /// OCI runtime spec messages of `oci.proto` (package `grpc`).
    oci,
    "oci.rs"
);
generated!(
    /// Network types of `types.proto` (package `types`).
    types,
    "types.rs"
);
generated!(
    /// Volume statistics messages of `csi.proto` (package `grpc`).
    csi,
    "csi.rs"
);
