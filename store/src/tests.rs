use super::*;
use std::net::IpAddr;

/// Opens `dir` again, waiting while the sled threads of a store just dropped
/// still hold its file lock (they finish in the background).
fn reopen(dir: &std::path::Path) -> Store {
    let start = std::time::Instant::now();
    loop {
        match Store::open(dir) {
            Ok(s) => return s,
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && start.elapsed() < std::time::Duration::from_secs(10) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("reopening {}: {e}", dir.display()),
        }
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pool() -> Pool {
    Pool {
        name: "p".into(),
        cidr: "10.0.0.0/24".parse().unwrap(),
        block_size: 26,
        nat_outgoing: true,
        encapsulation: Encapsulation::Vxlan,
        disabled: false,
        node_selector: String::new(),
    }
}

#[test]
fn commit_load_roundtrip_and_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.revision(), 0);
    let m1 = Mutation {
        ops: vec![
            Op::PutPool(pool()),
            Op::PutBlock(Block {
                cidr: "10.0.0.0/26".parse().unwrap(),
                pool: "p".into(),
                affinity: Some("n1".into()),
            }),
        ],
    };
    let m2 = Mutation {
        ops: vec![
            Op::PutAllocation(
                ip("10.0.0.1"),
                Allocation {
                    handle: "h".into(),
                    node: "n1".into(),
                },
            ),
            Op::PutHandle(
                "h".into(),
                Handle {
                    node: "n1".into(),
                    addresses: vec![ip("10.0.0.1")],
                    attributes: [("pod", "a")].into_iter().collect(),
                },
            ),
            Op::SetReleased(ip("10.0.0.2"), 7),
            Op::PutConfig(IpamConfig {
                strict_affinity: true,
                max_blocks_per_node: 3,
                vxlan_vni: 7,
                vxlan_port: 8472,
            }),
        ],
    };
    let mut rx = s.subscribe();
    let revs = s.commit(&[m1, Mutation::default(), m2]).unwrap();
    assert_eq!(revs, vec![1, 1, 2]);
    assert_eq!(rx.try_recv().unwrap().revision, 1);
    assert_eq!(rx.try_recv().unwrap().keys.len(), 4);
    drop(s);

    let s = reopen(dir.path());
    assert_eq!(s.revision(), 2);
    let snap = s.load().unwrap();
    assert_eq!(snap.pools["p"], pool());
    assert_eq!(snap.blocks.len(), 1);
    assert_eq!(snap.allocations[&ip("10.0.0.1")].handle, "h");
    assert_eq!(snap.released[&ip("10.0.0.2")], 7);
    assert_eq!(
        snap.handles["h"].attributes.get("pod").as_deref(),
        Some("a")
    );
    assert!(snap.config.strict_affinity);

    s.commit(&[Mutation {
        ops: vec![
            Op::DeleteAllocation(ip("10.0.0.1")),
            Op::DeleteHandle("h".into()),
            Op::ClearReleased(ip("10.0.0.2")),
        ],
    }])
    .unwrap();
    let snap = s.load().unwrap();
    assert!(snap.allocations.is_empty() && snap.handles.is_empty() && snap.released.is_empty());
    assert_eq!(snap.revision, 3);
}

#[test]
fn feed_reports_durable_commits_in_order_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let mut rx = s.subscribe();
    // Written but not durable: the feed says nothing yet.
    let (revs, w1) = s
        .write(&[Mutation {
            ops: vec![Op::SetReleased(ip("10.0.0.1"), 1)],
        }])
        .unwrap();
    assert_eq!(revs, vec![1]);
    assert!(rx.try_recv().is_err());
    let (_, w2) = s
        .write(&[Mutation {
            ops: vec![
                Op::ClearReleased(ip("10.0.0.1")),
                Op::DeleteHandle("h".into()),
            ],
        }])
        .unwrap();
    s.make_durable(vec![w1, w2]).unwrap();
    let c1 = rx.try_recv().unwrap();
    let c2 = rx.try_recv().unwrap();
    assert_eq!((c1.revision, c2.revision), (1, 2));
    assert_eq!(
        c2.keys,
        vec![Key::Address(ip("10.0.0.1")), Key::Handle("h".into())]
    );
    assert_eq!(s.revision(), 2);
}

#[test]
fn corrupt_value_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let t = db.open_tree("state").unwrap();
        t.insert("p/bad", &[0xff, 0xff, 0xff][..]).unwrap();
        db.flush().unwrap();
    }
    let s = reopen(dir.path());
    assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
}

/// Keys that are no record of ours, before, between and after the known
/// prefixes, are reported, not skipped.
#[test]
fn unknown_keys_are_an_error() {
    for key in ["0", "a", "ax/1", "d/1", "i/x", "o", "q/1", "s/1", "zz"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = reopen(dir.path());
            s.commit(&[Mutation {
                ops: vec![Op::PutPool(pool())],
            }])
            .unwrap();
            s.backend
                .apply(vec![(key.as_bytes().to_vec(), Some(vec![0u8]))])
                .unwrap();
            s.flush().unwrap();
        }
        let s = reopen(dir.path());
        match s.load() {
            Err(StoreError::Corrupt { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
}

#[test]
fn identity_and_intent_mark_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    let id = s.id().to_string();
    assert_eq!(id.len(), 32, "128 bits in hex: {id}");
    let other = tempfile::tempdir().unwrap();
    assert_ne!(Store::open(other.path()).unwrap().id(), id);
    assert_eq!(s.load().unwrap().intent_revision, 0);
    let put = || Mutation {
        ops: vec![Op::PutPool(pool())],
    };
    assert_eq!(s.revision_after(&[put(), Mutation::default(), put()]), 2);
    // Marked: its last revision is recorded; unmarked: the mark stays.
    let (revs, w) = s.write_marked(&[put(), put()], true).unwrap();
    assert_eq!(revs, vec![1, 2]);
    s.make_durable(vec![w]).unwrap();
    s.commit(&[put()]).unwrap();
    drop(s);
    let s = reopen(dir.path());
    assert_eq!(s.id(), id);
    let snap = s.load().unwrap();
    assert_eq!((snap.revision, snap.intent_revision), (3, 2));
    // A writer that moves the revision without keeping the mark (an older
    // binary) makes the mark untrusted: 0, so every watcher gets a snapshot.
    s.backend
        .apply(vec![(REV_KEY.to_vec(), Some(4u64.to_be_bytes().to_vec()))])
        .unwrap();
    s.flush().unwrap();
    drop(s);
    let s = reopen(dir.path());
    let snap = s.load().unwrap();
    assert_eq!((snap.revision, snap.intent_revision), (4, 0));
}

#[test]
fn every_open_starts_an_epoch_at_the_current_revision() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.epochs().len(), 1);
    assert_eq!(s.epochs()[0].start, 0);
    s.commit(&[Mutation {
        ops: vec![Op::PutPool(pool())],
    }])
    .unwrap();
    let first = s.epochs()[0].clone();
    drop(s);
    let s = reopen(dir.path());
    let e = s.epochs().to_vec();
    assert_eq!(e.len(), 2);
    assert_eq!(e[0], first, "earlier epochs are kept as they were");
    assert_eq!(e[1].start, 1, "starts at the revision it was opened at");
    assert_ne!(e[1].id, e[0].id);
    assert_eq!(e[1].id.len(), 16, "64 bits in hex");
    assert_eq!(s.epoch(), &e[1], "this open's epoch is the last");
    drop(s);
    // Only the last MAX_EPOCHS are remembered.
    let mut last = String::new();
    for _ in 0..MAX_EPOCHS {
        let s = reopen(dir.path());
        last = s.epochs().last().unwrap().id.clone();
    }
    let s = reopen(dir.path());
    assert_eq!(s.epochs().len(), MAX_EPOCHS);
    assert_eq!(s.epochs()[MAX_EPOCHS - 2].id, last);
    assert!(!s.epochs().iter().any(|x| x.id == first.id));
}

#[test]
fn encapsulations_keep_their_stored_encoding() {
    // Stored by variant index: data written before the enum moved to
    // tabby-routing must read back the same.
    use crate::Encapsulation as E;
    for (i, e) in [
        E::None,
        E::Vxlan,
        E::VxlanCrossSubnet,
        E::Ipip,
        E::IpipCrossSubnet,
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(postcard::to_allocvec(&e).unwrap(), vec![i as u8], "{e:?}");
    }
}

#[test]
fn records_of_the_older_layouts_still_load() {
    // Nodes without prefix lengths and a config without VXLAN settings, as
    // stores written before them hold them.
    let old = NodeV1 {
        name: "n1".into(),
        addresses: vec![ip("172.18.0.2")],
        labels: [("zone".to_string(), "a".to_string())].into(),
    };
    let n: Node =
        crate::dec_or::<Node, NodeV1>(b"n/n1", &postcard::to_allocvec(&old).unwrap()).unwrap();
    assert_eq!(n, Node::from(old));
    assert!(n.prefix_lens.is_empty());
    let new = Node {
        prefix_lens: vec![24],
        ..n
    };
    let back: Node =
        crate::dec_or::<Node, NodeV1>(b"n/n1", &postcard::to_allocvec(&new).unwrap()).unwrap();
    assert_eq!(back, new);
    let c = IpamConfigV1 {
        strict_affinity: true,
        max_blocks_per_node: 9,
    };
    let got: IpamConfig =
        crate::dec_or::<IpamConfig, IpamConfigV1>(b"c/ipam", &postcard::to_allocvec(&c).unwrap())
            .unwrap();
    assert_eq!(
        (got.strict_affinity, got.max_blocks_per_node, got.vxlan_vni),
        (true, 9, 0)
    );
    // Neither layout: corrupt, with the key named.
    let e = crate::dec_or::<Node, NodeV1>(b"n/bad", &[0xff, 0xff]).unwrap_err();
    assert!(e.to_string().contains("n/bad"), "{e}");
}

/// Packed attributes are stored exactly as the map they hold was (the
/// format is unchanged), and come back as that map, whatever the strings.
#[test]
fn attributes_keep_the_map_format() {
    let maps: Vec<BTreeMap<String, String>> = vec![
        BTreeMap::new(),
        [
            ("container_id", "f".repeat(64)),
            ("ifname", "eth0".into()),
            ("namespace", "default".into()),
            ("pod", "web-0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        [("", ""), ("nul\0in key", "\u{fc}\0"), ("k", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    ];
    for m in maps {
        let a = Attributes::from(&m);
        assert!(a.iter().eq(m.iter().map(|(k, v)| (k.into(), v.into()))));
        assert_eq!(a.is_empty(), m.is_empty());
        assert_eq!(a.len(), m.len());
        let bytes = postcard::to_allocvec(&m).unwrap();
        assert_eq!(
            postcard::to_allocvec(&a).unwrap(),
            bytes,
            "same bytes as the map"
        );
        let back: Attributes = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, a, "decoded from the map's bytes");
        for (k, v) in &m {
            assert_eq!(a.get(k).as_deref(), Some(v.as_str()));
        }
    }
    // A map written out of order or with a repeated key (not by a
    // BTreeMap) still decodes as the map, the last value winning.
    let pairs = [("b", "1"), ("a", "2"), ("b", "3")];
    let mut bytes = vec![pairs.len() as u8];
    for (k, v) in pairs {
        for s in [k, v] {
            bytes.push(s.len() as u8);
            bytes.extend_from_slice(s.as_bytes());
        }
    }
    let a: Attributes = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(
        a.iter().collect::<Vec<_>>(),
        vec![("a".into(), "2".into()), ("b".into(), "3".into())]
    );
    // Damage is an error, not a panic.
    assert!(postcard::from_bytes::<Attributes>(&[1, 5, b'a']).is_err());
    assert!(postcard::from_bytes::<Attributes>(&[1, 2, 0xff, 0xfe, 0]).is_err());
}

/// A pod's attributes as tabby-node sends them pack into about the bytes of
/// their values: the keys, the interface and the usual namespaces take one
/// byte each. Strings of every header length, and strings near the common
/// ones, keep their exact value.
#[test]
fn attributes_pack_small() {
    let pod = |ns: &str| -> BTreeMap<String, String> {
        [
            ("container_id", "0123456789abcdef".repeat(4)),
            ("ifname", "eth0".into()),
            ("namespace", ns.into()),
            ("pod", "web-0".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    };
    // 1 + 2 + 32 (the id's 64 hex digits two to a byte; a header of 130
    // takes two bytes), 1 + 1, 1 + 1, 1 + 1 + 5; the form with u32 lengths
    // and no common strings took 142, with the id's digits as bytes 78.
    assert_eq!(Attributes::from(&pod("default")).packed_len(), 46);
    assert_eq!(Attributes::from(&pod("shop")).packed_len(), 50);
    let mut m = BTreeMap::new();
    for (i, n) in [0usize, 1, 63, 64, 127, 128, 300, 20_000]
        .into_iter()
        .enumerate()
    {
        m.insert(
            format!("k{i:02}"),
            "\u{e9}".repeat(n / 2) + &"x".repeat(n % 2),
        );
    }
    for s in ["eth", "eth00", "Default", "pod ", "kube-system"] {
        m.insert(format!("near {s}"), s.to_string());
        m.insert(s.to_string(), format!("{s}!"));
    }
    // Strings at the edges of the hex form: too short, odd, upper case, a
    // letter past f, and long ones (as keys too, so their order is checked).
    let hex = "0123456789abcdef";
    for s in [
        hex[..15].to_string(),
        hex.to_string(),
        hex[..15].to_string() + "0a",
        hex.to_uppercase(),
        hex[..15].to_string() + "g",
        "f".repeat(64),
        "0".repeat(20_000),
        hex.repeat(9) + "00",
    ] {
        m.insert(format!("hex {s}"), s.clone());
        m.insert(s.clone(), s);
    }
    let a = Attributes::from(&m);
    assert!(a.iter().eq(m.iter().map(|(k, v)| (k.into(), v.into()))));
    assert_eq!(a.len(), m.len());
    let back: Attributes = postcard::from_bytes(&postcard::to_allocvec(&m).unwrap()).unwrap();
    assert_eq!(back, a);
}
