//! tabby's multi-node labs in network namespaces, shared by the end-to-end
//! tests and the `tabby-lab` binary behind `make lab`. Never needed at run time.

pub mod echo;
pub mod etcd;
pub mod lab;
pub mod netns;
pub mod podman;
// Raw netlink sockets through libc: every block carries its SAFETY comment.
#[allow(unsafe_code)]
pub mod rtnl;
