//! `tabby.v1.BgpAdmin`: the speaker's configuration (kept by the IPAM owner,
//! durable like everything else) and its sessions' status.
use super::{config, SharedStatus, Speaker};
use crate::{error::Error, owner::Ipam};
use tabby_proto::v1 as pb;
use tonic::{Request, Response, Status};

type Res<T> = std::result::Result<Response<T>, Status>;

/// `tabby.v1.BgpAdmin`.
#[derive(Clone)]
pub struct BgpService {
    ipam: Ipam,
    speaker: Speaker,
    status: SharedStatus,
}

impl BgpService {
    /// Over the IPAM owner, with the speaker's status.
    pub fn new(ipam: Ipam, speaker: Speaker, status: SharedStatus) -> Self {
        BgpService {
            ipam,
            speaker,
            status,
        }
    }
}

#[tonic::async_trait]
impl pb::bgp_admin_server::BgpAdmin for BgpService {
    async fn get_bgp_config(&self, _: Request<pb::GetBgpConfigRequest>) -> Res<pb::BgpGlobal> {
        let sp = self.speaker;
        let (g, _) = self
            .ipam
            .read(move |s| config::global_to_pb(s.bgp(), sp.listen, sp.fallback_router_id()))
            .await?;
        Ok(Response::new(g))
    }

    async fn set_bgp_config(&self, req: Request<pb::SetBgpConfigRequest>) -> Res<pb::BgpGlobal> {
        let r = req.into_inner();
        let sp = self.speaker;
        let (c, _) = self
            .ipam
            .call(move |s| {
                let c = config::apply_global(s.bgp().clone(), &r, sp.listen)?;
                s.set_bgp(c)
            })
            .await?;
        let g = config::global_to_pb(&c, sp.listen, sp.fallback_router_id());
        tracing::info!(enabled = g.enabled, asn = g.asn, router_id = %g.router_id, "BGP config set");
        Ok(Response::new(g))
    }

    async fn list_peers(
        &self,
        _: Request<pb::ListBgpPeersRequest>,
    ) -> Res<pb::ListBgpPeersResponse> {
        let (peers, _) = self
            .ipam
            .read(|s| s.bgp().peers.iter().map(config::peer_to_pb).collect())
            .await?;
        Ok(Response::new(pb::ListBgpPeersResponse { peers }))
    }

    async fn add_peer(&self, req: Request<pb::AddBgpPeerRequest>) -> Res<pb::BgpPeer> {
        let p = req
            .into_inner()
            .peer
            .ok_or_else(|| Error::InvalidArgument("peer is required".into()))?;
        let (peer, _) = self
            .ipam
            .call(move |s| {
                let pools: Vec<String> = s.pools().into_iter().map(|p| p.name).collect();
                let mut c = s.bgp().clone();
                let peer = config::peer_from_pb(p, &c, &pools)?;
                c.peers.push(peer.clone());
                c.peers.sort_by_key(|p| p.address);
                s.set_bgp(c).map(|(_, m)| (peer, m))
            })
            .await?;
        tracing::info!(peer = %peer.address, remote_asn = peer.remote_asn, "BGP peer added");
        Ok(Response::new(config::peer_to_pb(&peer)))
    }

    async fn delete_peer(
        &self,
        req: Request<pb::DeleteBgpPeerRequest>,
    ) -> Res<pb::DeleteBgpPeerResponse> {
        let a = req.into_inner().address;
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("peer address {a:?} is not an address")))?;
        let (peer, _) = self
            .ipam
            .call(move |s| {
                let mut c = s.bgp().clone();
                let i = c
                    .peers
                    .iter()
                    .position(|p| p.address == addr)
                    .ok_or_else(|| {
                        Error::NotFound(format!("no BGP peer {addr}; ListPeers shows the peers"))
                    })?;
                let peer = c.peers.remove(i);
                s.set_bgp(c).map(|(_, m)| (peer, m))
            })
            .await?;
        tracing::info!(peer = %peer.address, "BGP peer deleted");
        Ok(Response::new(pb::DeleteBgpPeerResponse {
            peer: Some(config::peer_to_pb(&peer)),
        }))
    }

    async fn refresh_peer(
        &self,
        req: Request<pb::RefreshBgpPeerRequest>,
    ) -> Res<pb::RefreshBgpPeerResponse> {
        let a = req.into_inner().address;
        let addr: std::net::IpAddr = a
            .parse()
            .map_err(|_| Error::InvalidArgument(format!("peer address {a:?} is not an address")))?;
        let st = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let s = st.get(&addr).ok_or_else(|| {
            Error::NotFound(format!(
                "the controller holds no BGP session with {addr} (GetStatus lists them)"
            ))
        })?;
        if s.state != Some(tabby_bgp::fsm::State::Established) {
            return Err(Error::FailedPrecondition(format!(
                "the session with {addr} is not established"
            ))
            .into());
        }
        if !s.refresh_ok {
            return Err(
                Error::FailedPrecondition(format!("{addr} did not offer route refresh")).into(),
            );
        }
        if let Some(c) = &s.cmds {
            let _ = c.send(tabby_bgp::session::Command::Refresh);
        }
        tracing::info!(peer = %addr, "BGP route refresh requested");
        Ok(Response::new(pb::RefreshBgpPeerResponse {}))
    }

    async fn get_status(&self, req: Request<pb::GetBgpStatusRequest>) -> Res<pb::BgpStatus> {
        let show = req.into_inner().show_advertised;
        let sp = self.speaker;
        let (cfg, _) = self.ipam.read(|s| s.bgp().clone()).await?;
        let st = self
            .status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let sessions = cfg
            .peers
            .iter()
            .map(|p| {
                let s = st.get(&p.address).cloned().unwrap_or_default();
                pb::BgpSessionStatus {
                    peer: p.address.to_string(),
                    remote_asn: p.remote_asn,
                    // Sessions held by nodes are in each node's Status.
                    state: if !p.node_selector.is_empty() {
                        "NodeHeld".into()
                    } else {
                        s.state
                            .map_or(if cfg.enabled { "Idle" } else { "Disabled" }, |s| {
                                s.as_str()
                            })
                            .into()
                    },
                    uptime_seconds: s.since.map_or(0, |t| t.elapsed().as_secs()),
                    last_error: s.last_error.clone(),
                    prefixes_sent: s.advertised.len() as u64,
                    prefixes_received: s.received.len() as u64,
                    prefixes_accepted: s.accepted as u64,
                    advertised: if show {
                        s.advertised
                            .values()
                            .map(|r| pb::BgpRoute {
                                prefix: r.prefix.to_string(),
                                next_hop: r.next_hop.to_string(),
                                communities: r
                                    .communities
                                    .iter()
                                    .map(|c| config::community_string(*c))
                                    .collect(),
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect();
        Ok(Response::new(pb::BgpStatus {
            enabled: cfg.enabled,
            asn: config::asn(&cfg),
            router_id: config::router_id(&cfg, sp.fallback_router_id())
                .map(|r| r.to_string())
                .unwrap_or_default(),
            sessions,
        }))
    }
}
