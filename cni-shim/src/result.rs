//! The CNI success result: a version-neutral model, built from `tabby-node`'s
//! ADD answer (appended to any `prevResult`), and rendered in the schema of
//! the requested spec version.

use crate::env::truncate;
use crate::error::CniError;
use crate::version::SpecVersion;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::net::IpAddr;
use tabby_proto::v1 as pb;

/// One interface of the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// MTU (rendered from 1.1.0 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Netns path for container-side interfaces; absent for host ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// Fields of other plugins' results, kept as they were.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One address of the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix, e.g. `10.244.1.5/32`.
    pub address: String,
    /// Gateway for this address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
    /// Other fields (`version` of pre-1.0 results lands here and is
    /// recomputed on rendering).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One route of the result.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// Destination in CIDR notation.
    pub dst: String,
    /// Next hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// Other fields (1.1.0's mtu, table, scope, ...), kept.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// DNS settings (also the `dns` key of the network config).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dns {
    /// Name servers, in priority order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nameservers: Option<Vec<String>>,
    /// Local domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub search: Option<Vec<String>>,
    /// Resolver options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<Vec<String>>,
}

impl Dns {
    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self == &Dns::default()
    }
}

/// A whole success result, version-neutral.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct CniResult {
    /// Interfaces.
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    /// Addresses.
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// DNS. Lenient here: a chained plugin may have put anything in it.
    #[serde(default)]
    pub dns: Map<String, Value>,
}

/// IPv4 gateway of every pod (design: fixed names).
pub const GATEWAY_V4: &str = "169.254.1.1";
/// IPv6 gateway of every pod.
pub const GATEWAY_V6: &str = "fe80::ecee:eeff:feee:eeee";

/// Parse `addr/prefix`, checking the prefix length against the family.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (a, p) = s.split_once('/')?;
    let ip: IpAddr = a.parse().ok()?;
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 3 {
        return None;
    }
    let len: u8 = p.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (len <= max).then_some((ip, len))
}

impl CniResult {
    /// Read a `prevResult` object (CNI code 6 if it does not decode,
    /// including an address or gateway that is not one: the node would
    /// only refuse it later with another code).
    pub fn from_prev(v: &Value) -> Result<Self, CniError> {
        if !v.is_object() {
            return Err(CniError::decode("prevResult must be an object"));
        }
        let r: Self = serde_json::from_value(v.clone())
            .map_err(|e| CniError::decode(format!("cannot decode prevResult: {e}")))?;
        for (n, ip) in r.ips.iter().enumerate() {
            if parse_cidr(&ip.address).is_none() {
                return Err(CniError::decode(format!(
                    "cannot decode prevResult: ips[{n}].address {:?} is not an address \
                     with a prefix length",
                    truncate(&ip.address, 60)
                )));
            }
            if let Some(g) = &ip.gateway {
                if g.parse::<IpAddr>().is_err() {
                    return Err(CniError::decode(format!(
                        "cannot decode prevResult: ips[{n}].gateway {:?} is not an address",
                        truncate(g, 60)
                    )));
                }
            }
        }
        Ok(r)
    }

    /// The result of an ADD: `prev` (if the runtime chained tabby after
    /// another plugin) followed by the host veth, the pod interface, its
    /// addresses and default routes. `dns` fills the result's DNS when
    /// `prev` has none.
    pub fn from_add(
        resp: &pb::PodAddResponse,
        ifname: &str,
        netns: &str,
        prev: Option<CniResult>,
        dns: &Dns,
    ) -> Result<Self, CniError> {
        let mut r = prev.unwrap_or_default();
        if resp.addresses.is_empty() {
            return Err(CniError::internal(
                "tabby-node answered ADD without an address",
            ));
        }
        let mtu = (resp.mtu > 0).then_some(resp.mtu);
        let mac = |m: &str| (!m.is_empty()).then(|| m.to_string());
        if !resp.host_ifname.is_empty() {
            r.interfaces.push(Interface {
                name: resp.host_ifname.clone(),
                mac: mac(&resp.host_mac),
                mtu,
                ..Default::default()
            });
        }
        let pod_index = r.interfaces.len();
        r.interfaces.push(Interface {
            name: if resp.pod_ifname.is_empty() {
                ifname.to_string()
            } else {
                resp.pod_ifname.clone()
            },
            mac: mac(&resp.pod_mac),
            mtu,
            sandbox: Some(netns.to_string()),
            ..Default::default()
        });

        let mut gw4 = None;
        let mut gw6 = None;
        for g in &resp.gateways {
            match g.parse::<IpAddr>() {
                Ok(ip @ IpAddr::V4(_)) => gw4 = gw4.or(Some(ip)),
                Ok(ip @ IpAddr::V6(_)) => gw6 = gw6.or(Some(ip)),
                Err(_) => {
                    return Err(CniError::internal(format!(
                        "tabby-node answered ADD with a bad gateway {g:?}"
                    )))
                }
            }
        }
        for a in &resp.addresses {
            let (ip, _) = parse_cidr(a).ok_or_else(|| {
                CniError::internal(format!("tabby-node answered ADD with a bad address {a:?}"))
            })?;
            let gw = if ip.is_ipv4() { gw4 } else { gw6 };
            r.ips.push(IpConfig {
                address: a.clone(),
                gateway: gw.map(|g| g.to_string()),
                interface: Some(pod_index),
                extra: Map::new(),
            });
            let route = Route {
                dst: if ip.is_ipv4() { "0.0.0.0/0" } else { "::/0" }.to_string(),
                gw: gw.map(|g| g.to_string()),
                extra: Map::new(),
            };
            if !r.routes.contains(&route) {
                r.routes.push(route);
            }
        }
        if r.dns.is_empty() && !dns.is_empty() {
            if let Ok(Value::Object(m)) = serde_json::to_value(dns) {
                r.dns = m;
            }
        }
        Ok(r)
    }

    /// Addresses `prevResult` lists for the container interface `ifname`:
    /// what CHECK asks the node to verify. Abbreviated results (no
    /// interfaces) contribute the ips that name no interface.
    pub fn expected_addresses(&self, ifname: &str) -> Vec<String> {
        let ours: Vec<usize> = self
            .interfaces
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.name == ifname && i.sandbox.as_deref().is_some_and(|s| !s.is_empty())
            })
            .map(|(n, _)| n)
            .collect();
        self.ips
            .iter()
            .filter(|ip| match ip.interface {
                Some(n) => ours.contains(&n),
                None => self.interfaces.is_empty(),
            })
            .map(|ip| ip.address.clone())
            .collect()
    }

    /// The result as JSON in the schema of `v`.
    pub fn render(&self, v: SpecVersion) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut m = to_object(i);
                if !v.interfaces_have_mtu() {
                    m.remove("mtu");
                }
                Value::Object(m)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut m = to_object(ip);
                if v.ips_have_version() {
                    let fam = match parse_cidr(&ip.address).map(|(a, _)| a) {
                        Some(IpAddr::V4(_)) => Some("4"),
                        Some(IpAddr::V6(_)) => Some("6"),
                        None => None,
                    };
                    if let Some(f) = fam {
                        m.insert("version".into(), Value::String(f.into()));
                    }
                } else {
                    m.remove("version");
                }
                Value::Object(m)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| Value::Object(to_object(r)))
            .collect();
        serde_json::json!({
            "cniVersion": v.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": self.dns,
        })
    }
}

fn to_object<T: Serialize>(t: &T) -> Map<String, Value> {
    match serde_json::to_value(t) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn response() -> pb::PodAddResponse {
        pb::PodAddResponse {
            host_ifname: "tab0123456789ab".into(),
            host_mac: "ee:ee:ee:ee:ee:ee".into(),
            pod_ifname: "eth0".into(),
            pod_mac: "0a:58:0a:f4:01:05".into(),
            addresses: vec!["10.244.1.5/32".into()],
            gateways: vec![GATEWAY_V4.into()],
            mtu: 1450,
        }
    }

    fn add(v: SpecVersion) -> Value {
        CniResult::from_add(
            &response(),
            "eth0",
            "/var/run/netns/pod1",
            None,
            &Dns::default(),
        )
        .unwrap()
        .render(v)
    }

    fn golden(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    // Golden results, one per version. 0.3.x/0.4.0 carry "version" on ips;
    // 1.x does not; 1.1.0 adds interface mtu.
    const GOLDEN_03X_04: &str = r#"{
        "cniVersion": "VERSION",
        "interfaces": [
            {"name": "tab0123456789ab", "mac": "ee:ee:ee:ee:ee:ee"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/pod1"}
        ],
        "ips": [{"version": "4", "address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
        "dns": {}
    }"#;

    #[test]
    fn golden_0_3_0_0_3_1_0_4_0() {
        for v in [
            SpecVersion::V0_3_0,
            SpecVersion::V0_3_1,
            SpecVersion::V0_4_0,
        ] {
            assert_eq!(
                add(v),
                golden(&GOLDEN_03X_04.replace("VERSION", v.as_str())),
                "{v:?}"
            );
        }
    }

    #[test]
    fn golden_1_0_0() {
        let want = golden(
            r#"{
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "tab0123456789ab", "mac": "ee:ee:ee:ee:ee:ee"},
                {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/pod1"}
            ],
            "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {}
        }"#,
        );
        assert_eq!(add(SpecVersion::V1_0_0), want);
    }

    #[test]
    fn golden_1_1_0() {
        let want = golden(
            r#"{
            "cniVersion": "1.1.0",
            "interfaces": [
                {"name": "tab0123456789ab", "mac": "ee:ee:ee:ee:ee:ee", "mtu": 1450},
                {"name": "eth0", "mac": "0a:58:0a:f4:01:05", "mtu": 1450, "sandbox": "/var/run/netns/pod1"}
            ],
            "ips": [{"address": "10.244.1.5/32", "gateway": "169.254.1.1", "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
            "dns": {}
        }"#,
        );
        assert_eq!(add(SpecVersion::V1_1_0), want);
    }

    #[test]
    fn dual_stack_gets_both_default_routes() {
        let mut r = response();
        r.addresses.push("fd00:10:244:1::5/128".into());
        r.gateways.push(GATEWAY_V6.into());
        let v = CniResult::from_add(&r, "eth0", "/ns", None, &Dns::default())
            .unwrap()
            .render(SpecVersion::V0_4_0);
        assert_eq!(v["ips"][1]["version"], "6");
        assert_eq!(v["ips"][1]["gateway"], GATEWAY_V6);
        assert_eq!(
            v["routes"],
            json!([{"dst":"0.0.0.0/0","gw":"169.254.1.1"},{"dst":"::/0","gw":GATEWAY_V6}])
        );
    }

    #[test]
    fn prev_result_is_kept_and_indices_shift() {
        let prev = CniResult::from_prev(&json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "00:11:22:33:44:55", "socketPath": "/x"}],
            "ips": [{"address": "192.168.0.9/24", "interface": 0}],
            "routes": [{"dst": "192.168.0.0/16"}],
            "dns": {"nameservers": ["10.96.0.10"]}
        }))
        .unwrap();
        let v = CniResult::from_add(&response(), "eth0", "/ns", Some(prev), &Dns::default())
            .unwrap()
            .render(SpecVersion::V1_0_0);
        assert_eq!(v["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(v["interfaces"][0]["socketPath"], "/x");
        assert_eq!(v["ips"][0]["interface"], 0);
        assert_eq!(v["ips"][1]["interface"], 2);
        assert_eq!(v["routes"].as_array().unwrap().len(), 2);
        assert_eq!(v["dns"], json!({"nameservers": ["10.96.0.10"]}));
    }

    #[test]
    fn config_dns_fills_an_empty_result_dns() {
        let dns = Dns {
            nameservers: Some(vec!["10.96.0.10".into()]),
            search: Some(vec!["svc.cluster.local".into()]),
            ..Default::default()
        };
        let v = CniResult::from_add(&response(), "eth0", "/ns", None, &dns)
            .unwrap()
            .render(SpecVersion::V1_0_0);
        assert_eq!(
            v["dns"],
            json!({"nameservers":["10.96.0.10"],"search":["svc.cluster.local"]})
        );
    }

    #[test]
    fn version_field_follows_the_requested_schema() {
        // A 0.4.0-style prevResult rendered as 1.0.0 loses "version"...
        let prev = CniResult::from_prev(&json!({
            "ips": [{"version": "4", "address": "10.0.0.1/24"}]
        }))
        .unwrap();
        let v = prev.render(SpecVersion::V1_0_0);
        assert_eq!(v["ips"][0], json!({"address":"10.0.0.1/24"}));
        // ...and a 1.0.0-style one rendered as 0.3.1 gains it.
        let prev = CniResult::from_prev(&json!({"ips": [{"address": "fd00::1/64"}]})).unwrap();
        assert_eq!(prev.render(SpecVersion::V0_3_1)["ips"][0]["version"], "6");
    }

    #[test]
    fn bad_node_answers_are_errors_not_panics() {
        let mut r = response();
        r.addresses = vec![];
        assert!(CniResult::from_add(&r, "eth0", "/ns", None, &Dns::default()).is_err());
        let mut r = response();
        r.addresses = vec!["10.0.0.1".into()];
        assert!(CniResult::from_add(&r, "eth0", "/ns", None, &Dns::default()).is_err());
        let mut r = response();
        r.gateways = vec!["nope".into()];
        assert!(CniResult::from_add(&r, "eth0", "/ns", None, &Dns::default()).is_err());
    }

    #[test]
    fn empty_pod_ifname_falls_back_to_cni_ifname() {
        let mut r = response();
        r.pod_ifname.clear();
        r.host_ifname.clear();
        let res = CniResult::from_add(&r, "net1", "/ns", None, &Dns::default()).unwrap();
        assert_eq!(res.interfaces.len(), 1);
        assert_eq!(res.interfaces[0].name, "net1");
        assert_eq!(res.ips[0].interface, Some(0));
    }

    #[test]
    fn expected_addresses_for_our_interface_only() {
        let prev = CniResult::from_prev(&json!({
            "interfaces": [
                {"name": "tababc", "mac": "ee:ee:ee:ee:ee:ee"},
                {"name": "eth0", "sandbox": "/var/run/netns/p"},
                {"name": "net1", "sandbox": "/var/run/netns/p"}
            ],
            "ips": [
                {"address": "10.244.1.5/32", "interface": 1},
                {"address": "fd00::5/128", "interface": 1},
                {"address": "192.168.9.9/24", "interface": 2}
            ]
        }))
        .unwrap();
        assert_eq!(
            prev.expected_addresses("eth0"),
            vec!["10.244.1.5/32", "fd00::5/128"]
        );
        assert_eq!(prev.expected_addresses("net1"), vec!["192.168.9.9/24"]);
        assert!(prev.expected_addresses("eth9").is_empty());
        let abbreviated =
            CniResult::from_prev(&json!({"ips": [{"address": "10.0.0.1/32"}]})).unwrap();
        assert_eq!(abbreviated.expected_addresses("eth0"), vec!["10.0.0.1/32"]);
    }

    #[test]
    fn malformed_prev_result_is_decode_error() {
        for bad in [
            json!("x"),
            json!([]),
            json!({"ips": "x"}),
            json!({"ips": [{"address": 5}]}),
            json!({"ips": [{"address": "10.0.0.1/32", "interface": -1}]}),
            json!({"interfaces": [{}]}),
        ] {
            assert_eq!(CniResult::from_prev(&bad).unwrap_err().code, 6, "{bad}");
        }
    }

    #[test]
    fn prev_result_address_or_gateway_that_is_not_one_is_decode_error() {
        for (bad, field) in [
            (json!({"ips": [{"address": "banana"}]}), "ips[0].address"),
            (
                json!({"ips": [{"address": "10.0.0.1/32"}, {"address": "10.0.0.2"}]}),
                "ips[1].address",
            ),
            (
                json!({"ips": [{"address": "10.0.0.1/32", "gateway": "banana"}]}),
                "ips[0].gateway",
            ),
        ] {
            let e = CniResult::from_prev(&bad).unwrap_err();
            assert_eq!(e.code, 6, "{bad}");
            assert!(e.msg.contains(field), "{e}");
        }
        assert!(CniResult::from_prev(
            &json!({"ips": [{"address": "fd00::1/128", "gateway": "fe80::1"}]})
        )
        .is_ok());
    }

    #[test]
    fn cidr_parsing() {
        assert!(parse_cidr("10.0.0.1/32").is_some());
        assert!(parse_cidr("fd00::1/128").is_some());
        for bad in [
            "10.0.0.1",
            "10.0.0.1/33",
            "fd00::1/129",
            "10.0.0.1/",
            "x/1",
            "10.0.0.1/+1",
        ] {
            assert!(parse_cidr(bad).is_none(), "{bad}");
        }
    }
}
