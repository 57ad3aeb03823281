//! Generated gRPC contracts. One module per protobuf package; each `.proto`
//! file in `proto/` is compiled by `build.rs`.

pub mod control {
    tonic::include_proto!("strait.control.v1");
}
