//! BGP messages as tabby's own plain data, and their wire form.
//!
//! The wire format is NetGauze's (`netgauze-bgp-pkt`), which has been seen to
//! interoperate with BIRD 2; this module only converts between its rich model
//! and the few things tabby speaks (RFC 4271 with 4-octet AS numbers, IPv4 and
//! IPv6 unicast, route refresh and graceful restart), so that the FSM and the
//! session never touch a netgauze type. Nothing here does I/O.
//!
//! What this module itself reads of the raw bytes is the 19-octet header
//! (marker, length, type), to know whether a whole message has arrived and to
//! reject a bad header with the NOTIFICATION that RFC 4271 section 6.1 asks
//! for, plus the code and subcode of a NOTIFICATION that netgauze does not
//! know. Everything else is parsed and written by netgauze.

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::{
    capabilities::{
        BgpCapability, FourOctetAsCapability, GracefulRestartAddressFamily,
        GracefulRestartCapability, MultiProtocolExtensionsCapability,
    },
    community::Community,
    iana::RouteRefreshSubcode,
    nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress},
    notification::BgpNotificationMessage,
    open::{BgpOpenMessage, BgpOpenMessageParameter},
    path_attribute::{
        As4PathSegment, AsPath, AsPathSegmentType, Communities, LocalPreference, MpReach,
        MpUnreach, NextHop, Origin as NgOrigin, PathAttribute, PathAttributeValue,
    },
    route_refresh::BgpRouteRefreshMessage,
    update::BgpUpdateMessage,
    wire::deserializer::{
        notification::BgpNotificationMessageParsingError,
        route_refresh::BgpRouteRefreshMessageParsingError, BgpMessageParsingError,
        BgpParsingContext,
    },
    BgpMessage,
};
use netgauze_iana::address_family::AddressType;
use netgauze_parse_utils::{
    reader::SliceReader,
    traits::{ParseFrom, ParseFromWithOneInput},
    WritablePdu,
};
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
};

/// Octets in every BGP message's header (marker, length, type): the smallest
/// message, and where a reader must look for the length.
pub const HEADER_LEN: usize = 19;

/// The largest BGP message (RFC 4271 section 4.1): tabby does not advertise
/// extended messages (RFC 8654), so neither side may send more.
pub const MAX_MESSAGE_LEN: usize = 4096;

/// The 2-octet AS that stands in the OPEN's "My AS" field when the real
/// (4-octet) AS does not fit there (RFC 6793).
pub const AS_TRANS: u32 = 23456;

/// The largest graceful-restart Restart Time: the field has 12 bits (RFC 4724).
pub const MAX_RESTART_TIME: u16 = 0x0fff;

/// NOTIFICATION error codes (RFC 4271 section 4.5), named so that callers
/// building or matching notifications need no magic numbers.
pub mod error_code {
    /// Message Header Error: bad marker, length or type.
    pub const MESSAGE_HEADER: u8 = 1;
    /// OPEN Message Error.
    pub const OPEN_MESSAGE: u8 = 2;
    /// UPDATE Message Error.
    pub const UPDATE_MESSAGE: u8 = 3;
    /// Hold Timer Expired.
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    /// Finite State Machine Error.
    pub const FSM: u8 = 5;
    /// Cease (RFC 4486 gives the subcodes).
    pub const CEASE: u8 = 6;
    /// ROUTE-REFRESH Message Error (RFC 7313).
    pub const ROUTE_REFRESH: u8 = 7;
}

/// One whole BGP message, as the FSM and the session see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// OPEN: the first message of a session.
    Open(Open),
    /// UPDATE: routes announced and withdrawn, or End-of-RIB.
    Update(Update),
    /// KEEPALIVE: keeps the hold timer from expiring; confirms an OPEN.
    Keepalive,
    /// NOTIFICATION: an error; the session closes after it.
    Notification(Notification),
    /// ROUTE-REFRESH (RFC 2918): the peer asks for our routes again.
    RouteRefresh(RouteRefresh),
}

/// An OPEN message: who a speaker is and what it can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The speaker's AS, 4-octet. On the wire the 2-octet "My AS" field holds
    /// [`AS_TRANS`] when it is above 65535, and the real value goes in the
    /// four-octet-AS capability, which must then be present. Decoding takes
    /// the capability's value when there is one.
    pub asn: u32,
    /// Proposed hold time in seconds: 0 (no keepalives) or at least 3.
    pub hold_time: u16,
    /// The BGP Identifier: a non-zero unicast IPv4 address.
    pub router_id: Ipv4Addr,
    /// The capabilities tabby understands (others are dropped on decode).
    pub capabilities: Capabilities,
}

/// The capabilities (RFC 5492) tabby advertises or understands.
///
/// An OPEN with no multiprotocol capability at all means IPv4 unicast only
/// (RFC 4760 section 8); decoding reports what was sent literally, so it is
/// the session's job to apply that rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Four-octet AS numbers (RFC 6793), with the speaker's AS. When given it
    /// must equal [`Open::asn`].
    pub four_octet_as: Option<u32>,
    /// Multiprotocol IPv4 unicast (AFI 1, SAFI 1).
    pub ipv4_unicast: bool,
    /// Multiprotocol IPv6 unicast (AFI 2, SAFI 1).
    pub ipv6_unicast: bool,
    /// Route refresh (RFC 2918, capability code 2).
    pub route_refresh: bool,
    /// Graceful restart (RFC 4724).
    pub graceful_restart: Option<GracefulRestart>,
}

/// The graceful-restart capability (RFC 4724 section 3).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GracefulRestart {
    /// Seconds the peer should keep our routes after the session drops
    /// (12 bits: at most [`MAX_RESTART_TIME`]).
    pub restart_time: u16,
    /// The Restart State (R) bit: this speaker has just restarted.
    pub restarting: bool,
    /// The families whose routes the helper should keep, each with the
    /// Forwarding State (F) bit: forwarding was preserved across the restart.
    /// Families other than IPv4/IPv6 unicast are dropped on decode.
    pub families: Vec<(Afi, bool)>,
}

/// The address families tabby speaks, always with SAFI 1 (unicast).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Afi {
    /// IPv4 unicast (AFI 1, SAFI 1).
    Ipv4,
    /// IPv6 unicast (AFI 2, SAFI 1).
    Ipv6,
}

/// An UPDATE: announcements, withdrawals, or an End-of-RIB marker.
///
/// Encoding needs every route in `announce` to share its next hop and path
/// attributes, because one UPDATE carries one set of them (the caller groups
/// routes; [`encode_split`] only splits for size). IPv4 routes travel in the
/// classic NLRI and withdrawn-routes fields, IPv6 ones in MP_REACH_NLRI and
/// MP_UNREACH_NLRI (RFC 4760).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Update {
    /// Routes announced (or replaced).
    pub announce: Vec<Route>,
    /// Prefixes withdrawn, IPv4 and IPv6 alike.
    pub withdraw: Vec<IpNet>,
    /// End-of-RIB (RFC 4724) for this family: the initial table is complete.
    /// Such an UPDATE carries nothing else.
    pub end_of_rib: Option<Afi>,
}

/// One route: a prefix and the path attributes tabby uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    /// The destination; host bits are cleared on the wire.
    pub prefix: IpNet,
    /// NEXT_HOP (IPv4) or the MP_REACH_NLRI global next hop (IPv6); its
    /// family must be the prefix's.
    pub next_hop: IpAddr,
    /// ORIGIN; tabby's own routes are IGP.
    pub origin: Origin,
    /// AS_PATH as 4-octet AS numbers, nearest AS first. Encoded as one
    /// AS_SEQUENCE; on decode AS_SET members are flattened in, in order.
    pub as_path: Vec<u32>,
    /// COMMUNITIES (RFC 1997), each as its 32-bit value (`asn << 16 | n`).
    pub communities: Vec<u32>,
    /// LOCAL_PREF, for iBGP.
    pub local_pref: Option<u32>,
}

/// The ORIGIN path attribute (RFC 4271 section 5.1.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Learned from an interior protocol: what tabby advertises.
    #[default]
    Igp,
    /// Learned via EGP.
    Egp,
    /// Learned some other way.
    Incomplete,
}

/// A NOTIFICATION: an error code, subcode and data (RFC 4271 section 4.5).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    /// Error code (see [`error_code`]).
    pub code: u8,
    /// Error subcode; its meaning depends on `code`.
    pub subcode: u8,
    /// Diagnostic data.
    pub data: Vec<u8>,
}

/// A community written "asn:value" (each part 0..65535) as its 32 bits.
pub fn parse_community(s: &str) -> Option<u32> {
    let (a, v) = s.split_once(':')?;
    let a: u16 = a.parse().ok()?;
    let v: u16 = v.parse().ok()?;
    Some((u32::from(a) << 16) | u32::from(v))
}

/// A community as "asn:value".
pub fn community_string(c: u32) -> String {
    format!("{}:{}", c >> 16, c & 0xffff)
}

/// A ROUTE-REFRESH request (RFC 2918) for one family, unicast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    /// The family whose routes the peer wants again.
    pub afi: Afi,
}

/// Why a message could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The received bytes break the protocol. RFC 4271 section 6 asks to send
    /// this NOTIFICATION and close the connection (unless the malformed
    /// message was itself a NOTIFICATION: then just close).
    #[error("malformed BGP message (NOTIFICATION {code}/{subcode}): {reason}")]
    Malformed {
        /// Error code to send.
        code: u8,
        /// Error subcode to send.
        subcode: u8,
        /// Data to send with them.
        data: Vec<u8>,
        /// What was wrong, for the log.
        reason: String,
    },
    /// The message would exceed [`MAX_MESSAGE_LEN`]: split it
    /// ([`encode_split`] does that for an UPDATE).
    #[error("message of {len} octets exceeds the BGP maximum of {MAX_MESSAGE_LEN}")]
    TooLong {
        /// The length it would have had.
        len: usize,
    },
    /// The message cannot be expressed on the wire (a caller's mistake, such
    /// as routes with different attributes in one UPDATE).
    #[error("cannot encode: {0}")]
    Unencodable(String),
}

impl CodecError {
    /// The NOTIFICATION to send because of this error. For a decoding error
    /// it is the one RFC 4271 asks for. An encoding error is a local fault
    /// with no code of its own: Cease / Out of Resources (6/8) stands for it
    /// (it is always encodable, so sending it cannot fail the same way).
    pub fn notification(&self) -> Notification {
        match self {
            CodecError::Malformed {
                code,
                subcode,
                data,
                ..
            } => Notification {
                code: *code,
                subcode: *subcode,
                data: data.clone(),
            },
            CodecError::TooLong { .. } | CodecError::Unencodable(_) => Notification {
                code: error_code::CEASE,
                subcode: 8,
                data: Vec::new(),
            },
        }
    }

    fn malformed(code: u8, subcode: u8, data: Vec<u8>, reason: impl Into<String>) -> Self {
        CodecError::Malformed {
            code,
            subcode,
            data,
            reason: reason.into(),
        }
    }
}

fn unencodable(why: impl Into<String>) -> CodecError {
    CodecError::Unencodable(why.into())
}

// ---------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------

/// Encodes one whole BGP message, header included, ready for the socket.
///
/// Fails when the message cannot be expressed (see [`CodecError`]); a
/// message that encodes decodes back to itself.
pub fn encode(m: &Message) -> Result<Vec<u8>, CodecError> {
    let ng = match m {
        Message::Open(o) => BgpMessage::Open(open_to_ng(o)?),
        Message::Update(u) => BgpMessage::Update(update_to_ng(u)?),
        Message::Keepalive => BgpMessage::KeepAlive,
        Message::Notification(n) => BgpMessage::Notification(notification_to_ng(n)?),
        Message::RouteRefresh(r) => BgpMessage::RouteRefresh(BgpRouteRefreshMessage::new(
            address_type(r.afi),
            RouteRefreshSubcode::NormalRequest,
        )),
    };
    write(&ng)
}

/// Encodes an UPDATE as as many messages as it takes for each to fit in
/// [`MAX_MESSAGE_LEN`] octets: withdrawals first (IPv4, then IPv6), then the
/// announcements, all with the same attributes. One message when it fits.
///
/// This is how a whole table (10,000 prefixes) goes out in few messages.
pub fn encode_split(u: &Update) -> Result<Vec<Vec<u8>>, CodecError> {
    match write(&BgpMessage::Update(update_to_ng(u)?)) {
        Ok(b) => return Ok(vec![b]),
        Err(CodecError::TooLong { .. }) if u.end_of_rib.is_none() => {}
        Err(e) => return Err(e),
    }
    let mut out = Vec::new();
    let (w4, w6): (Vec<IpNet>, Vec<IpNet>) =
        u.withdraw.iter().partition(|p| matches!(p, IpNet::V4(_)));
    for w in [w4, w6] {
        pack(
            &w,
            prefix_wire_len,
            |chunk| Update {
                withdraw: chunk.to_vec(),
                ..Update::default()
            },
            &mut out,
        )?;
    }
    pack(
        &u.announce,
        |r| prefix_wire_len(&r.prefix),
        |chunk| Update {
            announce: chunk.to_vec(),
            ..Update::default()
        },
        &mut out,
    )?;
    Ok(out)
}

/// Greedily fills messages with `items`. Each item adds exactly `size`
/// octets to a message (prefixes are additive: the MP attributes always use
/// the 2-octet length), so one trial encoding gives the fixed part.
fn pack<T: Clone>(
    items: &[T],
    size: impl Fn(&T) -> usize,
    make: impl Fn(&[T]) -> Update,
    out: &mut Vec<Vec<u8>>,
) -> Result<(), CodecError> {
    let Some(first) = items.first() else {
        return Ok(());
    };
    let one = write(&BgpMessage::Update(update_to_ng(&make(&items[..1]))?))?;
    let base = one.len().saturating_sub(size(first));
    let mut start = 0;
    let mut len = base;
    for (i, item) in items.iter().enumerate() {
        let s = size(item);
        if i > start && len + s > MAX_MESSAGE_LEN {
            out.push(write(&BgpMessage::Update(update_to_ng(&make(
                &items[start..i],
            ))?))?);
            start = i;
            len = base;
        }
        len += s;
    }
    out.push(write(&BgpMessage::Update(update_to_ng(&make(
        &items[start..],
    ))?))?);
    Ok(())
}

/// Octets a prefix takes in NLRI: its length, then its significant octets.
fn prefix_wire_len(p: &IpNet) -> usize {
    1 + usize::from(p.prefix_len()).div_ceil(8)
}

fn write(m: &BgpMessage) -> Result<Vec<u8>, CodecError> {
    // netgauze writes the 2-octet length unchecked for UPDATE/NOTIFICATION,
    // so the limit is enforced here before anything is written.
    let len = m.len();
    if len > MAX_MESSAGE_LEN {
        return Err(CodecError::TooLong { len });
    }
    let mut buf = Vec::with_capacity(len);
    m.write(&mut buf)
        .map_err(|e| unencodable(format!("netgauze: {e}")))?;
    Ok(buf)
}

fn address_type(afi: Afi) -> AddressType {
    match afi {
        Afi::Ipv4 => AddressType::Ipv4Unicast,
        Afi::Ipv6 => AddressType::Ipv6Unicast,
    }
}

fn afi_of(t: AddressType) -> Option<Afi> {
    match t {
        AddressType::Ipv4Unicast => Some(Afi::Ipv4),
        AddressType::Ipv6Unicast => Some(Afi::Ipv6),
        _ => None,
    }
}

/// Is this usable as a BGP Identifier? netgauze's decoder refuses the others
/// (2/3 Bad BGP Identifier), so the encoder does too.
fn valid_router_id(id: Ipv4Addr) -> bool {
    !(id.is_unspecified() || id.is_broadcast() || id.is_multicast())
}

fn open_to_ng(o: &Open) -> Result<BgpOpenMessage, CodecError> {
    let c = &o.capabilities;
    if let Some(asn4) = c.four_octet_as {
        if asn4 != o.asn {
            return Err(unencodable(format!(
                "OPEN says AS {} but its four-octet-AS capability says {asn4}",
                o.asn
            )));
        }
    }
    let my_as = match u16::try_from(o.asn) {
        Ok(a) => a,
        Err(_) if c.four_octet_as.is_some() => AS_TRANS as u16,
        Err(_) => {
            return Err(unencodable(format!(
                "AS {} needs the four-octet-AS capability",
                o.asn
            )))
        }
    };
    if o.hold_time == 1 || o.hold_time == 2 {
        return Err(unencodable("hold time must be 0 or at least 3 seconds"));
    }
    if !valid_router_id(o.router_id) {
        return Err(unencodable(format!(
            "{} is not a valid BGP Identifier",
            o.router_id
        )));
    }
    let mut caps = Vec::new();
    if c.ipv4_unicast {
        caps.push(BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(AddressType::Ipv4Unicast),
        ));
    }
    if c.ipv6_unicast {
        caps.push(BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(AddressType::Ipv6Unicast),
        ));
    }
    if c.route_refresh {
        caps.push(BgpCapability::RouteRefresh);
    }
    if let Some(gr) = &c.graceful_restart {
        if gr.restart_time > MAX_RESTART_TIME {
            return Err(unencodable(format!(
                "graceful restart time {} exceeds {MAX_RESTART_TIME}",
                gr.restart_time
            )));
        }
        let families: Vec<GracefulRestartAddressFamily> = gr
            .families
            .iter()
            .map(|(afi, fwd)| GracefulRestartAddressFamily::new(*fwd, address_type(*afi)))
            .collect();
        caps.push(BgpCapability::GracefulRestartCapability(
            GracefulRestartCapability::new(gr.restarting, false, gr.restart_time, families),
        ));
    }
    if let Some(asn4) = c.four_octet_as {
        caps.push(BgpCapability::FourOctetAs(FourOctetAsCapability::new(asn4)));
    }
    // All capabilities in one Optional Parameter (as BIRD does), whose
    // length is one octet.
    let params = if caps.is_empty() {
        Vec::new()
    } else {
        let p = BgpOpenMessageParameter::new_capabilities(caps);
        if p.len() - 2 > usize::from(u8::MAX) {
            return Err(unencodable("too many capabilities for one OPEN parameter"));
        }
        vec![p]
    };
    Ok(BgpOpenMessage::new(my_as, o.hold_time, o.router_id, params))
}

/// Builds a path attribute with the flags RFC 4271 fixes for its type, using
/// the 2-octet length when the value needs it (netgauze would otherwise write
/// a 2-octet length without setting the flag).
fn attribute(
    optional: bool,
    transitive: bool,
    always_extended: bool,
    value: PathAttributeValue,
) -> Result<PathAttribute, CodecError> {
    let short = PathAttribute::from(optional, transitive, false, always_extended, value)
        .map_err(|(_, e)| unencodable(format!("path attribute flags: {e}")))?;
    // flags + type + 1-octet length + value
    if always_extended || short.len() <= 3 + usize::from(u8::MAX) {
        return Ok(short);
    }
    PathAttribute::from(optional, transitive, false, true, short.value().clone())
        .map_err(|(_, e)| unencodable(format!("path attribute flags: {e}")))
}

fn ipv4_nlri(p: Ipv4Net) -> Result<Ipv4UnicastAddress, CodecError> {
    Ipv4Unicast::from_net(p.trunc())
        .map(Ipv4UnicastAddress::new_no_path_id)
        .map_err(|e| unencodable(format!("{} is not an IPv4 unicast prefix", e.0)))
}

fn ipv6_nlri(p: Ipv6Net) -> Result<Ipv6UnicastAddress, CodecError> {
    Ipv6Unicast::from_net(p.trunc())
        .map(|n| Ipv6UnicastAddress::new(None, n))
        .map_err(|e| unencodable(format!("{} is not an IPv6 unicast prefix", e.0)))
}

fn update_to_ng(u: &Update) -> Result<BgpUpdateMessage, CodecError> {
    if let Some(afi) = u.end_of_rib {
        if !u.announce.is_empty() || !u.withdraw.is_empty() {
            return Err(unencodable("an End-of-RIB UPDATE carries no routes"));
        }
        // RFC 4724 section 2: an empty UPDATE for IPv4 unicast, an UPDATE
        // with only an empty MP_UNREACH_NLRI for the other families.
        let attrs = match afi {
            Afi::Ipv4 => Vec::new(),
            Afi::Ipv6 => vec![attribute(
                true,
                false,
                true,
                PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast { nlri: Box::new([]) }),
            )?],
        };
        return Ok(BgpUpdateMessage::new(Vec::new(), attrs, Vec::new()));
    }
    if u.announce.is_empty() && u.withdraw.is_empty() {
        return Err(unencodable(
            "an empty UPDATE would be the IPv4 End-of-RIB: set end_of_rib instead",
        ));
    }

    let mut withdraw4 = Vec::new();
    let mut withdraw6 = Vec::new();
    for p in &u.withdraw {
        match p {
            IpNet::V4(p) => withdraw4.push(ipv4_nlri(*p)?),
            IpNet::V6(p) => withdraw6.push(ipv6_nlri(*p)?),
        }
    }

    // Ascending type code, as RFC 4271 section 5 recommends.
    let mut attrs = Vec::new();
    let mut nlri4 = Vec::new();
    let mut mp_reach = None;
    if let Some(first) = u.announce.first() {
        if let Some(other) = u.announce.iter().find(|r| !same_attributes(first, r)) {
            return Err(unencodable(format!(
                "{} and {} differ in next hop or attributes: one UPDATE carries one set",
                first.prefix, other.prefix
            )));
        }
        attrs.push(attribute(
            false,
            true,
            false,
            PathAttributeValue::Origin(match first.origin {
                Origin::Igp => NgOrigin::IGP,
                Origin::Egp => NgOrigin::EGP,
                Origin::Incomplete => NgOrigin::Incomplete,
            }),
        )?);
        // One AS_SEQUENCE per 255 ASes (the segment length is one octet).
        let segments: Vec<As4PathSegment> = first
            .as_path
            .chunks(usize::from(u8::MAX))
            .map(|c| As4PathSegment::new(AsPathSegmentType::AsSequence, c.to_vec()))
            .collect();
        attrs.push(attribute(
            false,
            true,
            false,
            PathAttributeValue::AsPath(AsPath::As4PathSegments(segments.into())),
        )?);
        match first.next_hop {
            IpAddr::V4(nh) => {
                for r in &u.announce {
                    match r.prefix {
                        IpNet::V4(p) => nlri4.push(ipv4_nlri(p)?),
                        IpNet::V6(p) => {
                            return Err(unencodable(format!(
                                "IPv6 route {p} with IPv4 next hop {nh}"
                            )))
                        }
                    }
                }
                attrs.push(attribute(
                    false,
                    true,
                    false,
                    PathAttributeValue::NextHop(NextHop::new(nh)),
                )?);
            }
            IpAddr::V6(nh) => {
                let mut nlri6 = Vec::new();
                for r in &u.announce {
                    match r.prefix {
                        IpNet::V6(p) => nlri6.push(ipv6_nlri(p)?),
                        IpNet::V4(p) => {
                            return Err(unencodable(format!(
                                "IPv4 route {p} with IPv6 next hop {nh} (RFC 8950 is not supported)"
                            )))
                        }
                    }
                }
                mp_reach = Some(attribute(
                    true,
                    false,
                    true,
                    PathAttributeValue::MpReach(MpReach::Ipv6Unicast {
                        next_hop_global: nh,
                        next_hop_local: None,
                        nlri: nlri6.into(),
                    }),
                )?);
            }
        }
        if let Some(lp) = first.local_pref {
            attrs.push(attribute(
                false,
                true,
                false,
                PathAttributeValue::LocalPreference(LocalPreference::new(lp)),
            )?);
        }
        if !first.communities.is_empty() {
            let cs: Vec<Community> = first
                .communities
                .iter()
                .map(|c| Community::new(*c))
                .collect();
            attrs.push(attribute(
                true,
                true,
                false,
                PathAttributeValue::Communities(Communities::new(cs)),
            )?);
        }
    }
    attrs.extend(mp_reach);
    if !withdraw6.is_empty() {
        attrs.push(attribute(
            true,
            false,
            true,
            PathAttributeValue::MpUnreach(MpUnreach::Ipv6Unicast {
                nlri: withdraw6.into(),
            }),
        )?);
    }
    Ok(BgpUpdateMessage::new(withdraw4, attrs, nlri4))
}

/// Can these two routes share one UPDATE?
fn same_attributes(a: &Route, b: &Route) -> bool {
    a.next_hop == b.next_hop
        && a.origin == b.origin
        && a.as_path == b.as_path
        && a.communities == b.communities
        && a.local_pref == b.local_pref
}

/// netgauze knows NOTIFICATIONs by code and subcode; building one from its
/// body lets netgauze's own tables do the mapping.
fn notification_to_ng(n: &Notification) -> Result<BgpNotificationMessage, CodecError> {
    let mut body = Vec::with_capacity(2 + n.data.len());
    body.push(n.code);
    body.push(n.subcode);
    body.extend_from_slice(&n.data);
    <BgpNotificationMessage as ParseFrom<'_>>::parse(&mut SliceReader::new(&body)).map_err(|e| {
        unencodable(format!(
            "NOTIFICATION {}/{} is unknown to netgauze: {e}",
            n.code, n.subcode
        ))
    })
}

fn notification_from_ng(n: &BgpNotificationMessage) -> Notification {
    let mut body = Vec::with_capacity(n.len());
    // Writing into a Vec cannot fail, and every variant writes its code and
    // subcode; the fallback only keeps this function total.
    if n.write(&mut body).is_err() || body.len() < 2 {
        return Notification {
            code: error_code::FSM,
            subcode: 0,
            data: Vec::new(),
        };
    }
    Notification {
        code: body[0],
        subcode: body[1],
        data: body[2..].to_vec(),
    }
}

// ---------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------

const TYPE_OPEN: u8 = 1;
const TYPE_UPDATE: u8 = 2;
const TYPE_NOTIFICATION: u8 = 3;
const TYPE_KEEPALIVE: u8 = 4;
const TYPE_ROUTE_REFRESH: u8 = 5;

/// Decodes the first message in `buf`, which holds bytes as they came from
/// the connection.
///
/// `Ok(None)`: `buf` does not hold a whole message yet (read more).
/// `Ok(Some((message, consumed)))`: drop `consumed` bytes and call again.
/// `Err`: the peer broke the protocol; [`CodecError::notification`] says what
/// to send before closing. A bad marker or length is reported as soon as the
/// header shows it, without waiting for the rest.
///
/// AS_PATHs are read as 4-octet (tabby always advertises the capability and
/// needs it from the peer). Things tabby does not use are skipped, not
/// errors: other families, capabilities and attributes; a ROUTE-REFRESH for
/// another family or with an unknown subtype (RFC 2918, RFC 7313) becomes an
/// empty [`Update`], which changes nothing.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, CodecError> {
    let marker = &buf[..buf.len().min(16)];
    if marker.iter().any(|b| *b != 0xff) {
        return Err(CodecError::malformed(
            error_code::MESSAGE_HEADER,
            1,
            Vec::new(),
            "connection not synchronized: the marker is not all ones",
        ));
    }
    let (Some(&hi), Some(&lo)) = (buf.get(16), buf.get(17)) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    let bad_length = |why: &str| {
        CodecError::malformed(
            error_code::MESSAGE_HEADER,
            2,
            vec![hi, lo],
            format!("bad message length {len}: {why}"),
        )
    };
    if !(HEADER_LEN..=MAX_MESSAGE_LEN).contains(&len) {
        return Err(bad_length("outside 19..=4096"));
    }
    let Some(&kind) = buf.get(18) else {
        return Ok(None);
    };
    // RFC 4271 section 6.1: each type's least length, and KEEPALIVE's exact one.
    let fits = match kind {
        TYPE_OPEN => len >= 29,
        TYPE_UPDATE => len >= 23,
        TYPE_NOTIFICATION => len >= 21,
        TYPE_KEEPALIVE => len == HEADER_LEN,
        TYPE_ROUTE_REFRESH => len == 23,
        _ => {
            return Err(CodecError::malformed(
                error_code::MESSAGE_HEADER,
                3,
                vec![kind],
                format!("bad message type {kind}"),
            ))
        }
    };
    if !fits {
        return Err(bad_length("wrong for the message type"));
    }
    let Some(wire) = buf.get(..len) else {
        return Ok(None);
    };
    let mut ctx = parsing_context();
    let parsed = <BgpMessage as ParseFromWithOneInput<'_, &mut BgpParsingContext>>::parse(
        &mut SliceReader::new(wire),
        &mut ctx,
    );
    let message = match parsed {
        Ok(m) => message_from_ng(m)?,
        Err(e) => fallback(wire, &e).ok_or_else(|| {
            let n = notification_from_ng(&BgpNotificationMessage::from(e.clone()));
            CodecError::malformed(n.code, n.subcode, n.data, e.to_string())
        })?,
    };
    Ok(Some((message, len)))
}

/// How netgauze should read what peers send: 4-octet AS_PATHs; skip
/// capabilities it cannot parse (RFC 5492) and non-unicast prefixes
/// (RFC 4271 section 6.3 says to ignore them); but a malformed attribute is
/// an error, so that the peer hears about it.
///
/// Known netgauze limit: a multiprotocol capability with an AFI that IANA
/// never assigned stops its parser mid-capability, so the capabilities after
/// it in the same Optional Parameter are misread (never a panic). Real
/// speakers only send assigned AFIs.
fn parsing_context() -> BgpParsingContext {
    BgpParsingContext::new(
        true,
        HashMap::new(),
        HashMap::new(),
        false,
        false,
        false,
        true,
    )
}

/// Messages netgauze refuses that are not errors for tabby: a ROUTE-REFRESH
/// for a family or subtype it does not know (to be ignored), and a
/// NOTIFICATION with a code or subcode it does not know (to be reported,
/// never answered). `wire` is one whole message whose header was checked.
fn fallback(wire: &[u8], e: &BgpMessageParsingError) -> Option<Message> {
    match e {
        BgpMessageParsingError::BgpRouteRefreshMessageParsingError(
            BgpRouteRefreshMessageParsingError::UndefinedAddressFamily { .. }
            | BgpRouteRefreshMessageParsingError::UndefinedSubsequentAddressFamily { .. }
            | BgpRouteRefreshMessageParsingError::AddressTypeError { .. }
            | BgpRouteRefreshMessageParsingError::UndefinedOperation { .. },
        ) => Some(Message::Update(Update::default())),
        BgpMessageParsingError::BgpNotificationMessageParsingError(
            BgpNotificationMessageParsingError::Parse(_),
        ) => None,
        BgpMessageParsingError::BgpNotificationMessageParsingError(_) => {
            let body = wire.get(HEADER_LEN..)?;
            Some(Message::Notification(Notification {
                code: *body.first()?,
                subcode: *body.get(1)?,
                data: body.get(2..)?.to_vec(),
            }))
        }
        _ => None,
    }
}

fn message_from_ng(m: BgpMessage) -> Result<Message, CodecError> {
    Ok(match m {
        BgpMessage::Open(o) => Message::Open(open_from_ng(&o)),
        BgpMessage::Update(u) => Message::Update(update_from_ng(&u)?),
        BgpMessage::KeepAlive => Message::Keepalive,
        BgpMessage::Notification(n) => Message::Notification(notification_from_ng(&n)),
        BgpMessage::RouteRefresh(r) => {
            match (afi_of(r.address_type()), r.operation_type()) {
                (Some(afi), RouteRefreshSubcode::NormalRequest) => {
                    Message::RouteRefresh(RouteRefresh { afi })
                }
                // Enhanced route refresh (RFC 7313) was not advertised, and
                // other families were not either: ignore (RFC 2918).
                _ => Message::Update(Update::default()),
            }
        }
    })
}

fn open_from_ng(o: &BgpOpenMessage) -> Open {
    let mut c = Capabilities::default();
    for cap in o.capabilities() {
        match cap {
            BgpCapability::MultiProtocolExtensions(mp) => match afi_of(mp.address_type()) {
                Some(Afi::Ipv4) => c.ipv4_unicast = true,
                Some(Afi::Ipv6) => c.ipv6_unicast = true,
                None => {}
            },
            BgpCapability::RouteRefresh => c.route_refresh = true,
            BgpCapability::GracefulRestartCapability(gr) => {
                c.graceful_restart = Some(GracefulRestart {
                    restart_time: gr.time(),
                    restarting: gr.restart(),
                    families: gr
                        .address_families()
                        .iter()
                        .filter_map(|f| Some((afi_of(f.address_type())?, f.forwarding_state())))
                        .collect(),
                });
            }
            BgpCapability::FourOctetAs(a) => c.four_octet_as = Some(a.asn4()),
            _ => {}
        }
    }
    Open {
        asn: c.four_octet_as.unwrap_or(u32::from(o.my_as())),
        hold_time: o.hold_time(),
        router_id: o.bgp_id(),
        capabilities: c,
    }
}

/// The attributes of one UPDATE that tabby reads.
#[derive(Default)]
struct Attrs<'a> {
    origin: Option<Origin>,
    as_path: Option<Vec<u32>>,
    next_hop: Option<Ipv4Addr>,
    local_pref: Option<u32>,
    communities: Vec<u32>,
    mp_reach: Option<&'a MpReach>,
    mp_unreach: Option<&'a MpUnreach>,
}

fn update_error(subcode: u8, data: Vec<u8>, reason: impl Into<String>) -> CodecError {
    CodecError::malformed(error_code::UPDATE_MESSAGE, subcode, data, reason)
}

fn update_from_ng(u: &BgpUpdateMessage) -> Result<Update, CodecError> {
    if let Some(t) = u.end_of_rib() {
        return Ok(Update {
            end_of_rib: afi_of(t),
            ..Update::default()
        });
    }
    let mut seen = [false; 256];
    let mut a = Attrs::default();
    for attr in u.path_attributes() {
        let code = match attr.path_attribute_type() {
            Ok(t) => u8::from(t),
            Err(code) => code,
        };
        let seen = &mut seen[usize::from(code)];
        if *seen {
            // RFC 4271 section 6.3: each attribute at most once.
            return Err(update_error(
                1,
                Vec::new(),
                format!("path attribute {code} appears twice"),
            ));
        }
        *seen = true;
        match attr.value() {
            PathAttributeValue::Origin(o) => {
                a.origin = Some(match o {
                    NgOrigin::IGP => Origin::Igp,
                    NgOrigin::EGP => Origin::Egp,
                    NgOrigin::Incomplete => Origin::Incomplete,
                });
            }
            PathAttributeValue::AsPath(p) => a.as_path = Some(Vec::<u32>::from(p.clone())),
            PathAttributeValue::NextHop(nh) => a.next_hop = Some(nh.next_hop()),
            PathAttributeValue::LocalPreference(lp) => a.local_pref = Some(lp.metric()),
            PathAttributeValue::Communities(cs) => {
                a.communities = cs.communities().iter().map(Community::value).collect();
            }
            PathAttributeValue::MpReach(r) => a.mp_reach = Some(r),
            PathAttributeValue::MpUnreach(r) => a.mp_unreach = Some(r),
            _ => {}
        }
    }

    let mut out = Update::default();
    out.withdraw.extend(
        u.withdraw_routes()
            .iter()
            .map(|w| IpNet::V4(w.network().address().trunc())),
    );
    match a.mp_unreach {
        Some(MpUnreach::Ipv4Unicast { nlri }) => out.withdraw.extend(
            nlri.iter()
                .map(|w| IpNet::V4(w.network().address().trunc())),
        ),
        Some(MpUnreach::Ipv6Unicast { nlri }) => out.withdraw.extend(
            nlri.iter()
                .map(|w| IpNet::V6(w.network().address().trunc())),
        ),
        _ => {}
    }

    // (prefix, next hop) pairs announced, in wire order.
    let mut reach: Vec<(IpNet, IpAddr)> = Vec::new();
    if !u.nlri().is_empty() {
        let Some(nh) = a.next_hop else {
            return Err(missing(3));
        };
        reach.extend(
            u.nlri()
                .iter()
                .map(|n| (IpNet::V4(n.network().address().trunc()), IpAddr::V4(nh))),
        );
    }
    match a.mp_reach {
        Some(MpReach::Ipv4Unicast {
            next_hop: nh @ IpAddr::V4(_),
            nlri,
            ..
        }) => reach.extend(
            nlri.iter()
                .map(|n| (IpNet::V4(n.network().address().trunc()), *nh)),
        ),
        Some(MpReach::Ipv6Unicast {
            next_hop_global,
            nlri,
            ..
        }) => reach.extend(nlri.iter().map(|n| {
            (
                IpNet::V6(n.network().address().trunc()),
                IpAddr::V6(*next_hop_global),
            )
        })),
        // IPv4 over an IPv6 next hop (RFC 8950) and other families: skipped.
        _ => {}
    }
    if !reach.is_empty() {
        let origin = a.origin.ok_or_else(|| missing(1))?;
        let as_path = a.as_path.ok_or_else(|| missing(2))?;
        out.announce = reach
            .into_iter()
            .map(|(prefix, next_hop)| Route {
                prefix,
                next_hop,
                origin,
                as_path: as_path.clone(),
                communities: a.communities.clone(),
                local_pref: a.local_pref,
            })
            .collect();
    }
    Ok(out)
}

/// RFC 4271 section 6.3: Missing Well-known Attribute, with its type code.
fn missing(code: u8) -> CodecError {
    update_error(
        3,
        vec![code],
        format!("missing well-known path attribute {code}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v4(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn route(prefix: &str, nh: &str) -> Route {
        Route {
            prefix: prefix.parse().unwrap(),
            next_hop: nh.parse().unwrap(),
            origin: Origin::Igp,
            as_path: vec![64512],
            communities: vec![(64512 << 16) | 100],
            local_pref: Some(100),
        }
    }

    fn open() -> Open {
        Open {
            asn: 64512,
            hold_time: 90,
            router_id: Ipv4Addr::new(10, 0, 0, 1),
            capabilities: Capabilities {
                four_octet_as: Some(64512),
                ipv4_unicast: true,
                ipv6_unicast: true,
                route_refresh: true,
                graceful_restart: Some(GracefulRestart {
                    restart_time: 120,
                    restarting: true,
                    families: vec![(Afi::Ipv4, true), (Afi::Ipv6, false)],
                }),
            },
        }
    }

    fn round_trip(m: &Message) -> Vec<u8> {
        let bytes = encode(m).unwrap();
        assert_eq!(
            usize::from(u16::from_be_bytes([bytes[16], bytes[17]])),
            bytes.len()
        );
        let (back, used) = decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(&back, m);
        bytes
    }

    fn notification_of(r: Result<Option<(Message, usize)>, CodecError>) -> (u8, u8, Vec<u8>) {
        let n = r.unwrap_err().notification();
        (n.code, n.subcode, n.data)
    }

    #[test]
    fn every_message_kind_round_trips() {
        round_trip(&Message::Keepalive);
        round_trip(&Message::Open(open()));
        round_trip(&Message::Notification(Notification {
            code: 6,
            subcode: 2,
            data: b"bye".to_vec(),
        }));
        round_trip(&Message::Notification(Notification {
            code: 4,
            subcode: 0,
            data: vec![],
        }));
        round_trip(&Message::RouteRefresh(RouteRefresh { afi: Afi::Ipv4 }));
        round_trip(&Message::RouteRefresh(RouteRefresh { afi: Afi::Ipv6 }));
        round_trip(&Message::Update(Update {
            announce: vec![
                route("10.244.1.0/26", "192.168.1.11"),
                route("10.244.2.0/32", "192.168.1.11"),
            ],
            withdraw: vec![v4("10.244.9.0/26"), v4("fd00:10:244:9::/122")],
            end_of_rib: None,
        }));
        round_trip(&Message::Update(Update {
            announce: vec![route("fd00:10:244:1::/122", "fd00::11")],
            withdraw: vec![v4("10.0.0.0/8")],
            end_of_rib: None,
        }));
        round_trip(&Message::Update(Update {
            withdraw: vec![v4("fd00:10:244:1::/122")],
            ..Update::default()
        }));
        for afi in [Afi::Ipv4, Afi::Ipv6] {
            round_trip(&Message::Update(Update {
                end_of_rib: Some(afi),
                ..Update::default()
            }));
        }
    }

    #[test]
    fn a_large_as_goes_in_the_capability_with_as_trans_in_the_header() {
        let mut o = open();
        o.asn = 4_200_000_000;
        o.capabilities.four_octet_as = Some(4_200_000_000);
        let bytes = round_trip(&Message::Open(o.clone()));
        assert_eq!(&bytes[20..22], &23456u16.to_be_bytes());
        o.capabilities.four_octet_as = None;
        assert!(matches!(
            encode(&Message::Open(o)),
            Err(CodecError::Unencodable(_))
        ));
    }

    #[test]
    fn end_of_rib_is_an_empty_update_or_an_empty_mp_unreach() {
        let eor4 = encode(&Message::Update(Update {
            end_of_rib: Some(Afi::Ipv4),
            ..Update::default()
        }))
        .unwrap();
        assert_eq!(eor4.len(), 23);
        assert_eq!(&eor4[19..], &[0, 0, 0, 0]);
        let eor6 = encode(&Message::Update(Update {
            end_of_rib: Some(Afi::Ipv6),
            ..Update::default()
        }))
        .unwrap();
        // Optional non-transitive, extended length, type 15, AFI 2, SAFI 1.
        assert_eq!(&eor6[19..], &[0, 0, 0, 7, 0x90, 15, 0, 3, 0, 2, 1]);
        // Asking for an empty UPDATE without saying End-of-RIB is a mistake.
        assert!(encode(&Message::Update(Update::default())).is_err());
    }

    #[test]
    fn an_update_carries_one_set_of_attributes() {
        let mut other = route("10.244.2.0/26", "192.168.1.12");
        let u = |b: Route| Update {
            announce: vec![route("10.244.1.0/26", "192.168.1.11"), b],
            ..Update::default()
        };
        assert!(encode(&Message::Update(u(other.clone()))).is_err());
        other.next_hop = "192.168.1.11".parse().unwrap();
        other.communities.push(1);
        assert!(encode(&Message::Update(u(other.clone()))).is_err());
        other.communities.pop();
        other.local_pref = None;
        assert!(encode(&Message::Update(u(other.clone()))).is_err());
        other.local_pref = Some(100);
        assert!(encode(&Message::Update(u(other))).is_ok());
        // A route's family must be its next hop's.
        let mixed = Update {
            announce: vec![route("fd00::/64", "192.168.1.11")],
            ..Update::default()
        };
        assert!(encode(&Message::Update(mixed)).is_err());
    }

    #[test]
    fn ipv4_routes_use_the_classic_fields_and_ipv6_routes_mp_reach() {
        let b = encode(&Message::Update(Update {
            announce: vec![route("10.244.1.0/26", "192.168.1.11")],
            ..Update::default()
        }))
        .unwrap();
        // No withdrawn routes; the NLRI field ends the message: /26 10.244.1.0
        assert_eq!(&b[19..21], &[0, 0]);
        assert_eq!(&b[b.len() - 5..], &[26, 10, 244, 1, 0]);
        // NEXT_HOP (well-known transitive, type 3) is there.
        assert!(b.windows(7).any(|w| w == [0x40, 3, 4, 192, 168, 1, 11]));

        let b = encode(&Message::Update(Update {
            announce: vec![route("fd00:10:244:1::/122", "fd00::11")],
            ..Update::default()
        }))
        .unwrap();
        // No NEXT_HOP attribute; MP_REACH (optional, extended length) with
        // AFI 2, SAFI 1 and the 16-octet next hop; it ends the message, so
        // there is no classic NLRI.
        assert!(!b.windows(2).any(|w| w == [0x40, 3]));
        let at = b.windows(2).position(|w| w == [0x90, 14]).unwrap();
        let len = usize::from(u16::from_be_bytes([b[at + 2], b[at + 3]]));
        assert_eq!(at + 4 + len, b.len());
        assert_eq!(&b[at + 4..at + 8], &[0, 2, 1, 16]);
        assert_eq!(
            &b[at + 8..at + 24],
            &"fd00::11".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
    }

    #[test]
    fn as_paths_are_four_octet_and_long_ones_span_segments() {
        let mut r = route("10.0.0.0/8", "192.168.1.1");
        r.as_path = (1..=600).map(|i| 4_000_000_000 + i).collect();
        let m = Message::Update(Update {
            announce: vec![r],
            ..Update::default()
        });
        round_trip(&m);
    }

    #[test]
    fn a_hand_assembled_rfc_open_decodes() {
        // RFC 4271 section 4.2 OPEN from AS 65001, hold 180, id 192.0.2.1,
        // with the capabilities of RFC 4760 (IPv4 and IPv6 unicast), RFC 2918
        // (route refresh), RFC 4724 (graceful restart: R bit, 120 s, IPv4
        // unicast with F bit), RFC 6793 (AS 65001), and two tabby ignores:
        // an unknown capability 99 and the Cisco route refresh (128).
        #[rustfmt::skip]
        let body: Vec<u8> = vec![
            4,                  // version
            0xfd, 0xe9,         // my AS 65001
            0, 180,             // hold time
            192, 0, 2, 1,       // BGP identifier
            34,                 // optional parameters length
            2, 32,              // parameter 2 (capabilities), 32 octets
            1, 4, 0, 1, 0, 1,   // MP: IPv4 unicast
            1, 4, 0, 2, 0, 1,   // MP: IPv6 unicast
            2, 0,               // route refresh
            64, 6, 0x80, 120, 0, 1, 1, 0x80, // graceful restart
            65, 4, 0, 0, 0xfd, 0xe9,         // four-octet AS 65001
            99, 0,              // unknown
            128, 0,             // Cisco route refresh
        ];
        let mut wire = vec![0xff; 16];
        wire.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        wire.push(1);
        wire.extend_from_slice(&body);
        let (m, used) = decode(&wire).unwrap().unwrap();
        assert_eq!(used, wire.len());
        assert_eq!(
            m,
            Message::Open(Open {
                asn: 65001,
                hold_time: 180,
                router_id: Ipv4Addr::new(192, 0, 2, 1),
                capabilities: Capabilities {
                    four_octet_as: Some(65001),
                    ipv4_unicast: true,
                    ipv6_unicast: true,
                    route_refresh: true,
                    graceful_restart: Some(GracefulRestart {
                        restart_time: 120,
                        restarting: true,
                        families: vec![(Afi::Ipv4, true)],
                    }),
                },
            })
        );
    }

    #[test]
    fn partial_buffers_wait_for_more() {
        let bytes = encode(&Message::Open(open())).unwrap();
        for n in 0..bytes.len() {
            assert_eq!(decode(&bytes[..n]).unwrap(), None, "{n} bytes");
        }
        // Two messages back to back: the first, then the second.
        let mut two = bytes.clone();
        two.extend(encode(&Message::Keepalive).unwrap());
        let (m, used) = decode(&two).unwrap().unwrap();
        assert!(matches!(m, Message::Open(_)));
        assert_eq!(decode(&two[used..]).unwrap().unwrap().0, Message::Keepalive);
    }

    #[test]
    fn bad_headers_get_the_rfc_4271_notifications() {
        let mut k = encode(&Message::Keepalive).unwrap();
        // A bad marker is seen at once, even in a partial header.
        assert_eq!(notification_of(decode(&[0xff, 0xfe])), (1, 1, vec![]));
        k[18] = 9;
        assert_eq!(notification_of(decode(&k)), (1, 3, vec![9]));
        // A length beyond 4096, or below 19, without waiting for the body.
        assert_eq!(
            notification_of(decode(&[[0xff; 16].as_slice(), &[0x10, 0x01]].concat())),
            (1, 2, vec![0x10, 0x01])
        );
        assert_eq!(
            notification_of(decode(&[[0xff; 16].as_slice(), &[0, 18]].concat())),
            (1, 2, vec![0, 18])
        );
        // A KEEPALIVE with a body.
        let mut k = encode(&Message::Keepalive).unwrap();
        k[17] = 20;
        k.push(0);
        assert_eq!(notification_of(decode(&k)), (1, 2, vec![0, 20]));
    }

    #[test]
    fn bad_opens_and_updates_get_their_notifications() {
        let mut o = encode(&Message::Open(open())).unwrap();
        o[19] = 3; // version 3
        assert_eq!(notification_of(decode(&o)).0, 2);
        assert_eq!(notification_of(decode(&o)).1, 1);
        let mut o = encode(&Message::Open(open())).unwrap();
        o[22..24].copy_from_slice(&[0, 1]); // hold time 1
        assert_eq!(notification_of(decode(&o)), (2, 6, vec![0, 1]));
        let mut o = encode(&Message::Open(open())).unwrap();
        o[24..28].copy_from_slice(&[0, 0, 0, 0]); // BGP id 0.0.0.0
        assert_eq!(notification_of(decode(&o)).1, 3);

        // An UPDATE announcing 10/8 with ORIGIN and NEXT_HOP but no AS_PATH.
        #[rustfmt::skip]
        let body = [
            0, 0,                  // no withdrawn routes
            0, 11,                 // path attributes
            0x40, 1, 1, 0,         // ORIGIN IGP
            0x40, 3, 4, 10, 0, 0, 1, // NEXT_HOP
            8, 10,                 // 10.0.0.0/8
        ];
        let mut wire = vec![0xff; 16];
        wire.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        wire.push(2);
        wire.extend_from_slice(&body);
        assert_eq!(notification_of(decode(&wire)), (3, 3, vec![2]));
        // The same, withdrawing instead of announcing, is fine.
        #[rustfmt::skip]
        let body = [0, 2, 8, 10, 0, 0];
        let mut wire = vec![0xff; 16];
        wire.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
        wire.push(2);
        wire.extend_from_slice(&body);
        let (m, _) = decode(&wire).unwrap().unwrap();
        assert_eq!(
            m,
            Message::Update(Update {
                withdraw: vec![v4("10.0.0.0/8")],
                ..Update::default()
            })
        );
        // An attribute twice: malformed attribute list.
        let mut b = encode(&Message::Update(Update {
            announce: vec![route("10.0.0.0/8", "10.0.0.1")],
            ..Update::default()
        }))
        .unwrap();
        let at = b.windows(3).position(|w| w == [0x40, 3, 4]).unwrap();
        b[at + 1] = 1; // NEXT_HOP becomes a second ORIGIN (of length 4)
        let r = decode(&b);
        assert_eq!(notification_of(r).0, 3);
    }

    #[test]
    fn unknown_notifications_are_reported_and_unknown_refreshes_ignored() {
        // Cease subcode 11 ("Hard Reset" is 9; 11 is unknown to netgauze).
        let mut n = vec![0xff; 16];
        n.extend_from_slice(&[0, 23, 3, 6, 11, 1, 2]);
        assert_eq!(
            decode(&n).unwrap().unwrap().0,
            Message::Notification(Notification {
                code: 6,
                subcode: 11,
                data: vec![1, 2],
            })
        );
        // An unknown subcode cannot be encoded, and says so.
        assert!(encode(&Message::Notification(Notification {
            code: 6,
            subcode: 11,
            data: vec![],
        }))
        .is_err());
        // ROUTE-REFRESH for IPv4 multicast, and an enhanced-refresh BoRR.
        for rr in [[0, 1, 0, 2], [0, 1, 1, 1], [0, 99, 0, 1]] {
            let mut w = vec![0xff; 16];
            w.extend_from_slice(&[0, 23, 5]);
            w.extend_from_slice(&rr);
            assert_eq!(
                decode(&w).unwrap().unwrap().0,
                Message::Update(Update::default()),
                "{rr:?}"
            );
        }
    }

    #[test]
    fn encode_errors_have_an_encodable_notification() {
        let e = encode(&Message::Update(Update::default())).unwrap_err();
        let n = e.notification();
        assert!(encode(&Message::Notification(n)).is_ok());
    }

    #[test]
    fn big_updates_are_refused_whole_and_split_on_request() {
        let routes: Vec<Route> = (0..10_000u32)
            .map(|i| {
                let mut r = route("10.0.0.0/26", "192.168.1.11");
                r.prefix =
                    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + (i << 6)), 26).unwrap());
                r
            })
            .collect();
        let u = Update {
            announce: routes.clone(),
            withdraw: (0..3000u32)
                .map(|i| format!("fd00:{i:x}::/64").parse().unwrap())
                .collect(),
            end_of_rib: None,
        };
        assert!(matches!(
            encode(&Message::Update(u.clone())),
            Err(CodecError::TooLong { .. })
        ));
        let parts = encode_split(&u).unwrap();
        let mut announced = Vec::new();
        let mut withdrawn = Vec::new();
        for p in &parts {
            assert!(p.len() <= MAX_MESSAGE_LEN);
            let (Message::Update(d), used) = decode(p).unwrap().unwrap() else {
                panic!("not an update")
            };
            assert_eq!(used, p.len());
            announced.extend(d.announce);
            withdrawn.extend(d.withdraw);
        }
        assert_eq!(announced, routes);
        assert_eq!(withdrawn, u.withdraw);
        // Packed: 10,000 /26s at 5 octets each need at least 13 messages.
        assert!(parts.len() < 13 + 3 + 6, "{} messages", parts.len());
    }

    // -- properties ---------------------------------------------------------

    fn arb_afi() -> impl Strategy<Value = Afi> {
        prop_oneof![Just(Afi::Ipv4), Just(Afi::Ipv6)]
    }

    fn arb_v4_prefix() -> impl Strategy<Value = IpNet> {
        // Unicast space: netgauze refuses multicast and broadcast prefixes.
        (0u32..0xe000_0000, 0u8..=32)
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), l).unwrap().trunc()))
    }

    fn arb_v6_prefix() -> impl Strategy<Value = IpNet> {
        (0u128..(0xff00u128 << 112), 0u8..=128).prop_map(|(a, l)| {
            IpNet::V6(
                Ipv6Net::new(std::net::Ipv6Addr::from(a), l)
                    .unwrap()
                    .trunc(),
            )
        })
    }

    fn arb_attrs() -> impl Strategy<Value = (Origin, Vec<u32>, Vec<u32>, Option<u32>)> {
        (
            prop_oneof![
                Just(Origin::Igp),
                Just(Origin::Egp),
                Just(Origin::Incomplete)
            ],
            prop::collection::vec(any::<u32>(), 0..8),
            prop::collection::vec(any::<u32>(), 0..8),
            any::<Option<u32>>(),
        )
    }

    fn arb_update() -> impl Strategy<Value = Update> {
        let announce = prop_oneof![
            Just(Vec::new()),
            (
                any::<[u8; 4]>(),
                prop::collection::vec(arb_v4_prefix(), 1..20),
                arb_attrs()
            )
                .prop_map(|(nh, ps, a)| routes(IpAddr::from(nh), ps, a)),
            (
                any::<[u8; 16]>(),
                prop::collection::vec(arb_v6_prefix(), 1..20),
                arb_attrs()
            )
                .prop_map(|(nh, ps, a)| routes(IpAddr::from(nh), ps, a)),
        ];
        let withdraw = prop::collection::vec(prop_oneof![arb_v4_prefix(), arb_v6_prefix()], 0..20);
        prop_oneof![
            (announce, withdraw).prop_filter_map("empty", |(announce, withdraw)| {
                (!announce.is_empty() || !withdraw.is_empty()).then_some(Update {
                    announce,
                    withdraw,
                    end_of_rib: None,
                })
            }),
            arb_afi().prop_map(|afi| Update {
                end_of_rib: Some(afi),
                ..Update::default()
            }),
        ]
    }

    fn routes(
        next_hop: IpAddr,
        prefixes: Vec<IpNet>,
        (origin, as_path, communities, local_pref): (Origin, Vec<u32>, Vec<u32>, Option<u32>),
    ) -> Vec<Route> {
        prefixes
            .into_iter()
            .map(|prefix| Route {
                prefix,
                next_hop,
                origin,
                as_path: as_path.clone(),
                communities: communities.clone(),
                local_pref,
            })
            .collect()
    }

    fn arb_open() -> impl Strategy<Value = Open> {
        (
            any::<u32>(),
            any::<bool>(),
            prop_oneof![Just(0u16), 3u16..],
            (1u32..0xe000_0000).prop_map(Ipv4Addr::from),
            any::<(bool, bool, bool)>(),
            proptest::option::of((
                0..=MAX_RESTART_TIME,
                any::<bool>(),
                prop::collection::vec((arb_afi(), any::<bool>()), 0..3),
            )),
        )
            .prop_map(|(asn, four, hold_time, router_id, (v4, v6, rr), gr)| {
                let asn = if four { asn } else { asn & 0xffff };
                Open {
                    asn,
                    hold_time,
                    router_id,
                    capabilities: Capabilities {
                        four_octet_as: four.then_some(asn),
                        ipv4_unicast: v4,
                        ipv6_unicast: v6,
                        route_refresh: rr,
                        graceful_restart: gr.map(|(restart_time, restarting, families)| {
                            GracefulRestart {
                                restart_time,
                                restarting,
                                families,
                            }
                        }),
                    },
                }
            })
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            Just(Message::Keepalive),
            arb_open().prop_map(Message::Open),
            arb_update().prop_map(Message::Update),
            arb_afi().prop_map(|afi| Message::RouteRefresh(RouteRefresh { afi })),
            (
                prop_oneof![
                    (Just(1u8), 0u8..=3),
                    (Just(2u8), prop_oneof![0u8..=4, 6u8..=7]),
                    (Just(3u8), prop_oneof![0u8..=6, 8u8..=11]),
                    (Just(4u8), any::<u8>()),
                    (Just(5u8), 0u8..=3),
                    (Just(6u8), 1u8..=10),
                ],
                prop::collection::vec(any::<u8>(), 0..32)
            )
                .prop_map(|((code, subcode), data)| Message::Notification(
                    Notification {
                        code,
                        subcode,
                        data
                    }
                )),
        ]
    }

    /// What decoding gives back: withdrawals travel IPv4 first (withdrawn
    /// routes field), then IPv6 (MP_UNREACH_NLRI).
    fn canonical(mut m: Message) -> Message {
        if let Message::Update(u) = &mut m {
            u.withdraw.sort_by_key(|p| matches!(p, IpNet::V6(_)));
        }
        m
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn what_encodes_decodes_back(m in arb_message()) {
            let bytes = encode(&m).unwrap();
            prop_assert!(bytes.len() <= MAX_MESSAGE_LEN);
            let (back, used) = decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(back, canonical(m));
            for n in 0..bytes.len() {
                prop_assert_eq!(decode(&bytes[..n]).unwrap(), None);
            }
        }
    }
}
