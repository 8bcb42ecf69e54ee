//! The `tabby.v1` API: messages, tonic clients and servers, and the encoded
//! file descriptor set that the controller and node client serve for reflection.

/// Generated code for package `tabby.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tabby.v1");
}

pub mod limits;

/// Encoded `FileDescriptorSet` of every tabby proto file, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/tabby_descriptor.bin"));

/// gRPC metadata key that names the calling node on node-facing calls. Under
/// mutual TLS the certificate names the node and a header naming another node
/// is refused; only a controller run with `--insecure` takes the name from it.
/// Read in exactly one place in the controller.
pub const NODE_IDENTITY_HEADER: &str = "tabby-node";

/// gRPC trailer metadata key on a standby controller's UNAVAILABLE answer:
/// the leader's advertised address. Its presence also says the call was
/// refused before doing anything, so a client may send it elsewhere.
pub const LEADER_HEADER: &str = "tabby-leader";
