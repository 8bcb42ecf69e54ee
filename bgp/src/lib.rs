//! tabby's BGP speaker (issue 15): the message codec over netgauze-bgp-pkt,
//! the RFC 4271 finite state machine, and the session that drives it over
//! TCP, kept apart so that each can be tested alone. The controller and
//! tabby-node both use it.

pub mod codec;
pub mod fsm;
pub mod md5;
pub mod session;
