//! Generated protobuf messages (prost, compiled by `build.rs`).

#![allow(clippy::all)] // Generated code: its style is prost's, not ours.

pub mod atomix {
    pub mod grpc {
        pub mod health {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/prost/grpc.health.v1.rs"));
            }
        }
        pub mod reflection {
            pub mod v1 {
                include!(concat!(env!("OUT_DIR"), "/prost/grpc.reflection.v1.rs"));
            }
            pub mod v1alpha {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/prost/grpc.reflection.v1alpha.rs"
                ));
            }
        }
    }

    pub mod multiraft {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prost/atomix.multiraft.v1.rs"));
        }
    }
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prost/grpc.health.v1.rs"));
        }
    }
    pub mod reflection {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prost/grpc.reflection.v1.rs"));
        }
        pub mod v1alpha {
            include!(concat!(
                env!("OUT_DIR"),
                "/prost/grpc.reflection.v1alpha.rs"
            ));
        }
    }
}

pub mod multiraft {
    pub mod admin {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prost/multiraft.admin.v1.rs"));
        }
    }
    pub mod kv {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prost/multiraft.kv.v1.rs"));
        }
    }
    pub mod peer {
        pub mod v1 {
            include!(concat!(env!("OUT_DIR"), "/prost/multiraft.peer.v1.rs"));
        }
    }
}

pub use atomix::multiraft::v1 as node;
pub use multiraft::admin::v1 as admin;
pub use multiraft::kv::v1 as kv;
pub use multiraft::peer::v1 as peer;

/// The encoded `FileDescriptorSet` of every proto above, for reflection.
pub const DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptors.bin"));
