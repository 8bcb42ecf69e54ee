//! netlink (placeholder until implemented)
