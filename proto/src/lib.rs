//! Generated gRPC contracts. One module per protobuf package; each `.proto`
//! file in `proto/` is compiled by `build.rs`.

/// The KMS broker contract (`proto/kms.proto`).
pub mod kms {
    tonic::include_proto!("strait.kms.v1");
}

/// The control plane contract (`proto/control.proto`, and the Identity
/// service of `proto/identity.proto` in the same package).
pub mod control {
    tonic::include_proto!("strait.control.v1");
}
