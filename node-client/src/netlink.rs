//! The real kernel: tabby's routes over rtnetlink, the route monitor, pod
//! wiring (veth pairs across namespaces), namespaces and sysctls.
//!
//! Everything here is synchronous and blocking except [`RouteMonitor::next`]
//! and [`monitor_routes`] (async, tokio; `tabby-node` drives them on the
//! reconciler's own runtime): from tokio, run the rest with
//! `tokio::task::spawn_blocking`, or on a dedicated thread.
//! Netlink sockets are
//! bound to the network namespace of the thread that opens them, so all
//! functions act on the calling thread's namespace (the node's, for any
//! ordinary thread of `tabby-node`). Nothing here calls `setns` on the
//! caller's thread: [`in_netns`] enters a namespace on a fresh thread.
//!
//! Kernel replies map to errors as EEXIST -> [`crate::Error::Exists`],
//! ESRCH/ENOENT/ENODEV -> [`crate::Error::NotFound`] (with the operation,
//! the object and the kernel's message in the text), anything else ->
//! [`crate::Error::Netlink`] carrying a [`crate::error::NetlinkError`]: the
//! operation, the errno and the kernel's extended ack message.

mod ns;
mod overlay;
mod pod;
mod routes;
mod socket;

pub(crate) use ns::panic_message;
pub use ns::{get_sysctl, in_netns, set_sysctl};
pub use overlay::NetlinkOverlay;
pub use pod::{
    attachment_owners, check_pod, delete_link_named, format_mac, held_attachment, host_veth_name,
    link_exists, owned_links, retire_owned, retired_links, wire_pod, HeldAttachment, PodSpec,
    WiredPod, RETIRED_PREFIX,
};
pub use routes::{dump_ipv4_routes, monitor_routes, NetlinkRoutes, RouteEvent, RouteMonitor};
pub(crate) use socket::grow_rcvbuf;
