//! gRPC services: translate protobuf to IPAM calls and back. No logic lives
//! here beyond parsing; every decision is in [`crate::ipam`].
use crate::{
    auth::caller,
    convert::{
        alloc_to_pb, assign_from_pb, attributes_to_pb, cluster_route_to_pb, config_to_pb,
        config_update_from_pb, node_from_pb, node_pb, parse_addrs, pool_from_pb, pool_to_pb,
        release_to_pb, update_from_pb,
    },
    error::Error,
    ipam::{parse_addr, AllocationView, ProblemKind},
    owner::Ipam,
};
use tabby_proto::v1 as pb;
use tabby_store::Node;
use tonic::{Request, Response, Status};

/// `tabby.v1.IpamAdmin`.
#[derive(Clone)]
pub struct AdminService {
    ipam: Ipam,
}

impl AdminService {
    /// Wraps the IPAM owner.
    pub fn new(ipam: Ipam) -> Self {
        AdminService { ipam }
    }
}

type Res<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::ipam_admin_server::IpamAdmin for AdminService {
    async fn list_pools(&self, _: Request<pb::ListPoolsRequest>) -> Res<pb::ListPoolsResponse> {
        let (pools, _) = self.ipam.read(|s| s.pools()).await?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools.iter().map(pool_to_pb).collect(),
        }))
    }

    async fn create_pool(&self, req: Request<pb::CreatePoolRequest>) -> Res<pb::Pool> {
        let p = req
            .into_inner()
            .pool
            .ok_or_else(|| Error::InvalidArgument("pool is required".into()))?;
        let p = pool_from_pb(p)?;
        let (p, _) = self.ipam.call(move |s| s.create_pool(p)).await?;
        tracing::info!(pool = %p.name, cidr = %p.cidr, "pool created");
        Ok(Response::new(pool_to_pb(&p)))
    }

    async fn update_pool(&self, req: Request<pb::UpdatePoolRequest>) -> Res<pb::Pool> {
        let (name, u) = update_from_pb(req.into_inner())?;
        let (p, _) = self.ipam.call(move |s| s.update_pool(&name, u)).await?;
        tracing::info!(pool = %p.name, "pool updated");
        Ok(Response::new(pool_to_pb(&p)))
    }

    async fn delete_pool(
        &self,
        req: Request<pb::DeletePoolRequest>,
    ) -> Res<pb::DeletePoolResponse> {
        let name = req.into_inner().name;
        let ((p, n), _) = self.ipam.call(move |s| s.delete_pool(&name)).await?;
        tracing::info!(pool = %p.name, blocks = n, "pool deleted");
        Ok(Response::new(pb::DeletePoolResponse {
            pool: Some(pool_to_pb(&p)),
            blocks_removed: n,
        }))
    }

    async fn show_ipam(&self, req: Request<pb::ShowIpamRequest>) -> Res<pb::ShowIpamResponse> {
        let show_blocks = req.into_inner().show_blocks;
        // Summed and converted on the blocking pool: thousands of nodes and
        // blocks are no work for the thread that serves calls.
        let (mut resp, rev) = self
            .ipam
            .read_heavy(move |s| {
                let u = s.usage(show_blocks);
                pb::ShowIpamResponse {
                    pools: u
                        .pools
                        .iter()
                        .map(|p| pb::PoolUsage {
                            name: p.pool.name.clone(),
                            cidr: p.pool.cidr.to_string(),
                            size: p.size,
                            blocks: p.blocks,
                            used: p.used,
                            free: p.size.saturating_sub(p.used),
                            disabled: p.pool.disabled,
                        })
                        .collect(),
                    nodes: u
                        .nodes
                        .iter()
                        .map(|n| pb::NodeUsage {
                            name: n.name.clone(),
                            blocks: n.blocks.iter().map(ToString::to_string).collect(),
                            addresses: n.addresses,
                            borrowed: n.borrowed,
                            vxlan_tunnel_address: s
                                .tunnel_address(&n.name)
                                .map(|a| a.to_string())
                                .unwrap_or_default(),
                            vxlan_v6_tunnel_address: s
                                .tunnel_v6_address(&n.name)
                                .map(|a| a.to_string())
                                .unwrap_or_default(),
                        })
                        .collect(),
                    blocks: if show_blocks {
                        u.blocks
                            .iter()
                            .map(|b| pb::BlockUsage {
                                cidr: b.block.cidr.to_string(),
                                pool: b.block.pool.clone(),
                                affinity: b.block.affinity.clone().unwrap_or_default(),
                                size: b.size,
                                used: b.used,
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                    revision: 0,
                }
            })
            .await?;
        resp.revision = rev;
        Ok(Response::new(resp))
    }

    async fn get_allocation(
        &self,
        req: Request<pb::GetAllocationRequest>,
    ) -> Res<pb::GetAllocationResponse> {
        let r = req.into_inner();
        let resp = match (r.address.is_empty(), r.handle.is_empty()) {
            (false, true) => {
                let a = parse_addr(&r.address)?;
                // One read: the holder and its handle's attributes together.
                let (found, _) = self
                    .ipam
                    .read(move |s| {
                        s.allocation_of(a).map(|v| {
                            let attrs = s
                                .handle_parts(&v.handle)
                                .map(|(_, at)| attributes_to_pb(at))
                                .unwrap_or_default();
                            (v, attrs)
                        })
                    })
                    .await?;
                let (v, attrs) =
                    found.ok_or_else(|| Error::NotFound(format!("{a} is not allocated")))?;
                pb::GetAllocationResponse {
                    allocations: vec![alloc_to_pb(&v)],
                    attributes: attrs,
                }
            }
            (true, false) => {
                let h = r.handle;
                let (found, _) = self
                    .ipam
                    .read(move |s| {
                        s.handle_parts(&h).map(|(addrs, at)| {
                            let v: Vec<AllocationView> =
                                addrs.iter().filter_map(|a| s.allocation_of(*a)).collect();
                            (v, attributes_to_pb(at))
                        })
                    })
                    .await?;
                let (v, attrs) =
                    found.ok_or_else(|| Error::NotFound("handle does not exist".into()))?;
                pb::GetAllocationResponse {
                    allocations: v.iter().map(alloc_to_pb).collect(),
                    attributes: attrs,
                }
            }
            _ => {
                return Err(
                    Error::InvalidArgument("give exactly one of address or handle".into()).into(),
                )
            }
        };
        Ok(Response::new(resp))
    }

    async fn check_ipam(&self, _: Request<pb::CheckIpamRequest>) -> Res<pb::CheckIpamResponse> {
        let ((problems, (alloc, handles)), rev) =
            self.ipam.read_heavy(|s| (s.check(), s.counts())).await?;
        Ok(Response::new(pb::CheckIpamResponse {
            problems: problems
                .into_iter()
                .map(|p| pb::IpamProblem {
                    kind: match p.kind {
                        ProblemKind::AddressWithoutHandle => {
                            pb::ipam_problem::Kind::AddressWithoutHandle
                        }
                        ProblemKind::HandlePointsNowhere => {
                            pb::ipam_problem::Kind::HandlePointsNowhere
                        }
                        ProblemKind::BlockOutsidePools => pb::ipam_problem::Kind::BlockOutsidePools,
                        ProblemKind::BlockOfUnknownNode => {
                            pb::ipam_problem::Kind::BlockOfUnknownNode
                        }
                        ProblemKind::BorrowedAddress => pb::ipam_problem::Kind::BorrowedAddress,
                    } as i32,
                    address: p.address.map(|a| a.to_string()).unwrap_or_default(),
                    handle: p.handle.unwrap_or_default(),
                    block: p.block.map(|b| b.to_string()).unwrap_or_default(),
                    detail: p.detail,
                    repairable: p.repairable,
                })
                .collect(),
            allocated: alloc,
            handles,
            revision: rev,
        }))
    }

    async fn release_addresses(
        &self,
        req: Request<pb::ReleaseAddressesRequest>,
    ) -> Res<pb::ReleaseAddressesResponse> {
        let r = req.into_inner();
        let addrs = parse_addrs(&r.addresses)?;
        let repair = r.repair;
        let (out, _) = self
            .ipam
            .call(move |s| s.release_leaked(&addrs, repair))
            .await?;
        tracing::info!(
            released = out.released.len(),
            handles_removed = out.handles_removed.len(),
            "admin release"
        );
        Ok(Response::new(pb::ReleaseAddressesResponse {
            released: out.released.iter().map(ToString::to_string).collect(),
            not_allocated: out.not_allocated.iter().map(ToString::to_string).collect(),
            handles_removed: out.handles_removed,
        }))
    }

    async fn get_ipam_config(&self, _: Request<pb::GetIpamConfigRequest>) -> Res<pb::IpamConfig> {
        let (c, _) = self.ipam.read(|s| s.config()).await?;
        Ok(Response::new(config_to_pb(&c)))
    }

    async fn set_ipam_config(&self, req: Request<pb::SetIpamConfigRequest>) -> Res<pb::IpamConfig> {
        let r = req.into_inner();
        let (c, _) = self
            .ipam
            .call(move |s| s.set_config(config_update_from_pb(&r)))
            .await?;
        let c = config_to_pb(&c);
        tracing::info!(
            strict_affinity = c.strict_affinity,
            max_blocks_per_node = c.max_blocks_per_node,
            vxlan_vni = c.vxlan_vni,
            vxlan_port = c.vxlan_port,
            "IPAM config set"
        );
        Ok(Response::new(c))
    }

    async fn list_nodes(&self, _: Request<pb::ListNodesRequest>) -> Res<pb::ListNodesResponse> {
        let (nodes, _) = self
            .ipam
            .read_heavy(|s| s.nodes().iter().map(|n| node_pb(s, n)).collect())
            .await?;
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn show_routes(
        &self,
        req: Request<pb::ShowRoutesRequest>,
    ) -> Res<pb::ShowRoutesResponse> {
        let node = req.into_inner().node;
        let (table, rev) = self
            .ipam
            .read_heavy(move |s| {
                // Converted here too: a table of every block is work for
                // the blocking pool, not for the thread that serves calls.
                let intent = s.routing_intent(0);
                if node.is_empty() {
                    let routes = tabby_routing::cluster_routes(&intent, None);
                    return Ok((
                        routes
                            .into_iter()
                            .map(cluster_route_to_pb)
                            .collect::<Vec<_>>(),
                        Vec::new(),
                    ));
                }
                if !intent.nodes.contains_key(&node) {
                    return Err(Error::NotFound(format!("node {node} is not registered")));
                }
                let d = tabby_routing::desired(&intent, &node);
                let view = tabby_routing::node_view(&intent, &node, &d);
                Ok((
                    view.into_iter().map(cluster_route_to_pb).collect(),
                    d.unroutable.into_iter().chain(d.unsupported).collect(),
                ))
            })
            .await?;
        let (routes, problems) = table?;
        Ok(Response::new(pb::ShowRoutesResponse {
            routes,
            revision: rev,
            problems,
        }))
    }

    async fn delete_node(
        &self,
        req: Request<pb::DeleteNodeRequest>,
    ) -> Res<pb::DeleteNodeResponse> {
        let name = req.into_inner().name;
        let (d, _) = self.ipam.call(move |s| s.delete_node(&name)).await?;
        Ok(Response::new(pb::DeleteNodeResponse {
            blocks_freed: d.blocks_freed.iter().map(ToString::to_string).collect(),
            blocks_in_use: d.blocks_in_use.iter().map(ToString::to_string).collect(),
        }))
    }
}

/// `tabby.v1.NodeAgent`. Must be served behind
/// [`node_identity_interceptor`](crate::auth::node_identity_interceptor).
#[derive(Clone)]
pub struct NodeService {
    ipam: Ipam,
}

impl NodeService {
    /// Wraps the IPAM owner.
    pub fn new(ipam: Ipam) -> Self {
        NodeService { ipam }
    }
}

#[tonic::async_trait]
impl pb::node_agent_server::NodeAgent for NodeService {
    async fn register_node(
        &self,
        req: Request<pb::RegisterNodeRequest>,
    ) -> Res<pb::RegisterNodeResponse> {
        let me = caller(&req)?;
        let n = req.into_inner().node.unwrap_or_default();
        if !n.name.is_empty() && n.name != me {
            return Err(Error::PermissionDenied(format!(
                "node {me:?} cannot register as {:?}",
                n.name
            ))
            .into());
        }
        let node = Node {
            name: me,
            ..node_from_pb(n)?
        };
        let (node, rev) = self
            .ipam
            .call(move |s| s.register_node(node).map(|(n, m)| (node_pb(s, &n), m)))
            .await?;
        tracing::info!(node = %node.name, "node registered");
        Ok(Response::new(pb::RegisterNodeResponse {
            node: Some(node),
            revision: rev,
        }))
    }

    async fn assign(&self, req: Request<pb::AssignRequest>) -> Res<pb::AssignResponse> {
        let me = caller(&req)?;
        let a = assign_from_pb(req.into_inner())?;
        let (v, rev) = self.ipam.call(move |s| s.assign(&me, a)).await?;
        Ok(Response::new(pb::AssignResponse {
            allocations: v.iter().map(alloc_to_pb).collect(),
            revision: rev,
        }))
    }

    async fn release_handle(
        &self,
        req: Request<pb::ReleaseHandleRequest>,
    ) -> Res<pb::ReleaseResponse> {
        let me = caller(&req)?;
        let h = req.into_inner().handle;
        let (v, rev) = self
            .ipam
            .call(move |s| s.release_handle(Some(&me), &h))
            .await?;
        Ok(Response::new(release_to_pb(v, rev)))
    }

    async fn release_address(
        &self,
        req: Request<pb::ReleaseAddressRequest>,
    ) -> Res<pb::ReleaseResponse> {
        let me = caller(&req)?;
        let a = parse_addr(&req.into_inner().address)?;
        let (v, rev) = self
            .ipam
            .call(move |s| s.release_address(Some(&me), a))
            .await?;
        Ok(Response::new(release_to_pb(v, rev)))
    }

    async fn list_handles(
        &self,
        req: Request<pb::ListHandlesRequest>,
    ) -> Res<pb::ListHandlesResponse> {
        let me = caller(&req)?;
        let (listed, _) = self.ipam.read(move |s| s.handle_entries_of(&me)).await?;
        let handles = listed.iter().map(|(h, _)| h.clone()).collect();
        let entries = listed
            .into_iter()
            .map(|(handle, container_id)| pb::HandleEntry {
                handle,
                container_id,
            })
            .collect();
        Ok(Response::new(pb::ListHandlesResponse { handles, entries }))
    }

    async fn get_bgp_sessions(
        &self,
        req: Request<pb::GetBgpSessionsRequest>,
    ) -> Res<pb::GetBgpSessionsResponse> {
        let me = caller(&req)?;
        // A read sees every write answered before it: at least the
        // configuration of the generation that made the node ask.
        let (r, _) = self
            .ipam
            .read(move |s| crate::bgp::config::node_sessions(s.bgp(), s.node(&me)))
            .await?;
        Ok(Response::new(r))
    }
}
