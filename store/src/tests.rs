use super::*;
use std::net::IpAddr;

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
                    attributes: [("pod".to_string(), "a".to_string())].into(),
                },
            ),
            Op::SetReleased(ip("10.0.0.2"), 7),
            Op::PutConfig(IpamConfig {
                strict_affinity: true,
                max_blocks_per_node: 3,
            }),
        ],
    };
    let mut rx = s.subscribe();
    let revs = s.commit(&[m1, Mutation::default(), m2]).unwrap();
    assert_eq!(revs, vec![1, 1, 2]);
    assert_eq!(rx.try_recv().unwrap().revision, 1);
    assert_eq!(rx.try_recv().unwrap().keys.len(), 4);
    drop(s);

    let s = Store::open(dir.path()).unwrap();
    assert_eq!(s.revision(), 2);
    let snap = s.load().unwrap();
    assert_eq!(snap.pools["p"], pool());
    assert_eq!(snap.blocks.len(), 1);
    assert_eq!(snap.allocations[&ip("10.0.0.1")].handle, "h");
    assert_eq!(snap.released[&ip("10.0.0.2")], 7);
    assert_eq!(snap.handles["h"].attributes["pod"], "a");
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
fn change_log_resumes_and_reports_trimmed_history() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open_with_retention(dir.path(), 5).unwrap();
    for i in 0..10u8 {
        s.commit(&[Mutation {
            ops: vec![Op::SetReleased(IpAddr::from([10, 0, 0, i]), i as u64)],
        }])
        .unwrap();
    }
    let c = s.changes_since(7).unwrap().unwrap();
    assert_eq!(
        c.iter().map(|c| c.revision).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert_eq!(c[0].keys, vec![Key::Address(ip("10.0.0.7"))]);
    assert_eq!(s.changes_since(10).unwrap().unwrap(), vec![]);
    // Revisions 1..=5 were trimmed: resuming from 2 needs a snapshot.
    assert!(s.changes_since(2).unwrap().is_none());
    assert!(s.changes_since(5).unwrap().is_some());
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
    let s = Store::open(dir.path()).unwrap();
    assert!(matches!(s.load(), Err(StoreError::Corrupt { .. })));
}
